"""Data preparation: the train and validation items from the datalists (or a patient-wise split),
every check before training, and the `check` and `cache` commands."""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine.config.schema import CacheConfig, DataConfig, PreprocessConfig
from engine.data.cache import verify_cache, volume_problems
from engine.data.datalist import load_datalist
from engine.data.demo import LABELS, generate
from engine.data.items import NAME, Problem, format_problems
from engine.data.metadata import attach_metadata
from engine.data.sharing import shard
from engine.data.split import carve_test, check_patient_pattern, leakage_problems, patient_of, split, split_problems
from engine.utils.errors import CT3DError
from engine.utils.io import check_writable, write_text

log = logging.getLogger("ct3d")
JSON_TEST_KEY = "test"  # a JSON datalist's list of held-out items (each with an image and a label)


@dataclass
class Splits:
    train: list[dict]
    val: list[dict]
    labels: list[str]  # output names, in model output order
    skipped: list[Problem]  # bad rows and volumes left out (data.on_error=skip), or every problem (check)
    test: list[dict] = field(default_factory=list)  # the held-out test set (data.test / data.test_fraction)


def train_datalist(data: DataConfig) -> str:
    """data.train, or the demo's datalist (generated once)."""
    if not data.demo.enabled:
        return data.train
    return str(generate(data.demo.dir, data.demo.num_volumes, tuple(data.demo.shape), data.demo.seed,
                        tuple(data.demo.labels) or LABELS))


def load_splits(data: DataConfig, problems: list[Problem] | None = None) -> tuple[list[dict], list[dict], list[str]]:
    """Train and validation items and the label names, from the demo, two datalists or a patient-wise
    split, less the held-out test patients of data.test_fraction. Bad rows raise, or go to `problems` when
    given. With data.metadata each item carries its volume's rescale and spacing (a volume without a row is a
    bad row)."""
    return _load_lists(data, problems)[:3]


def _load_lists(data: DataConfig, problems: list[Problem] | None
                ) -> tuple[list[dict], list[dict], list[str], list[dict]]:
    """load_splits' three and the items data.test_fraction carved out of the training datalist (read once)."""
    train_path = train_datalist(data)
    train = load_datalist(train_path, data, data.json_train_key, problems)
    carved: list[dict] = []
    if data.test_fraction > 0 and not data.test:
        train.items[:], carved = carve_test(train.items, data.test_fraction, data.split_seed,
                                            lambda item: patient_of(item, data.patient_pattern))
    val_path = data.val
    if not val_path and train_path.endswith(".json") and data.json_val_key in json.loads(Path(train_path).read_text()):
        val_path = train_path
    if val_path and data.folds:
        raise CT3DError("config error: data.folds: cross-validation folds split data.train; it takes no "
                        "separate validation list (data.val, or the JSON datalist's validation list)")
    if val_path:
        val = load_datalist(val_path, data, data.json_val_key, problems)
        if val.labels != train.labels:
            raise CT3DError(f"datalist {val_path}: labels {val.labels} differ from {train_path}'s {train.labels}")
        train_items, val_items = train.items, val.items
    else:
        check_patient_pattern(train.items, data)
        train_items, val_items = split(train.items, data.val_fraction, data.split_seed,
                                       lambda item: patient_of(item, data.patient_pattern), data.stratify,
                                       data.folds, data.fold)
    check_patient_pattern(train_items + val_items, data)
    if data.metadata:
        train_items, val_items = attach_metadata(data.metadata, (train_items, val_items), problems)
    return train_items, val_items, train.labels, carved


def disk_dir(cache: CacheConfig) -> str | None:
    """The disk cache's folder, None when it is off."""
    return cache.dir if cache.disk else None


def prepare_data(data: DataConfig, preprocess: PreprocessConfig, cache: CacheConfig, progress: bool = False,
                 strict: bool = True, share: tuple[int, int] = (0, 1),
                 pool: Callable[[list[Problem]], list[Problem]] = list, once: Callable | None = None,
                 known: Callable[[dict], bool] | None = None) -> Splits:
    """Every check before training, every problem at once: datalist rows, split (empty, patient in both),
    and every volume not yet in the disk cache read once (filling it). With data.on_error=skip, bad rows
    and volumes are returned as problems and left out; split problems always stop the run. With
    strict=False nothing raises: every problem, split ones included, is returned.
    Several processes share the volume checks: each reads its `share` (I, N) and `pool` returns every
    process's bad volumes from its own, so all leave out the same ones; `once(fn)` runs fn in one process and
    gives every process its result (torchrun: rank 0 reads the datalists and looks up every row's file, the
    others receive the items). `known(item)`: a volume read before and found good (a probe's cached embedding):
    not read again."""
    def lists() -> tuple:
        found: list[Problem] = []
        train_items, val_items, labels, carved = _load_lists(data, found)
        return train_items, val_items, labels, load_test(data, carved, found), found

    train_items, val_items, labels, test_items, problems = once(lists) if once is not None else lists()
    fatal = split_problems(train_items, val_items, data.patient_pattern) + leakage_problems(
        train_items, val_items, test_items, data.patient_pattern)
    mine = [it for it in shard(train_items + val_items + test_items, *share) if known is None or not known(it)]
    unreadable = pool(volume_problems(mine, preprocess, disk_dir(cache), cache.workers, progress))
    problems += unreadable
    if not strict:
        problems = fatal + problems
    else:
        stop_on(fatal, problems, data.on_error)
    bad = {p.name for p in unreadable}  # bad datalist rows were never made items
    return Splits([it for it in train_items if it[NAME] not in bad], [it for it in val_items if it[NAME] not in bad],
                  labels, problems, [it for it in test_items if it[NAME] not in bad])


def load_test(data: DataConfig, carved: list[dict], problems: list[Problem] | None = None) -> list[dict]:
    """The test items: data.test's datalist (its labels as the training datalist's), or the items
    data.test_fraction `carved` out of the training datalist; with data.metadata, each with its rescale and
    spacing."""
    items = load_datalist(data.test, data, JSON_TEST_KEY, problems).items if data.test else carved
    if items and data.metadata:
        (items,) = attach_metadata(data.metadata, (items,), problems)
    return items


def stop_on(fatal: list[Problem], problems: list[Problem], on_error: str) -> None:
    """Raises, listing every problem, where training would stop: split problems always, bad rows and volumes
    unless data.on_error=skip."""
    if fatal or (problems and on_error == "raise"):
        hint = "" if fatal or not problems else "\n(data.on_error=skip leaves bad volumes out and lists them)"
        every = fatal + problems
        raise CT3DError(f"{len(every)} problem(s) in the data:\n  {format_problems(every, 50)}{hint}")


def write_skipped(folder: Path, problems: list[Problem]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["volume", "where", "problem"])
    writer.writerows([p.name, p.where, p.message] for p in problems)
    write_text(folder / "skipped.csv", buf.getvalue())


def check_lists(data: DataConfig, cache: CacheConfig, output_dir: str) -> int:
    """`check --quick` (a pod's first step): the config, the datalists' rows and labels, every listed volume
    present, and the split, without reading any volume. Raises (exit 2, a user error) where training would
    stop; returns the number of rows data.on_error=skip would leave out."""
    problems: list[Problem] = []
    train_items, val_items, _ = load_splits(data, problems)
    stop_on(split_problems(train_items, val_items, data.patient_pattern), problems, data.on_error)
    writable_folders(cache, output_dir)
    note = f", {len(problems)} bad row(s) left out (data.on_error=skip)" if problems else ""
    print(f"ct3d check --quick: {len(train_items)} train and {len(val_items)} validation volumes listed and "
          f"present{note}")
    return len(problems)


def writable_folders(cache: CacheConfig, output_dir: str, embeddings: bool = False) -> None:
    """The disk cache (when on, or when it keeps a probe's `embeddings`) and the output folder take files: checked
    by writing one (a pod's claim whose storage driver ignores fsGroup would only fail at the first checkpoint,
    hours in)."""
    if cache.disk or embeddings:
        check_writable(cache.dir, "cache.dir")
    check_writable(output_dir, "output.dir")


def check(data: DataConfig, preprocess: PreprocessConfig, cache: CacheConfig, output_dir: str) -> int:
    """`check`: every data problem at once; returns the number of problems found (0: all good)."""
    writable_folders(cache, output_dir)
    splits = prepare_data(data, preprocess, cache, progress=True, strict=False)
    if splits.skipped:
        print(f"ct3d check: {len(splits.skipped)} problem(s):\n  {format_problems(splits.skipped, 10_000)}")
        return len(splits.skipped)
    print(f"ct3d check: {len(splits.train)} train and {len(splits.val)} validation volumes, no problems")
    return 0


def fill_cache(data: DataConfig, preprocess: PreprocessConfig, cache: CacheConfig, verify: bool = False,
               shard_of: tuple[int, int] = (0, 1)) -> dict:
    """`cache`: fill the disk cache ahead of training (one share of it with `shard_of`=(I, N), so N processes
    or pods fill one cache together); with verify, also remove corrupt and stale entries."""
    if not cache.disk:
        raise CT3DError("config error: cache.disk: the disk cache is off; nothing to fill")
    problems: list[Problem] = []
    train_items, val_items, _ = load_splits(data, problems)
    items = shard(train_items + val_items, *shard_of)
    start = time.time()
    if verify:  # verify shards split the entries by name (each rebuilds what it removed), not the item list
        counts = verify_cache(train_items + val_items, preprocess, cache.dir, cache.workers,
                              progress=True, image_root=data.image_root, shard=shard_of)
    else:
        bad = volume_problems(items, preprocess, cache.dir, cache.workers, progress=True)
        counts = {"volumes": len(items), "problems": len(bad), "problem_list": [str(b) for b in bad]}
    counts["shard"] = f"{shard_of[0]}/{shard_of[1]}"
    counts["volumes_per_second"] = round(len(items) / max(time.time() - start, 1e-9), 2)
    counts["problems"] += len(problems)  # bad datalist rows count too (the exit code says so)
    counts["problem_list"] = [str(p) for p in problems] + counts["problem_list"]
    listed = "".join(f"\n  {p}" for p in counts["problem_list"])
    print(f"ct3d cache {cache.dir}: " + ", ".join(f"{k} {v}" for k, v in counts.items() if k != "problem_list")
          + listed)
    return counts
