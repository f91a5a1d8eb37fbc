"""Data preparation: the train and validation items from the datalists (or a patient-wise split),
every check before training, and the `check` and `cache` commands."""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from engine.data import verify_cache, volume_problems
from engine.datalist import NAME, Problem, format_problems, load_datalist, patient_of, split, split_problems
from engine.errors import CT3DError
from engine.io import write_text
from engine.schema import Config, DataConfig

log = logging.getLogger("ct3d")


@dataclass
class Splits:
    train: list[dict]
    val: list[dict]
    labels: list[str]  # output names, in model output order
    skipped: list[Problem]  # bad rows and volumes left out (data.on_error=skip), or every problem (check)


def load_splits(data: DataConfig, problems: list[Problem] | None = None) -> tuple[list[dict], list[dict], list[str]]:
    """Train and validation items and the label names, from the demo, two datalists or a patient-wise
    split. Bad rows raise, or go to `problems` when given."""
    train_path = data.train
    if data.demo.enabled:
        from engine.demo import generate

        train_path = str(generate(data.demo.dir, data.demo.num_volumes, tuple(data.demo.shape), data.demo.seed))
    train = load_datalist(train_path, data, data.json_train_key, problems)
    val_path = data.val
    if not val_path and train_path.endswith(".json") and data.json_val_key in json.loads(Path(train_path).read_text()):
        val_path = train_path
    if val_path:
        val = load_datalist(val_path, data, data.json_val_key, problems)
        if val.labels != train.labels:
            raise CT3DError(f"datalist {val_path}: labels {val.labels} differ from {train_path}'s {train.labels}")
        return train.items, val.items, train.labels
    train_items, val_items = split(train.items, data.val_fraction, data.split_seed,
                                   lambda item: patient_of(item, data.patient_pattern))
    return train_items, val_items, train.labels


def _disk_dir(cfg: Config) -> str | None:
    return cfg.cache.dir if cfg.cache.disk else None


def prepare_data(cfg: Config, progress: bool = False, strict: bool = True) -> Splits:
    """Every check before training, every problem at once: datalist rows, split (empty, patient in both),
    and every volume not yet in the disk cache read once (filling it). With data.on_error=skip, bad rows
    and volumes are returned as problems and left out; split problems always stop the run. With
    strict=False nothing raises: every problem, split ones included, is returned."""
    problems: list[Problem] = []
    train_items, val_items, labels = load_splits(cfg.data, problems)
    fatal = split_problems(train_items, val_items, cfg.data.patient_pattern)
    unreadable = volume_problems(train_items + val_items, cfg.preprocess, _disk_dir(cfg), cfg.cache.workers, progress)
    problems += unreadable
    if not strict:
        problems = fatal + problems
    elif fatal or (problems and cfg.data.on_error == "raise"):
        hint = "" if fatal or not problems else "\n(data.on_error=skip leaves bad volumes out and lists them)"
        every = fatal + problems
        raise CT3DError(f"{len(every)} problem(s) in the data:\n  {format_problems(every, 50)}{hint}")
    bad = {p.name for p in unreadable}  # bad datalist rows were never made items
    return Splits([it for it in train_items if it[NAME] not in bad], [it for it in val_items if it[NAME] not in bad],
                  labels, problems)


def write_skipped(folder: Path, problems: list[Problem]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["volume", "where", "problem"])
    writer.writerows([p.name, p.where, p.message] for p in problems)
    write_text(folder / "skipped.csv", buf.getvalue())


def check(cfg: Config) -> int:
    """`check`: every data problem at once; returns the number of problems found (0: all good)."""
    splits = prepare_data(cfg, sys.stderr.isatty(), strict=False)
    if splits.skipped:
        print(f"ct3d check: {len(splits.skipped)} problem(s):\n  {format_problems(splits.skipped, 10_000)}")
        return len(splits.skipped)
    print(f"ct3d check: {len(splits.train)} train and {len(splits.val)} validation volumes, no problems")
    return 0


def cache(cfg: Config, verify: bool = False) -> dict:
    """`cache`: fill the disk cache ahead of training; with verify, also remove corrupt and stale entries."""
    if not cfg.cache.disk:
        raise CT3DError("config error: cache.disk: the disk cache is off; nothing to fill")
    problems: list[Problem] = []
    train_items, val_items, _ = load_splits(cfg.data, problems)
    items, progress = train_items + val_items, sys.stderr.isatty()
    if verify:
        counts = verify_cache(items, cfg.preprocess, cfg.cache.dir, cfg.cache.workers, progress)
    else:
        bad = volume_problems(items, cfg.preprocess, cfg.cache.dir, cfg.cache.workers, progress)
        counts = {"volumes": len(items), "problems": len(bad), "problem_list": [str(b) for b in bad]}
    counts["problems"] += len(problems)  # bad datalist rows count too (the exit code says so)
    counts["problem_list"] = [str(p) for p in problems] + counts["problem_list"]
    listed = "".join(f"\n  {p}" for p in counts["problem_list"])
    print(f"ct3d cache {cfg.cache.dir}: " + ", ".join(f"{k} {v}" for k, v in counts.items() if k != "problem_list")
          + listed)
    return counts
