"""The patient-wise split: disjoint, repeatable, stable when rows are added, stratified; the patient pattern."""

import pytest

from engine.config.schema import DataConfig
from engine.data.datalist import label_frequencies
from engine.data.split import split
from engine.utils.errors import CT3DError
from helpers import make_csv

LABELS = ["Lung nodule", "Emphysema"]


def test_seeded_split_is_disjoint_and_repeatable():
    items = [{"image": str(i), "label": [float(i % 2)], "name": str(i)} for i in range(400)]
    train, val = split(items, 0.2, seed=3)
    assert 60 <= len(val) <= 100 and len(train) + len(val) == 400  # each patient drawn with probability 0.2
    assert {it["name"] for it in train}.isdisjoint({it["name"] for it in val})
    assert split(items, 0.2, seed=3) == (train, val) and split(items, 0.2, seed=4) != (train, val)
    assert label_frequencies(items) == [0.5]


def test_adding_rows_keeps_every_existing_patients_side():
    def items(n: int) -> list[dict]:  # two volumes per patient
        return [{"image": f"p{i // 2}_{i}", "label": [0.0], "name": f"p{i // 2}_{i}"} for i in range(n)]

    def sides(n: int) -> dict[str, str]:
        train, val = split(items(n), 0.2, seed=7, patient_of=lambda it: it["name"].split("_")[0])
        return {**{it["name"]: "train" for it in train}, **{it["name"]: "val" for it in val}}

    before, after = sides(300), sides(500)
    assert all(after[name] == side for name, side in before.items())
    assert {after[f"p{i}_{2 * i}"] for i in range(150)} == {"train", "val"}  # both sides used


def test_stratify_gives_each_label_positives_on_both_sides():
    # 12 labels, each positive in exactly two patients: a 20% draw leaves most labels without a
    # validation positive; stratification moves the fewest patients to give every label both sides
    items = [{"image": str(i), "name": str(i), "label": [float(i // 2 == j) for j in range(12)]} for i in range(24)]
    items += [{"image": f"n{i}", "name": f"n{i}", "label": [0.0] * 12} for i in range(76)]

    def positives_on_both_sides(stratify: bool) -> int:
        train, val = split(items, 0.2, seed=0, stratify=stratify)
        return sum(any(it["label"][j] for it in train) and any(it["label"][j] for it in val) for j in range(12))

    assert positives_on_both_sides(False) < 12
    assert positives_on_both_sides(True) == 12


def test_patient_pattern_that_matches_no_volume_is_an_error(tmp_path):
    from engine.data.prepare import load_splits

    path = make_csv(tmp_path, [f"case{i}.nii.gz,{i % 2},0" for i in range(6)])
    with pytest.raises(CT3DError, match=r"data.patient_pattern.*matches none of the 6 volume names.*case0.nii.gz"):
        load_splits(DataConfig(train=str(path)))
    train, val = load_splits(DataConfig(train=str(path), patient_pattern=""))[:2]  # each volume its own patient
    assert len(train) + len(val) == 6


def test_one_file_under_two_spellings_is_caught_in_training_validation_and_test(tmp_path):
    """Absolute in one list, relative with `..` in the other, or through a link: one file, trained on and
    validated on (or trained twice, or in the held-out test set too)."""
    import os

    from engine.data.items import IMAGE, NAME, WHERE
    from engine.data.split import leakage_problems, split_problems

    (tmp_path / "scans").mkdir()
    volume = tmp_path / "scans" / "a.nii.gz"
    volume.write_bytes(b"x")
    os.symlink(volume, tmp_path / "link.nii.gz")

    def item(name: str, path: str, where: str) -> dict:
        return {IMAGE: path, NAME: name, WHERE: where, "label": [1.0]}

    train = [item("p1_a", str(volume), "train.csv row 2"), item("p2_a", str(tmp_path / "other.nii.gz"), "row 3")]
    val = [item("p3_a", str(tmp_path / "scans" / ".." / "scans" / "a.nii.gz"), "val.csv row 2")]
    problems = split_problems(train, val, r"^(p\d+)_")
    assert len(problems) == 1 and "p3_a is the same file as p1_a (train.csv row 2)" in str(problems[0])
    twice = split_problems([*train, item("p4_a", str(tmp_path / "link.nii.gz"), "row 4")], [val[0]], r"^(p\d+)_")
    assert sum("p4_a is the same file as p1_a" in str(p) for p in twice) == 1
    test = [item("p9_a", str(tmp_path / "link.nii.gz"), "test.csv row 2")]
    assert any("volume p9_a is also in training or validation" in str(p)
               for p in leakage_problems(train, [], test, r"^(p\d+)_"))
    assert split_problems(train, [item("p5_a", str(tmp_path / "new.nii.gz"), "v")], r"^(p\d+)_") == []
