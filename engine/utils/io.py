"""Atomic file writes: a temp file in the same folder, fsync, rename. A reader sees the old file or
the new one, never half of one, and a crash leaves no file a later run would take for real."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from engine.utils.errors import CT3DError, Transient

# storage that did not answer (a network filesystem's hiccup), not storage that refused: retried, then Transient
TRANSIENT_ERRNOS = {errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.ENETDOWN, errno.ENETUNREACH,
                    errno.EHOSTUNREACH, errno.ECONNRESET}

TMP_PREFIX = ".tmp-"


def temp_path_for(path: Path) -> Path:
    # The real name stays as the suffix so writers that pick a format by extension still work.
    return path.with_name(f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yields a temp path to write; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        _raise_if_full(exc, path)
        raise
    try:
        _fsync(path.parent, directory=True)
    except OSError:  # some filesystems refuse fsync on a directory; the rename is done
        pass


FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
LOW_SPACE = 64 * 2**20  # bytes: below this, a failed write (torch.save says only "file write failed") is a full disk


def _raise_if_full(exc: BaseException, path: Path) -> None:
    """A write that failed on a full filesystem, as one line with the path and the space left: Transient (exit 150,
    the pod is retried once space is made). The file there before, if any, is untouched (the write was to a
    temporary file)."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return
    full = isinstance(exc, OSError) and exc.errno in FULL_ERRNOS
    if full or (isinstance(exc, (OSError, RuntimeError)) and free < LOW_SPACE):
        raise Transient(f"{path}: no space left on its filesystem ({free / 2**20:.1f} MiB free) while writing it; "
                        f"free space or enlarge the volume. Files written before are intact") from None


def write_text(path: str | Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def _finite(value):
    """JSON has no NaN: NaN becomes null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(path: str | Path, value) -> None:
    """`value` as indented JSON, NaN written as null, atomically."""
    write_text(path, json.dumps(_finite(value), indent=2))


def save_tensors(obj, path: str | Path) -> None:
    """torch.save of `obj` to `path`, atomically, without the zip archive's CRC-32 of each record: torch.load
    never checks it (tested), and computing it took half to three quarters of a 400 MB checkpoint's write
    (0.5-1.0 s against 0.2-0.3 s without, torch 2.13). Completeness comes from the fsync and rename."""
    import torch
    from torch.utils.serialization import config

    config.save.compute_crc32 = False
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


STORAGE_FIXES = ("a block volume (EBS, Persistent Disk, Azure Disk): the pod's fsGroup (k8s.run_as_user) makes it "
                 "writable, unless the CSI driver skips fsGroup (its fsGroupPolicy); EFS: an access point with "
                 "uid/gid = k8s.run_as_user; NFS / Filestore: export it writable for that uid (or set the NFS CSI "
                 "driver's mountPermissions); otherwise set k8s.run_as_user to the share's owner")


def check_writable(folder: str | Path, setting: str, tries: int = 6, first_wait: float = 2.0) -> None:
    """Creates `folder` if needed and writes, syncs and removes a file in it; a CT3DError naming the folder,
    the setting and the fix for each kind of storage otherwise (a claim whose driver ignores fsGroup is
    read-only to a non-root pod). Storage that does not answer (EIO, ESTALE, ETIMEDOUT: an NFS hiccup at a
    gang restart) is tried `tries` times, waits doubling from `first_wait` s (about a minute in all), then is a
    Transient failure (exit 150, retried), not a user error."""
    folder = Path(folder)
    for attempt in range(tries):
        probe = folder / f"{TMP_PREFIX}write-probe-{uuid.uuid4().hex}"  # pods checking one claim at once: own names
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"ct3d")
                os.fsync(f.fileno())
            probe.unlink(missing_ok=True)
            return
        except OSError as exc:
            if exc.errno not in TRANSIENT_ERRNOS:
                raise CT3DError(f"{setting}: {folder} is not writable by this process (uid {os.getuid()}: "
                                f"{exc.strerror or exc}). On Kubernetes, for {STORAGE_FIXES}") from None
            if attempt == tries - 1:
                raise Transient(f"{setting}: {folder} did not answer after {tries} tries ({exc.strerror or exc}): "
                                f"the storage, not the config; the pod is retried") from None
            time.sleep(first_wait * 2 ** attempt)
