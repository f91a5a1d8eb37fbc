"""data.metadata: per-volume rescale and spacing from CSVs (CT-RATE's metadata files: one for training, one
for validation), for volumes stored as raw scanner values. Each item gets its [slope, intercept] and
[x, y, z] spacing; the preprocessing applies them before the HU window (preprocess.py, ApplyMetadatad)."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

from engine.data.items import NAME, PIXDIM, RESCALE, WHERE, Problem, format_problems
from engine.utils.errors import CT3DError

COLUMNS = ("VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing")


def _numbers(text: str) -> list[float]:
    """'[0.75, 0.75]', '0.75 0.75', '(0.7,0.7)' or '1.5' -> floats."""
    values = [float(v) for v in re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", text or "")]
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{text!r} is not a number or a list of numbers")
    return values


def read_metadata(path: str | Path) -> dict[str, tuple[list[float], list[float]]]:
    """VolumeName -> ([slope, intercept], [x, y, z] mm). A bad row raises, naming it."""
    path = Path(path)
    if not path.is_file():
        raise CT3DError(f"config error: data.metadata: {path}: no such file")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise CT3DError(f"data.metadata {path}: column(s) {', '.join(missing)} missing "
                            f"(expected {', '.join(COLUMNS)})")
        table = {}
        for line, row in enumerate(reader, start=2):
            try:
                slope, intercept = _numbers(row["RescaleSlope"])[0], _numbers(row["RescaleIntercept"])[0]
                xy, z = _numbers(row["XYSpacing"]), _numbers(row["ZSpacing"])[0]
                if slope == 0 or min(xy + [z]) <= 0:
                    raise ValueError("needs a non-zero slope and positive spacings")
            except ValueError as exc:
                raise CT3DError(f"data.metadata {path} row {line} ({row['VolumeName']}): {exc}") from None
            table[row["VolumeName"].strip()] = ([slope, intercept], [xy[0], xy[-1], z])
    return table


def _files(paths: list[str] | str | Path) -> list[str | Path]:
    """data.metadata's files: one path or a list of them."""
    return [paths] if isinstance(paths, (str, Path)) else list(paths)


def read_tables(paths: list[str] | str | Path) -> dict[str, tuple[list[float], list[float]]]:
    """Every file's rows as one table; a volume in two files with different values raises, naming both."""
    table: dict[str, tuple[list[float], list[float]]] = {}
    origin: dict[str, str] = {}
    for path in _files(paths):
        for name, entry in read_metadata(path).items():
            if name in table and table[name] != entry:
                raise CT3DError(f"data.metadata: {name} has different rows in {origin[name]} and {path}")
            table[name], origin[name] = entry, str(path)
    return table


def attach_metadata(paths: list[str] | str | Path, lists: tuple[list[dict], ...], problems: list[Problem] | None = None
                    ) -> tuple[list[dict], ...]:
    """Each list's items with their metadata, looked up in every file of `paths`. A volume without a row is a
    problem naming the files (raised at once when `problems` is None, else appended and the item left out)."""
    table = read_tables(paths)
    where = ", ".join(map(str, _files(paths)))
    found: list[Problem] = []
    out = []
    for items in lists:
        kept = []
        for item in items:
            entry = table.get(item[NAME]) or table.get(Path(item[NAME]).name)
            if entry is None:
                found.append(Problem(item.get(WHERE, item[NAME]), f"{item[NAME]} has no row in data.metadata ({where})",
                                     item[NAME]))
                continue
            kept.append({**item, RESCALE: entry[0], PIXDIM: entry[1]})
        out.append(kept)
    if found and problems is None:
        raise CT3DError(f"{len(found)} volume(s) without metadata:\n  {format_problems(found)}")
    if problems is not None:
        problems += found
    return tuple(out)
