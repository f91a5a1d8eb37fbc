"""What names a disk-cache entry (cache keys; an item's keys are items.py): the folder from every setting that
changes an entry (and our and MONAI's code versions), the entry from its source file's path under
data.image_root, size and time and the metadata applied to it, and which `cache --verify` shard owns it. Small
and pure, so mutation testing covers it (docs/testing.md)."""

from __future__ import annotations

import hashlib
import json
import os
from stat import S_ISDIR

from engine.config.loading import plain
from engine.config.schema import PreprocessConfig
from engine.data.items import IMAGE, PIXDIM, RELATIVE, RESCALE
from engine.data.preprocess import PREPROCESSING_VERSION
from engine.utils.errors import Transient
from engine.utils.io import TMP_PREFIX, TRANSIENT_ERRNOS

CACHE_FORMAT = 2  # bump when what a cache entry holds changes


def cache_key(p: PreprocessConfig) -> str:
    """Hash of every setting that changes a cache entry, our preprocessing code's version and MONAI's:
    the disk cache's folder name."""
    import monai

    text = json.dumps({**plain(p), "format": CACHE_FORMAT, "code": PREPROCESSING_VERSION,
                       "monai": monai.__version__}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def source_signature(item: dict) -> list:
    """The volume's path (under data.image_root when the item has one, so another mount point of the same files
    names the same entry), size and modification time: a changed file is a new cache entry. A series (a folder,
    or one named inside it: `<folder>/<series>`) goes by its files' total size and newest time. Storage that does
    not answer is Transient: a signature without size and time would name another entry (and verify would call
    this one stale)."""
    path = item[IMAGE]
    for candidate in (path, os.path.dirname(path)):
        try:
            return [item.get(RELATIVE, path), *_size_and_time(candidate)]
        except OSError as exc:
            if exc.errno in TRANSIENT_ERRNOS:
                raise Transient(f"{candidate}: the storage did not answer ({exc.strerror or exc})") from None
            continue
    return [item.get(RELATIVE, path)]


def _size_and_time(path: str) -> tuple[int, int]:
    """A file's size and modification time; a folder's (a DICOM series) its files' total size and the newest time
    of it and them: a series rewritten in place under the same file names changes neither the folder's size nor
    its time, only its files'."""
    stat = os.stat(path)
    if not S_ISDIR(stat.st_mode):
        return stat.st_size, stat.st_mtime_ns
    size, newest = 0, stat.st_mtime_ns
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_file():
                member = entry.stat()
                size, newest = size + member.st_size, max(newest, member.st_mtime_ns)
    return size, newest


def source_hash(item: dict) -> bytes:
    """The cache entry's name: the source's signature and the metadata applied to it."""
    key = source_signature(item) + [item[k] for k in (RESCALE, PIXDIM) if k in item]
    return hashlib.md5(json.dumps(key).encode()).hexdigest().encode()


def shard_of_entry(name: str, count: int) -> int:
    """Which of `count` verify shards owns a cache file: by its entry's name (a temporary file's by the entry it
    becomes), so each entry, stale and orphaned ones included, is judged by exactly one shard: the first 32
    bits of the name's MD5, modulo `count` (the same in every version, so pods of mixed versions agree)."""
    if name.startswith(TMP_PREFIX):
        name = name.split("-", 3)[-1]
    return int(hashlib.md5(name.encode()).hexdigest()[:8], 16) % count
