"""Who goes where: the patient id of a volume, the stable train/validation split (a patient's side depends on
its id and the seed alone; optional stratification), the folds of `cv`, the held-out test patients
(data.test_fraction: never trained or validated on, scored once at the end: the figures to publish), and the
problems a split can have (empty sides, a patient on both, a test patient seen in training). Each rank's share
of a side is dealt by sharing.py."""

from __future__ import annotations

import hashlib
import os
import re
from typing import Callable

from engine.config.schema import DataConfig
from engine.data.items import IMAGE, LABEL, NAME, PATIENT, WHERE, Problem
from engine.utils.errors import CT3DError


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
    return problems + same_files(train + val)


def file_identity(item: dict) -> str:
    """The volume's file with links, `..` and relative spellings resolved: one file listed two ways is one file."""
    return os.path.realpath(item[IMAGE])


def same_files(items: list[dict]) -> list[Problem]:
    """Rows naming one file under two spellings (absolute and relative, a link, `..`): trained on twice, or
    trained and validated on alike."""
    first: dict[str, dict] = {}
    problems = []
    for it in (it for it in items if IMAGE in it):
        other = first.setdefault(file_identity(it), it)
        if other is not it:
            problems.append(Problem(it.get(WHERE, it[NAME]), f"{it[NAME]} is the same file as {other[NAME]} "
                                    f"({other.get(WHERE, '')}): {file_identity(it)}"))
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
    """Each patient's fold from its rank in draw order (draw: (patient, seed) alone): the i-th of n patients
    goes to fold i * folds // n, so folds differ in size by at most one patient (int(draw * folds) left
    60 patients in 5 folds with as few as 3 in one) and a new patient moves only patients near the folds'
    boundaries. With `stratify`, the positive patients of each label (rarest label first) are dealt to the
    folds holding fewest of that label's positives so far (in draw order), then the rest, in draw order, to
    the smallest folds: every fold gets positives of every label with at least `folds` positive patients and
    the folds stay even, at the cost of stability when rows are added."""
    ranked = sorted(groups, key=draw.__getitem__)
    if not stratify:
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
    for patient in ranked:
        if patient not in assigned:
            k = min(range(folds), key=lambda k: (sizes[k], k))
            assigned[patient] = k
            sizes[k] += 1
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


def carve_test(items: list[dict], fraction: float, seed: int, patient: Callable[[dict], str]
               ) -> tuple[list[dict], list[dict]]:
    """(the rest, the test set): the patients whose draw, fixed by (patient, seed) alone and independent of the
    validation draw, is below `fraction`; at least one patient each side when `fraction` > 0."""
    if fraction <= 0:
        return items, []
    patients = sorted({patient(it) for it in items})
    draw = {p: side_draw(p, f"test\0{seed}") for p in patients}
    test = {p for p in patients if draw[p] < fraction} or {min(patients, key=draw.__getitem__)}
    if len(test) == len(patients):
        test.discard(max(patients, key=draw.__getitem__))
    return [it for it in items if patient(it) not in test], [it for it in items if patient(it) in test]


def leakage_problems(train: list[dict], val: list[dict], test: list[dict], pattern: str) -> list[Problem]:
    """A test patient (or volume) also in training or validation: the test set would not be held out."""
    seen = {patient_of(it, pattern) for it in train + val}
    names, files = {it[NAME] for it in train + val}, {file_identity(it) for it in train + val if IMAGE in it}
    shared = sorted({patient_of(it, pattern) for it in test if patient_of(it, pattern) in seen})
    twice = sorted(it[NAME] for it in test if it[NAME] in names or IMAGE in it and file_identity(it) in files)
    problems = [Problem("test split", f"patient {p} is also in training or validation") for p in shared[:20]]
    return problems + [Problem("test split", f"volume {v} is also in training or validation") for v in twice[:20]]
