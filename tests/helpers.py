"""Shared by the tests: the repository root, tiny training overrides, a small label CSV, and the CLI in a
process of its own (forked with the imports done: tests/forked.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from forked import Forked, forked_run

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
TEXT = {"encoding": "utf-8", "errors": "replace"}  # children's output, whatever this locale
SCHEMA_DEFAULTS = ROOT / "tests" / "schema-defaults.yaml"  # the CLI on the schema's defaults, as load_config(None)


def tiny_overrides(tmp_path: Path, datalist: Path, *extra: str) -> list[str]:
    """Overrides for a seconds-long training run on tiny volumes."""
    return [
        f"data.train={datalist}", "data.demo.enabled=false", "preprocess.spatial_size=[32,32,32]",
        f"cache.dir={tmp_path / 'cache'}", f"output.dir={tmp_path / 'runs'}", "output.name=run",
        "loader.batch_size=4", "train.epochs=1", "model.widen_factor=0.25", "cache.workers=1",
        "tracking.wandb.mode=disabled", "report.panels=false", "metrics.min_positive_patients=1", *extra,
    ]


def command(*args: str) -> list[str]:
    """`python -m engine.run COMMAND --config <schema defaults> OVERRIDES...`"""
    return [sys.executable, "-m", "engine.run", *args[:1], "--config", str(SCHEMA_DEFAULTS), *args[1:]]


def cli(*args: str, env: dict = ENV, fresh: bool = False) -> subprocess.CompletedProcess:
    """subprocess.run(command(*args), capture_output=True, text=True) in a forked process (tests/forked.py);
    `fresh`: in a new interpreter, for a test of what happens while it imports."""
    if fresh:
        return subprocess.run(command(*args), cwd=ROOT, capture_output=True, **TEXT, timeout=600, env=env)
    return forked_run(command(*args)[3:], ROOT, env, timeout=600)


def start(*args: str, env: dict = ENV, merged: bool = False) -> Forked:
    """subprocess.Popen(command(*args), stderr=PIPE) in a forked process; `merged`: stdout and stderr in one."""
    return Forked(command(*args)[3:], ROOT, env, merged=merged)


def make_csv(folder: Path, rows: list[str], header="VolumeName,Lung nodule,Emphysema", create=True) -> Path:
    """labels.csv in `folder` with `rows` under `header`; with `create`, a placeholder file per named volume."""
    for row in rows:
        name = row.split(",")[0]
        if create and name:
            (folder / name).write_bytes(b"x")
    path = folder / "labels.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path
