"""One torchrun worker of the step-cost benchmark (bench/distributed.py): the process group as `engine.run`
makes it, Counts installed, then train() with Counts attached; rank 0 writes the per-iteration counts to
$CT3D_COUNTS. Run by path (`python bench/sync_worker.py overrides...`), so PYTHONPATH picks the engine measured:
this tree's, or an older checkout's for the before figure."""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
from counting import Counts  # beside this file (sys.path[0]); the engine comes from PYTHONPATH

try:
    from engine.config import load_config
    from engine.training import init_process_group, train
except ImportError:  # BEFORE's engine (bench/distributed.py), whose packages export nothing: its modules by path
    import ignite.distributed as idist

    from engine.config.loading import load_config
    from engine.training.workflow import train

    def init_process_group(backend: str, timeout: timedelta) -> None:
        """Ignite's group: BEFORE kept its own in engine.run, which nothing outside engine imports; how the
        ranks met changes no per-step count."""
        idist.initialize(backend, timeout=timeout)


def main() -> None:
    cfg = load_config(None, sys.argv[1:])
    init_process_group("gloo", timedelta(minutes=cfg.train.dist_timeout_minutes))
    counts = Counts().install()
    try:
        train(cfg, attach=counts.attach)
    finally:
        counts.remove()
    if dist.get_rank() == 0:
        Path(os.environ["CT3D_COUNTS"]).write_text(json.dumps(counts.per_iteration))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
