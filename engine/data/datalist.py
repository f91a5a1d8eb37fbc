"""Datalists: CT-RATE style CSV or MONAI JSON, parsed into items and checked before any training.

Every problem found is reported at once, each with its file and row."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from engine.config.schema import DataConfig
from engine.data.items import IMAGE, LABEL, NAME, PATIENT, RELATIVE, VOLUME_SUFFIXES, WHERE, Problem, format_problems
from engine.utils.errors import CT3DError


@dataclass
class Datalist:
    items: list[dict]  # {"image": path, "label": list[float], "name": str}
    labels: list[str]  # output names, in model output order


def resolve_image(name: str, root: Path, layout: str) -> Path:
    """Path of a volume; `ct-rate` maps train_1_a_1.nii.gz to train/train_1/train_1_a/<name>."""
    path = Path(name)
    if path.is_absolute():
        return path
    if layout == "ct-rate":
        parts = name.split(".")[0].split("_")
        if len(parts) >= 4:
            split_id = f"{parts[0]}_{parts[1]}"
            return root / parts[0] / split_id / f"{split_id}_{parts[2]}" / name
    return root / path


def could_be_series(image: Path) -> bool:
    """`<folder>/<series>` names one DICOM series of a folder that holds several (checked when read)."""
    return not image.name.lower().endswith(VOLUME_SUFFIXES) and image.parent.is_dir()


def _label_vector(raw, data: DataConfig, n_outputs: int) -> list[float]:
    """0/1 floats per output (one-hot for multiclass); raises ValueError with what was wrong."""
    if data.task == "multiclass":
        value = float(raw[0] if isinstance(raw, list) and len(raw) == 1 else raw)
        if not value.is_integer() or not 0 <= value < data.num_classes:
            raise ValueError(f"class index {raw!r} is not an integer in 0..{data.num_classes - 1}")
        return [1.0 if i == int(value) else 0.0 for i in range(data.num_classes)]
    values = raw if isinstance(raw, list) else [raw]
    if len(values) != n_outputs:
        raise ValueError(f"expected {n_outputs} label values, got {len(values)}")
    out = []
    for v in values:
        f = float(v)
        if math.isnan(f) or f not in (0.0, 1.0):
            raise ValueError(f"label value {v!r} is not 0 or 1")
        out.append(f)
    return out


def _read_csv(path: Path, data: DataConfig) -> tuple[list[tuple[int, str, object, str]], list[str]]:
    """The rows of a CSV datalist: UTF-8, with or without the byte-order mark Excel writes."""
    try:
        return _csv_rows(path, data)
    except UnicodeDecodeError as exc:
        raise CT3DError(f"{path}: not UTF-8 at byte {exc.start} ({exc.object[exc.start:exc.start + 1]!r}); save it "
                        f"as UTF-8 (Excel: \"CSV UTF-8\")") from None


def _csv_rows(path: Path, data: DataConfig) -> tuple[list[tuple[int, str, object, str]], list[str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        twice = sorted({c for c in columns if columns.count(c) > 1})
        if twice:
            raise CT3DError(f"{path}: column(s) {', '.join(map(repr, twice))} appear more than once in the header")
        if data.image_column not in columns:
            raise CT3DError(f"{path}: no image column {data.image_column!r} (columns: {', '.join(columns)}); "
                            f"set data.image_column")
        if data.patient_column and data.patient_column not in columns:
            raise CT3DError(f"{path}: no patient column {data.patient_column!r} (columns: {', '.join(columns)}); "
                            f"set data.patient_column")
        others = (data.image_column, data.patient_column)
        label_cols = list(data.label_columns) or [c for c in columns if c not in others]
        missing = [c for c in label_cols if c not in columns]
        if missing:
            raise CT3DError(f"{path}: label column(s) {', '.join(map(repr, missing))} missing "
                            f"(columns: {', '.join(columns)}); check data.label_columns")
        if not label_cols:
            raise CT3DError(f"{path}: no label columns besides {data.image_column!r}")
        rows = []
        for line, row in enumerate(reader, start=2):  # line 1 is the header
            if None in row or None in row.values():  # more fields than the header, or fewer
                raise CT3DError(f"{path} row {line}: {len(columns) + len(row.get(None) or [])} fields where the "
                                f"header has {len(columns)}" if None in row else
                                f"{path} row {line}: fewer fields than the header's {len(columns)}")
            raw = [row[c] for c in label_cols]
            patient = (row[data.patient_column] or "").strip() if data.patient_column else ""
            rows.append((line, (row[data.image_column] or "").strip(), raw if data.task != "multiclass" else raw[0],
                         patient))
    if data.task == "multiclass" and len(label_cols) != 1:
        raise CT3DError(f"{path}: multiclass takes one label column of class indices, got {label_cols}")
    return rows, label_cols


def _read_json(path: Path, data: DataConfig, json_key: str) -> list[tuple[int, str, object, str]]:
    try:
        lists = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise CT3DError(f"{path}: not UTF-8 at byte {exc.start}; save it as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise CT3DError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(lists, dict):
        raise CT3DError(f"{path}: a MONAI JSON datalist is an object of lists ({{\"{json_key}\": [...]}}), "
                        f"not a {type(lists).__name__}")
    if json_key not in lists:
        raise CT3DError(f"{path}: no {json_key!r} list (keys: {', '.join(map(str, lists))})")
    if not isinstance(lists[json_key], list):
        raise CT3DError(f"{path}: {json_key!r} is a {type(lists[json_key]).__name__}, not a list of "
                        f"{{\"image\": ..., \"label\": ...}} entries")
    rows = []
    for index, entry in enumerate(lists[json_key]):
        if not isinstance(entry, dict) or IMAGE not in entry or LABEL not in entry:
            rows.append((index, "", None, ""))
            continue
        rows.append((index, str(entry[IMAGE]), entry[LABEL], str(entry.get(data.patient_column or "patient", ""))))
    return rows


def load_datalist(path: str | Path, data: DataConfig, json_key: str = "training",
                  problems: list[Problem] | None = None) -> Datalist:
    """Items of a CSV or JSON datalist, every volume checked to exist and every label to be in range.
    Bad rows raise one CT3DError listing them all, or, given a `problems` list, are appended to it
    and left out."""
    path = Path(path)
    if not path.is_file():
        raise CT3DError(f"datalist {path}: no such file")
    collect = problems is not None
    problems = problems if collect else []
    if path.suffix.lower() == ".json":
        rows = _read_json(path, data, json_key)
        where = "entry"
        n_out = len(data.label_columns) or next((len(r[2]) for r in rows if isinstance(r[2], list)), 1)
        names = list(data.label_columns) or [f"label_{i}" for i in range(n_out)]
    else:
        rows, names = _read_csv(path, data)
        where = "row"
    if data.task == "multiclass":
        names = [f"class_{i}" for i in range(data.num_classes)]
    n_outputs = 1 if data.task == "binary" else len(names)
    if data.task == "binary" and len(names) != 1:
        raise CT3DError(f"{path}: binary takes one label column, found {names}; set data.label_columns")
    if not rows:
        raise CT3DError(f"{path}: the datalist is empty")

    root = Path(data.image_root) if data.image_root else path.parent
    items, seen, found = [], {}, len(problems)
    for index, name, raw, patient in rows:
        at = f"{path} {where} {index}"
        if not name or raw is None:
            problems.append(Problem(at, "needs an image and a label", name))
            continue
        bad = False
        if name in seen:
            problems.append(Problem(at, f"duplicate volume {name!r} (also {where} {seen[name]})", name))
            bad = True
        seen.setdefault(name, index)
        image = resolve_image(name, root, data.layout)
        if not image.exists() and not could_be_series(image):
            problems.append(Problem(at, f"volume {image} does not exist", name))
            bad = True
        try:
            label = _label_vector(raw, data, n_outputs)
        except (TypeError, ValueError) as exc:
            problems.append(Problem(at, f"({name}) {exc}", name))
            continue
        if not bad:
            item = {IMAGE: str(image), LABEL: label, NAME: name, WHERE: at, PATIENT: patient}
            if data.image_root and image.is_relative_to(root):
                item[RELATIVE] = image.relative_to(root).as_posix()
            items.append(item)
    if not collect and len(problems) > found:
        raise CT3DError(f"{len(problems)} problem(s) in datalist {path}:\n  " + format_problems(problems))
    return Datalist(items=items, labels=names)


def label_frequencies(items: list[dict]) -> list[float]:
    """Fraction of positives per output, for pos_weight."""
    n = len(items)
    return [sum(it[LABEL][j] for it in items) / n for j in range(len(items[0][LABEL]))]
