"""Checks that need more than one datalist row: every volume read once (through the disk cache when
it is on, so checking also fills it), patients on both sides of the split, empty splits; and the
disk cache's own fill and verify."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from engine.data import (
    SOURCE,
    DiskCacheDataset,
    Preprocessing,
    cache_folder,
    preprocess,
    preprocessing_transform,
    source_hash,
    source_signature,
)
from engine.datalist import IMAGE, NAME, PATIENT, WHERE, Problem
from engine.errors import CT3DError
from engine.io import TMP_PREFIX


def patient_of(item: dict, pattern: str) -> str:
    """The patient id: the datalist's patient column when set, else the first group of `pattern` on the
    volume name (CT-RATE: train_123_a_1.nii.gz -> train_123), else the volume name itself."""
    if item.get(PATIENT):
        return item[PATIENT]
    match = re.match(pattern, item[NAME]) if pattern else None
    return match.group(1) if match and match.groups() else item[NAME]


def split_problems(train: list[dict], val: list[dict], pattern: str) -> list[Problem]:
    """Empty splits and patients with volumes on both sides (these cannot be skipped)."""
    problems = [Problem(f"{side} split", "is empty") for side, items in (("train", train), ("validation", val))
                if not items]
    train_patients = {patient_of(it, pattern): it for it in train}
    for it in val:
        patient = patient_of(it, pattern)
        if patient in train_patients:
            problems.append(Problem(it.get(WHERE, it[NAME]), f"patient {patient!r} is in validation ({it[NAME]}) "
                                    f"and in training ({train_patients[patient][NAME]})"))
    return problems


def _disk_cache(p: Preprocessing, disk_dir: str | Path) -> DiskCacheDataset:
    return DiskCacheDataset([], preprocessing_transform(p), cache_dir=cache_folder(disk_dir, p), hash_func=source_hash)


def _parallel(fn: Callable, items: list, workers: int, progress: bool, what: str) -> list:
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(fn, items)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(items), desc=what)
        return list(results)


def volume_problems(items: list[dict], p: Preprocessing, disk_dir: str | Path | None, workers: int,
                    progress: bool = False) -> list[Problem]:
    """Reads and preprocesses every volume (filling the disk cache when on); one Problem per bad volume.
    A volume with a cache entry passed when the entry was built (entries are keyed by the source's size
    and mtime), so it is not read again: a warm start does not reload the whole cache."""
    cache = _disk_cache(p, disk_dir) if disk_dir else None
    transform = preprocessing_transform(p)

    def one(item: dict) -> Problem | None:
        source = {IMAGE: item[IMAGE], NAME: item[NAME]}
        try:
            if cache is None:
                preprocess(transform, source)
            elif not cache.entry_path(source).is_file():
                cache.entry(source)
        except CT3DError as exc:
            return Problem(item.get(WHERE, item[NAME]), str(exc), item[NAME])
        return None

    return [problem for problem in _parallel(one, items, workers, progress, "checking volumes") if problem]


def verify_cache(items: list[dict], p: Preprocessing, disk_dir: str | Path, workers: int,
                 progress: bool = False) -> dict:
    """Removes corrupt entries, stale ones (source changed or gone) and temp files of interrupted writes
    from the cache folder, then builds every missing entry. Returns counts of what it did."""
    folder = cache_folder(disk_dir, p)
    folder.mkdir(parents=True, exist_ok=True)
    counts = {"checked": 0, "corrupt": 0, "stale": 0, "temp_files": 0, "built": 0, "problems": 0}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(TMP_PREFIX):
            path.unlink(missing_ok=True)
            counts["temp_files"] += 1
            continue
        counts["checked"] += 1
        try:
            entry = torch.load(path, weights_only=True)
            signature = entry[SOURCE]
            entry[IMAGE].shape  # noqa: B018 - a readable entry holds an image tensor
        except Exception:
            path.unlink(missing_ok=True)
            counts["corrupt"] += 1
            continue
        if source_signature(signature[0]) != list(signature):
            path.unlink(missing_ok=True)
            counts["stale"] += 1
    cache = _disk_cache(p, disk_dir)
    missing = [it for it in items if not cache.entry_path({IMAGE: it[IMAGE]}).is_file()]
    problems = volume_problems(missing, p, disk_dir, workers, progress)
    counts["built"] = len(missing) - len(problems)
    counts["problems"] = len(problems)
    return {**counts, "problem_list": [str(x) for x in problems]}
