"""Datalists: CT-RATE style CSV or MONAI JSON, parsed into items and checked before any training.

Every problem found is reported at once, each with its file and row."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from engine.errors import CT3DError
from engine.schema import DataConfig

IMAGE, LABEL, NAME = "image", "label", "name"  # the keys every item carries
WHERE, PATIENT = "where", "patient"  # datalist file and row; patient id from data.patient_column
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")  # DICOM is found by content


@dataclass
class Problem:
    """One bad row, volume or split, named by file and row."""

    where: str
    message: str
    name: str = ""

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


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
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
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
            raw = [row[c] for c in label_cols]
            patient = (row[data.patient_column] or "").strip() if data.patient_column else ""
            rows.append((line, (row[data.image_column] or "").strip(), raw if data.task != "multiclass" else raw[0],
                         patient))
    if data.task == "multiclass" and len(label_cols) != 1:
        raise CT3DError(f"{path}: multiclass takes one label column of class indices, got {label_cols}")
    return rows, label_cols


def _read_json(path: Path, data: DataConfig, json_key: str) -> list[tuple[int, str, object, str]]:
    try:
        lists = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CT3DError(f"{path}: not valid JSON ({exc})") from None
    if json_key not in lists:
        raise CT3DError(f"{path}: no {json_key!r} list (keys: {', '.join(lists)})")
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
            items.append({IMAGE: str(image), LABEL: label, NAME: name, WHERE: at, PATIENT: patient})
    if not collect and len(problems) > found:
        raise CT3DError(f"{len(problems)} problem(s) in datalist {path}:\n  " + format_problems(problems))
    return Datalist(items=items, labels=names)


def format_problems(problems: list[Problem], limit: int = 20) -> str:
    shown = [str(p) for p in problems[:limit]]
    return "\n  ".join(shown + ([f"... and {len(problems) - limit} more"] if len(problems) > limit else []))


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


def side_draw(patient: str, seed: int) -> float:
    """A number in [0, 1) fixed by (patient, seed) alone: the patient goes to validation when it is below
    data.val_fraction, so adding or removing rows never moves another patient."""
    digest = hashlib.sha256(f"{seed}\0{patient}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def check_patient_pattern(items: list[dict], data: DataConfig) -> None:
    """A pattern that matches no volume name would make every volume its own patient without a word."""
    if data.patient_column or not data.patient_pattern or not items or any(it.get(PATIENT) for it in items):
        return
    if not any(re.match(data.patient_pattern, it[NAME]) for it in items):
        examples = ", ".join(it[NAME] for it in items[:3])
        raise CT3DError(f"config error: data.patient_pattern: {data.patient_pattern!r} matches none of the "
                        f"{len(items)} volume names (e.g. {examples}); give a regex whose first group is the "
                        f"patient id, data.patient_column, or data.patient_pattern='' if every volume is its "
                        f"own patient")


def split(items: list[dict], val_fraction: float, seed: int,
          patient_of: Callable[[dict], str] = lambda item: item[NAME],
          stratify: bool = False, folds: int = 0, fold: int = 0) -> tuple[list[dict], list[dict]]:
    """A seeded train/validation split by patient (all of a patient's volumes on one side), stable: each
    patient's side depends on (patient id, seed) alone. `stratify` then moves the fewest patients needed
    for each label to have positives on both sides (where it has two or more positive patients).
    With `folds` K >= 2, validation is fold `fold` of K patient-wise folds (see `fold_of`)."""
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(patient_of(item), []).append(i)
    if len(groups) < max(2, folds):
        raise CT3DError(f"cannot split {len(items)} volume(s) of {len(groups)} patient(s) into "
                        f"{f'{folds} folds' if folds else 'train and validation'}; give data.val")
    draw = {patient: side_draw(patient, seed) for patient in groups}
    if folds:
        assigned = fold_of(items, groups, draw, folds, stratify)
        val = {patient for patient, k in assigned.items() if k == fold}
        return ([it for it in items if patient_of(it) not in val], [it for it in items if patient_of(it) in val])
    val = {patient for patient in groups if draw[patient] < val_fraction}
    if not val:  # both sides need a patient: the nearest to each side's edge crosses
        val.add(min(groups, key=draw.__getitem__))
    if len(val) == len(groups):
        val.discard(max(groups, key=draw.__getitem__))
    if stratify:
        _stratify(items, groups, draw, val)
    return ([it for i, it in enumerate(items) if patient_of(it) not in val],
            [it for it in items if patient_of(it) in val])


def fold_of(items: list[dict], groups: dict[str, list[int]], draw: dict[str, float], folds: int,
            stratify: bool) -> dict[str, int]:
    """Each patient's fold: int(draw * folds), which depends on (patient, seed) alone. With `stratify`, the
    positive patients of each label (rarest label first) are dealt to the folds holding fewest of that
    label's positives so far (in draw order), then the rest by draw: every fold gets positives of every
    label with at least `folds` positive patients, at the cost of stability when rows are added."""
    if not stratify:
        assigned = {patient: min(int(draw[patient] * folds), folds - 1) for patient in groups}
        if len(set(assigned.values())) == folds:
            return assigned
        ranked = sorted(groups, key=draw.__getitem__)  # a fold drew no patient: deal them out evenly by draw
        return {patient: i * folds // len(ranked) for i, patient in enumerate(ranked)}
    n_labels = len(items[0][LABEL])
    positive = [[p for p in sorted(groups, key=draw.__getitem__) if any(items[i][LABEL][j] for i in groups[p])]
                for j in range(n_labels)]
    assigned: dict[str, int] = {}
    sizes = [0] * folds  # patients per fold so far
    for j in sorted(range(n_labels), key=lambda j: len(positive[j])):
        counts = [0] * folds
        for patient in positive[j]:
            if patient in assigned:
                counts[assigned[patient]] += 1
        for patient in positive[j]:
            if patient not in assigned:
                k = min(range(folds), key=lambda k: (counts[k], sizes[k], k))
                assigned[patient] = k
                counts[k] += 1
                sizes[k] += 1
    for patient in groups:
        assigned.setdefault(patient, min(int(draw[patient] * folds), folds - 1))
    return assigned


def _stratify(items: list[dict], groups: dict[str, list[int]], draw: dict[str, float], val: set[str]) -> None:
    """Per label, a side without a positive patient takes the positive patient nearest to it (by draw)."""
    n_labels = len(items[0][LABEL])
    for _ in range(3):  # a move can empty another label's side; a few passes settle it
        moved = False
        for j in range(n_labels):
            positive = [p for p, rows in groups.items() if any(items[i][LABEL][j] for i in rows)]
            if len(positive) < 2 or len(positive) == len(groups):
                continue
            in_val = [p for p in positive if p in val]
            if not in_val:
                val.add(min(positive, key=draw.__getitem__))
                moved = True
            elif len(in_val) == len(positive):
                val.discard(max(positive, key=draw.__getitem__))
                moved = True
        if not moved:
            return


def label_frequencies(items: list[dict]) -> list[float]:
    """Fraction of positives per output, for pos_weight."""
    n = len(items)
    return [sum(it[LABEL][j] for it in items) / n for j in range(len(items[0][LABEL]))]
