"""The two cache stages: disk (a PersistentDataset in a folder keyed by the preprocessing settings, one
entry per source file, named by its path under data.image_root, size and mtime, so a cache filled where the
data is mounted elsewhere is still hit) then RAM (CacheDataset), labels joined after both; and the disk
cache's fill and verify (every volume read once, so filling the cache also checks the data; verify shards
split the entries between them and leave a live writer's temporary files alone)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
from monai.data import CacheDataset, Dataset, PersistentDataset

from engine.config.schema import PreprocessConfig
from engine.data.cache_keys import cache_key, shard_of_entry, source_hash, source_signature
from engine.data.items import IMAGE, LABEL, NAME, RELATIVE, WHERE, Problem
from engine.data.preprocess import preprocess, preprocessing_transform, source_of
from engine.utils.errors import CT3DError, Transient
from engine.utils.io import TMP_PREFIX, TRANSIENT_ERRNOS, save_tensors
from engine.utils.progress import tracked

SOURCE = "source"  # cache entries record the path (under data.image_root when set), size and mtime they were built from
ABANDONED_SECONDS = 3600  # a temporary file untouched this long was left by a writer that died; younger: in use


class DiskCacheDataset(PersistentDataset):
    """PersistentDataset that writes each entry atomically next to its final name and loads it with
    weights_only=True. MONAI stages entries in /tmp and moves them, a non-atomic copy onto a PVC."""

    def _cachecheck(self, item_transformed):
        return self.entry(item_transformed)

    def entry_path(self, item: dict) -> Path:
        return self.cache_dir / f"{self.hash_func(item).decode()}.pt"

    def entry(self, item: dict) -> dict:
        """The cached preprocessing of `item`, built and written atomically when missing or unreadable."""
        hashfile = self.entry_path(item)
        if hashfile.is_file():
            try:
                return torch.load(hashfile, weights_only=True)
            except Exception:  # unreadable entry (a foreign or damaged file): rebuild it below
                pass
        entry = preprocess(self.transform, dict(item))
        entry[SOURCE] = source_signature(item)  # lets `cache --verify` find stale entries
        save_tensors(entry, hashfile)
        return entry


class Labelled(torch.utils.data.Dataset):
    """Images from a cached dataset joined with labels kept outside the cache, so a label edit
    never needs a re-preprocess and never serves a stale label."""

    def __init__(self, images, items: list[dict]):
        self.images, self.items = images, items
        self.rows: list[int] | None = None  # a rank's training share: which rows of all `total` it holds
        self.total = len(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return {IMAGE: self.images[index][IMAGE], LABEL: torch.tensor(self.items[index][LABEL])}

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A batch's items (DataLoader asks for them at once): those in the RAM cache as they are, the rest read
        from the disk cache by `readers` threads together (file reads release the GIL), so a share that does not
        wholly fit in RAM stays on the thread path instead of moving to worker processes."""
        if not self.readers:
            return [self[i] for i in indices]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.readers, thread_name_prefix="ct3d-read")
        return list(self._pool.map(self.__getitem__, indices))

    readers = 0  # threads that read a batch's items not in the RAM cache (loaders.make_loader sets it)
    _pool = None

    def __getstate__(self) -> dict:  # worker processes get the dataset without the threads
        return {**self.__dict__, "_pool": None}


def release_ram(dataset) -> None:
    """Empties a `build_dataset` result's RAM cache (MONAI's set_data on no items): a run's closing work needs
    the memory, not the volumes, and reads the few it shows from the disk cache."""
    images = getattr(dataset, "images", dataset)
    if isinstance(images, CacheDataset):
        images.set_data([])


def cached_share(dataset) -> float:
    """The share of a `build_dataset` result's items in the RAM cache (0 without one)."""
    images = getattr(dataset, "images", dataset)
    return images.cache_num / max(1, len(images)) if isinstance(images, CacheDataset) else 0.0


def in_ram(dataset) -> bool:
    """Whether every item of a `build_dataset` result is served from the RAM cache (nothing read from disk)."""
    if getattr(dataset, "in_ram", False) is True:  # a dataset held in RAM whole (cached embeddings)
        return True
    images = getattr(dataset, "images", dataset)
    return isinstance(images, CacheDataset) and images.cache_num >= len(images)


class _Preprocessed(Dataset):
    """No disk cache: preprocess on every access, errors naming the volume."""

    def _transform(self, index: int):
        return preprocess(self.transform, dict(self.data[index]))


class _Read(torch.utils.data.Dataset):
    """Each volume from its disk cache entry when there is one, else preprocessed and not kept; a bad volume is
    {"index", "error"} instead of an exception, so one bad file does not end a pass over thousands (predict,
    the embedding cache's extraction)."""

    def __init__(self, items: list[dict], p: PreprocessConfig, disk_dir: str | Path | None):
        self.sources, self.transform = [source_of(it) for it in items], preprocessing_transform(p)
        self.cache = _disk_cache(p, disk_dir) if disk_dir is not None else None

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> dict:
        source = self.sources[index]
        path = self.cache.entry_path(source) if self.cache is not None else None
        try:
            if path is not None and path.is_file():
                try:
                    return {"index": index, IMAGE: torch.load(path, weights_only=True)[IMAGE]}
                except Exception:  # a damaged entry: preprocess the source instead
                    pass
            return {"index": index, IMAGE: preprocess(self.transform, dict(source))[IMAGE]}
        except Transient:
            raise  # the storage, not this volume: the whole command is retried (exit 150)
        except CT3DError as exc:
            return {"index": index, "error": str(exc)}


def read_volumes(items: list[dict], p: PreprocessConfig, disk_dir: str | Path | None = None
                 ) -> torch.utils.data.Dataset:
    """`items`' preprocessed volumes for one pass (predict, the embedding cache's extraction): the disk cache (if
    `disk_dir`) is read where it holds a volume, never filled. Batch them with `collate_readable`."""
    return _Read(items, p, disk_dir)


def collate_readable(samples: list[dict]) -> tuple[list[dict], dict | None]:
    """A read_volumes batch: (the samples that could not be read, {"index", IMAGE} of the others or None)."""
    good = [s for s in samples if "error" not in s]
    batch = {"index": [s["index"] for s in good], IMAGE: torch.stack([s[IMAGE] for s in good])} if good else None
    return [s for s in samples if "error" in s], batch


def cache_folder(root: str | Path, p: PreprocessConfig) -> Path:
    return Path(root) / cache_key(p)


def build_dataset(items: list[dict], p: PreprocessConfig, disk_dir: str | Path | None, memory_rate: float,
                  workers: int, progress: bool = False) -> Labelled:
    """Disk cache (if `disk_dir`) then RAM cache (if `memory_rate` > 0); filling the RAM cache
    preprocesses every volume before training, so a bad file stops the run here."""
    sources = [source_of(it) for it in items]
    if disk_dir is not None:
        images = _disk_cache(p, disk_dir, sources)
    else:
        images = _Preprocessed(sources, preprocessing_transform(p))
    if memory_rate > 0:
        images = CacheDataset(images, transform=None, cache_rate=memory_rate, num_workers=workers or None,
                              progress=progress, copy_cache=False)
    return Labelled(images, items)


def _disk_cache(p: PreprocessConfig, disk_dir: str | Path, sources: list[dict] | None = None) -> DiskCacheDataset:
    return DiskCacheDataset(sources or [], preprocessing_transform(p), cache_dir=cache_folder(disk_dir, p),
                            hash_func=source_hash)


def _parallel(fn: Callable, items: list, workers: int, progress: bool, what: str) -> list:
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(fn, items)
        return list(tracked(results, len(items), what) if progress else results)


def volume_problems(items: list[dict], p: PreprocessConfig, disk_dir: str | Path | None, workers: int,
                    progress: bool = False) -> list[Problem]:
    """Reads and preprocesses every volume (filling the disk cache when on); one Problem per bad volume.
    A volume with a cache entry passed when the entry was built (entries are keyed by the source's size
    and mtime), so it is not read again: a warm start does not reload the whole cache."""
    cache = _disk_cache(p, disk_dir) if disk_dir else None
    transform = preprocessing_transform(p)

    def one(item: dict) -> Problem | None:
        source = source_of(item)
        try:
            if cache is None:
                preprocess(transform, source)
            elif not cache.entry_path(source).is_file():
                cache.entry(source)
        except Transient:
            raise  # the storage, not this volume: the whole command is retried (exit 150)
        except CT3DError as exc:
            return Problem(item.get(WHERE, item[NAME]), str(exc), item[NAME])
        return None

    return [problem for problem in _parallel(one, items, workers, progress, "checking volumes") if problem]


def verify_cache(items: list[dict], p: PreprocessConfig, disk_dir: str | Path, workers: int,
                 progress: bool = False, image_root: str = "", shard: tuple[int, int] = (0, 1)) -> dict:
    """Removes corrupt entries, stale ones (source changed or gone; a path under data.image_root resolved there)
    and temporary files of writes abandoned over ABANDONED_SECONDS ago from the cache folder, then builds every
    missing entry of `items`. With `shard` (I, N), it judges and builds only the entries shard_of_entry gives to
    I (a shard rebuilds what it removed), so N shards verify one cache together without touching each other's
    files or a live writer's temporary ones.
    Returns counts of what it did."""
    folder = cache_folder(disk_dir, p)
    folder.mkdir(parents=True, exist_ok=True)
    counts = {"checked": 0, "corrupt": 0, "stale": 0, "temp_files": 0, "built": 0, "problems": 0}
    index, count = shard
    for path in sorted(folder.iterdir()):
        if shard_of_entry(path.name, count) != index:
            continue
        if path.name.startswith(TMP_PREFIX):
            try:
                abandoned = time.time() - path.stat().st_mtime > ABANDONED_SECONDS
            except FileNotFoundError:  # its writer renamed it meanwhile
                continue
            if abandoned:
                path.unlink(missing_ok=True)
                counts["temp_files"] += 1
            continue
        counts["checked"] += 1
        try:
            entry = torch.load(path, weights_only=True)
            signature = list(entry[SOURCE])
            if not torch.isfinite(entry[IMAGE]).all():  # written before entries were checked: never train on it
                raise ValueError("non-finite voxels")
        except OSError as exc:
            if exc.errno in TRANSIENT_ERRNOS:  # the storage did not answer: the entry may be fine, keep it
                raise Transient(f"cache --verify: {path} could not be read ({exc.strerror or exc}); retry") from None
            path.unlink(missing_ok=True)
            counts["corrupt"] += 1
            continue
        except Exception:
            path.unlink(missing_ok=True)
            counts["corrupt"] += 1
            continue
        source = {IMAGE: str(Path(image_root) / signature[0]) if image_root else signature[0]}
        if not Path(signature[0]).is_absolute():
            if not image_root:  # named under a data.image_root this config does not give: cannot judge it
                continue
            source[RELATIVE] = signature[0]
        if source_signature(source) != signature:
            path.unlink(missing_ok=True)
            counts["stale"] += 1
    cache = _disk_cache(p, disk_dir)
    paths = [cache.entry_path(source_of(it)) for it in items]
    missing = [it for it, path in zip(items, paths) if shard_of_entry(path.name, count) == index and not path.is_file()]
    problems = volume_problems(missing, p, disk_dir, workers, progress)
    counts["built"] = len(missing) - len(problems)
    counts["problems"] = len(problems)
    return {**counts, "problem_list": [str(x) for x in problems]}
