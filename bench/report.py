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

TABLE, RAW = "| figure | measured | target | |", "| name | value |"  # the two tables' header rows
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


def raw_value(v) -> str:
    if isinstance(v, list):
        return ", ".join(f"{x:.4g}" for x in v)
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown(f: dict, families: list[ModuleType], cfg: dict, smoke: bool, seconds: float) -> str:
    table = "\n".join(f"| {name} | {value} | {target} | {status} |" for name, value, target, status
                      in results(f, families))
    raw = "\n".join(f"| {k} | {raw_value(v)} |" for k, v in f.items())
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

{TABLE}
|---|---|---|---|
{table}

{notes(f, families)}

Raw figures (seconds per epoch, bytes):

{RAW}
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


def merge_results(path: str | Path, f: dict, families: list[ModuleType], chosen: list[str], cfg: dict, smoke: bool,
                  seconds: float) -> str:
    """`--only`: the chosen families' rows into the results file at `path`, the other families' rows kept. A row
    replaces the old row of the same figure, else joins the end of the table; raw figures likewise, by name; a line
    under the header says what was measured when (the date, machine, sizes and notes above are the last full
    run's). Without a results file to merge into, the whole file is written. Returns what it wrote."""
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    if TABLE not in old.splitlines():
        return write_results(path, markdown(f, families, cfg, smoke, seconds))
    lines = _merged(old.splitlines(), TABLE, [(f"| {r[0]} | ", "| " + " | ".join(r) + " |") for r in
                                              results(f, families)])
    lines = _merged(lines, RAW, [(f"| {k} | ", f"| {k} | {raw_value(v)} |") for k, v in f.items()])
    label = f"- Updated by `python -m bench --only {','.join(chosen)}`"
    stamp = f"{label}: {date.today().isoformat()}, took {seconds:.0f} s; {machine()}"
    lines = [line for line in lines if not line.startswith(label + ":")]
    at = max(i for i, line in enumerate(lines[:lines.index(TABLE)]) if line.startswith("- ")) + 1
    path.write_text("\n".join([*lines[:at], stamp, *lines[at:]]) + "\n")
    return path.read_text()


def _merged(lines: list[str], header: str, new: list[tuple[str, str]]) -> list[str]:
    """The table under `header` with each (prefix, line) of `new` replacing the row that starts with its prefix,
    or appended to it."""
    start = lines.index(header) + 2  # below the header and its |---| line
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    rows = lines[start:end]
    for prefix, line in new:
        at = next((i for i, old in enumerate(rows) if old.startswith(prefix)), None)
        if at is None:
            rows.append(line)
        else:
            rows[at] = line
    return [*lines[:start], *rows, *lines[end:]]
