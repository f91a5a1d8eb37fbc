"""Progress of long loops a user waits on (cache fill, checks, predict): a tqdm bar on a terminal;
elsewhere, as in a pod's log, a line about every tenth of the way with the rate and the ETA."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator

log = logging.getLogger("ct3d")


def tracked(steps: Iterable, total: int, what: str, per_step: int = 1, count: int | None = None) -> Iterator:
    """Yields `steps` (`total` of them, `per_step` volumes each; `count` volumes in all) and reports."""
    count = total * per_step if count is None else count
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(steps, total=total, desc=what)
        return
    start, every = time.time(), max(1, total // 10)
    for i, step in enumerate(steps, start=1):
        yield step
        if i % every == 0 or i == total:
            done, seconds = min(i * per_step, count), max(time.time() - start, 1e-9)
            log.info("%s: %d/%d volumes, %.1f volumes/s, ETA %.0f s", what, done, count, done / seconds,
                     (count - done) * seconds / max(done, 1))
