"""The benchmark's write-up, shared by the families: the machine, the table of every family's rows (each family
module's `rows(f)`, its `notes(f)` where it has one) and the results file, which keeps its hand-measured
section across reruns."""

from __future__ import annotations

import os
import platform
from datetime import date
from pathlib import Path
from types import ModuleType

import monai
import torch

from bench.rows import Row

HAND_MEASURED = "## Measured by hand"  # figures no benchmark makes (make demo, make test); the README links to them
READING = ("Ratios are medians of alternating runs; the spread is their min-max (for the pipeline rows: slowest over "
           "fastest epoch and back), and a row is met only when the whole spread is on the target's side. Rows "
           "without a target are reported, never met.")


def results(f: dict, families: list[ModuleType]) -> list[Row]:
    """(figure, measured, target, status) rows, family by family (a family that did not run has none)."""
    return [r for family in families for r in family.rows(f)]


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"{os.cpu_count()} cores, {cpu}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"MONAI {monai.__version__}, {torch.get_num_threads()} torch threads")


def notes(f: dict, families: list[ModuleType]) -> str:
    """How to read the table, then what the families say about this run's figures."""
    said = [text for family in families if hasattr(family, "notes") and (text := family.notes(f))]
    return " ".join(["Notes:", READING, *said])


def markdown(f: dict, families: list[ModuleType], cfg: dict, smoke: bool, seconds: float) -> str:
    table = "\n".join(f"| {name} | {value} | {target} | {status} |" for name, value, target, status
                      in results(f, families))

    def fmt(v) -> str:
        if isinstance(v, list):
            return ", ".join(f"{x:.4g}" for x in v)
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    raw = "\n".join(f"| {k} | {fmt(v)} |" for k, v in f.items())
    source = "x".join(map(str, cfg["source"]))
    sizes = (f"pipeline: {cfg['volumes']} volumes of {source} int16 NIfTI in HU, preprocessed to "
             f"{'x'.join(map(str, cfg['target']))} float16; memory: the same volumes kept at {source} float16; "
             f"engine: {cfg['train_volumes']} volumes of {cfg['train_size']}^3, batch 8; {cfg['ranks']} ranks: "
             f"{cfg['rank_volumes']} volumes of {cfg['rank_size']}^3 float16")
    return f"""# Benchmark results{' (smoke sizes)' if smoke else ''}

`make bench` (`python -m bench`) rewrites this file. Figures are ratios measured in one run.

- Date: {date.today().isoformat()}; took {seconds:.0f} s
- Machine: {machine()}
- Sizes: {sizes}

| figure | measured | target | |
|---|---|---|---|
{table}

{notes(f, families)}

Raw figures (seconds per epoch, bytes):

| name | value |
|---|---|
{raw}
"""


def hand_measured(text: str) -> str:
    """The section headed exactly HAND_MEASURED, verbatim up to the next `## ` heading or the end ('' if none)."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\r\n") == HAND_MEASURED), None)
    if start is None:
        return ""
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "".join(lines[start:end])


def write_results(path: str | Path, text: str) -> str:
    """Writes `text` to `path`, followed by the hand-measured section of the file it replaces (a rerun keeps
    it); returns what it wrote."""
    path = Path(path)
    kept = hand_measured(path.read_text()) if path.exists() else ""
    if kept:
        text = text.rstrip() + "\n\n" + kept.rstrip("\n") + "\n"
    path.write_text(text)
    return text
