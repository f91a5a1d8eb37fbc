"""The held-out test set (data.test, or data.test_fraction of the patients): volumes training never looks at,
scored once at the end with the checkpoint, thresholds and calibration chosen on validation. Its figures
are the ones to publish; validation's are the selection set's (optimistic: chosen on it)."""

from __future__ import annotations

from typing import Callable

from engine.config.schema import DataConfig
from engine.data.datalist import load_datalist
from engine.data.items import NAME, Problem
from engine.data.metadata import attach_metadata
from engine.data.split import patient_of, side_draw

JSON_TEST_KEY = "test"  # a JSON datalist's list of held-out items (each with an image and a label)


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


def load_test(data: DataConfig, carved: list[dict], problems: list[Problem] | None = None) -> list[dict]:
    """The test items: data.test's datalist (its labels as the training datalist's), or the items
    data.test_fraction `carved` out of the training datalist; with data.metadata, each with its rescale and
    spacing."""
    items = load_datalist(data.test, data, JSON_TEST_KEY, problems).items if data.test else carved
    if items and data.metadata:
        (items,) = attach_metadata(data.metadata, (items,), problems)
    return items


def leakage_problems(train: list[dict], val: list[dict], test: list[dict], pattern: str) -> list[Problem]:
    """A test patient (or volume) also in training or validation: the test set would not be held out."""
    seen = {patient_of(it, pattern) for it in train + val}
    names = {it[NAME] for it in train + val}
    shared = sorted({patient_of(it, pattern) for it in test if patient_of(it, pattern) in seen})
    twice = sorted(it[NAME] for it in test if it[NAME] in names)
    problems = [Problem("test split", f"patient {p} is also in training or validation") for p in shared[:20]]
    return problems + [Problem("test split", f"volume {v} is also in training or validation") for v in twice[:20]]
