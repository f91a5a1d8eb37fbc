"""The split's rules against their definitions, computed here from hashlib and the documented rules: the draw
(sha256 of "seed\\0patient", first 8 bytes big-endian over 2^64), the validation side (draw < fraction, the
lowest draw when none is, never every patient), even folds by draw rank, stratified folds and the held-out
test carve-out, the patient id, the split problems."""

import hashlib

import pytest

from engine.config.schema import DataConfig
from engine.data.split import (
    _stratify,
    carve_test,
    check_patient_pattern,
    fold_of,
    patient_of,
    side_draw,
    split,
    split_problems,
)
from engine.utils.errors import CT3DError


def draw_of(patient: str, seed) -> float:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{patient}".encode()).digest()[:8], "big") / 2.0**64


def volumes(n: int, per_patient: int = 1, labels=lambda i: [0.0]) -> list[dict]:
    return [{"image": f"p{i}_{v}", "name": f"p{i}_{v}", "label": labels(i)} for i in range(n)
            for v in range(per_patient)]


def by_patient(item: dict) -> str:
    return item["name"].split("_")[0]


def val_patients(items, fraction, seed, **kwargs) -> set[str]:
    return {by_patient(it) for it in split(items, fraction, seed, patient_of=by_patient, **kwargs)[1]}


def test_the_draw_is_sha256_of_seed_and_patient():
    for patient, seed in (("train_1", 0), ("p7", 3), ("x", "test\x001")):
        assert side_draw(patient, seed) == draw_of(patient, seed)


def test_validation_is_the_patients_drawn_below_the_fraction_at_its_edges_too():
    items = volumes(30, per_patient=2)
    draws = sorted((draw_of(f"p{i}", 5), f"p{i}") for i in range(30))
    middle = draws[10][0]  # a patient drawn exactly at the fraction stays in training (draw < fraction)
    assert val_patients(items, middle, 5) == {p for _, p in draws[:10]}
    assert val_patients(items, draws[0][0] / 2, 5) == {draws[0][1]}  # none below: the lowest draw crosses
    assert val_patients(items, 1.0, 5) == {p for _, p in draws[:-1]}  # all below: the highest stays
    assert len(val_patients(volumes(2), 0.5, 0)) == 1  # two patients: one each side
    with pytest.raises(CT3DError, match="cannot split 1 volume"):
        split(volumes(1), 0.5, 0)
    with pytest.raises(CT3DError, match="into 3 folds"):
        split(volumes(2), 0.5, 0, folds=3)


def test_split_defaults_to_no_stratification_and_fold_zero():
    items = volumes(40, labels=lambda i: [float(i < 2)])  # two positive patients
    plain = val_patients(items, 0.2, 1, stratify=False)
    assert val_patients(items, 0.2, 1) == plain
    ranked = [p for _, p in sorted((draw_of(f"p{i}", 1), f"p{i}") for i in range(40))]
    assert val_patients(items, 0.2, 1, folds=4) == set(ranked[:10])  # fold 0: the lowest quarter of draws
    groups = {f"p{i}": [i] for i in range(40)}
    stratified = fold_of(items, groups, {p: draw_of(p, 1) for p in groups}, 4, stratify=True)
    for k in range(4):  # split(stratify=True, folds) is fold_of's stratified assignment
        assert val_patients(items, 0.2, 1, folds=4, fold=k, stratify=True) == {p for p, f in stratified.items()
                                                                              if f == k}


def test_unstratified_folds_deal_patients_by_draw_rank():
    items = volumes(23)
    groups = {f"p{i}": [i] for i in range(23)}
    draw = {p: draw_of(p, 2) for p in groups}
    ranked = sorted(groups, key=draw.get)
    assert fold_of(items, groups, draw, 4, stratify=False) == {p: i * 4 // 23 for i, p in enumerate(ranked)}


def stratified_by_the_rule(items, groups, draw, folds):
    """The docstring's rule, written out: rarest label first, each positive patient (in draw order) to the
    fold with fewest of that label's positives, ties to the fewest patients, then the lowest fold; the rest, in
    draw order, to the fold with fewest patients."""
    ranked = sorted(groups, key=draw.get)
    n = len(items[0]["label"])
    positive = [[p for p in ranked if any(items[i]["label"][j] for i in groups[p])] for j in range(n)]
    fold, size = {}, [0] * folds
    for j in sorted(range(n), key=lambda j: (len(positive[j]), j)):
        count = [sum(1 for p in positive[j] if fold.get(p) == k) for k in range(folds)]
        for p in positive[j]:
            if p not in fold:
                k = min(range(folds), key=lambda k: (count[k], size[k], k))
                fold[p], count[k], size[k] = k, count[k] + 1, size[k] + 1
    for p in ranked:
        if p not in fold:
            k = min(range(folds), key=lambda k: (size[k], k))
            fold[p], size[k] = k, size[k] + 1
    return fold


@pytest.mark.parametrize("seed", range(6))
def test_stratified_folds_follow_the_rule_and_reach_every_fold(seed):
    items = volumes(37, labels=lambda i: [float(i % 3 == 0), float(i % 11 == 0), float(i in (4, 5, 6, 7, 8))])
    groups = {f"p{i}": [i] for i in range(37)}
    draw = {p: draw_of(p, seed) for p in groups}
    got = fold_of(items, groups, draw, 4, stratify=True)
    assert got == stratified_by_the_rule(items, groups, draw, 4)
    sizes = [sum(1 for k in got.values() if k == f) for f in range(4)]
    assert max(sizes) - min(sizes) <= 1
    for j in range(3):  # every label with >= 4 positive patients has positives in every fold
        folds_with = {got[f"p{i}"] for i in range(37) if items[i]["label"][j]}
        assert folds_with == set(range(4)), (j, folds_with)


def stratified(labels: dict[str, list[int]], draw: dict[str, float], val: set[str]) -> set[str]:
    items = [{"name": n, "label": [float(v) for v in labels[n]]} for n in labels]
    _stratify(items, {n: [i] for i, n in enumerate(labels)}, draw, val)
    return val


def test_stratify_moves_the_nearest_positive_to_the_side_without_one():
    """Label 0's positives (a, b) all drew training: the lowest-drawn crosses to validation. Label 1's (c, d)
    all drew validation: the highest-drawn crosses to training."""
    labels = {"a": [1, 0], "b": [1, 0], "c": [0, 1], "d": [0, 1], "f": [0, 0], "g": [0, 0]}
    draw = {"a": 0.5, "b": 0.4, "c": 0.15, "d": 0.1, "f": 0.05, "g": 0.7}
    assert stratified(labels, draw, {"c", "d", "f"}) == {"b", "d", "f"}
    assert stratified({"a": [1], "b": [0]}, {"a": 0.9, "b": 0.1}, {"b"}) == {"b"}  # one positive: left alone
    after_one = {"a": [1, 1], "b": [0, 1], "c": [0, 0]}  # label 0 (one positive) is skipped, label 1 still moves
    assert stratified(after_one, {"a": 0.5, "b": 0.4, "c": 0.1}, {"c"}) == {"b", "c"}
    assert stratified({"a": [1], "b": [1]}, {"a": 0.9, "b": 0.1}, {"b"}) == {"b"}  # all positive: left alone


def test_stratify_settles_a_move_that_empties_an_earlier_labels_side():
    """Label 1's move of x (its highest-drawn validation positive) to training leaves label 0, already
    checked in that pass, without a validation positive: the next pass gives it y, its lowest-drawn."""
    labels = {"x": [1, 1], "y": [1, 0], "z": [0, 1], "n1": [0, 0], "n2": [0, 0]}
    draw = {"x": 0.3, "y": 0.2, "z": 0.1, "n1": 0.05, "n2": 0.9}
    assert stratified(labels, draw, {"x", "z", "n1"}) == {"y", "z", "n1"}


def test_carve_test_takes_the_patients_drawn_below_the_fraction_under_its_own_seed():
    items = volumes(30, per_patient=2)
    draws = sorted((draw_of(f"p{i}", "test\x009"), f"p{i}") for i in range(30))

    def carved(fraction):
        rest, test = carve_test(items, fraction, 9, by_patient)
        assert len(rest) + len(test) == len(items) and not {by_patient(i) for i in rest} & {by_patient(i) for i in test}
        return {by_patient(it) for it in test}

    assert carve_test(items, 0.0, 9, by_patient) == (items, [])
    assert carved(draws[7][0]) == {p for _, p in draws[:7]}  # a draw at the fraction stays out
    assert carved(draws[0][0] / 2) == {draws[0][1]}
    assert carved(1.0) == {p for _, p in draws[:-1]}


def test_patient_id_from_the_column_the_pattern_or_the_name():
    pattern = DataConfig().patient_pattern
    assert patient_of({"name": "train_12_a_1.nii.gz", "patient": "P9"}, pattern) == "P9"
    assert patient_of({"name": "train_12_a_1.nii.gz", "patient": ""}, pattern) == "train_12"
    assert patient_of({"name": "train_12_a_1.nii.gz"}, "") == "train_12_a_1.nii.gz"
    assert patient_of({"name": "scan.nii.gz"}, r"scan") == "scan.nii.gz"  # a pattern without a group


def test_split_problems_name_each_patient_on_both_sides():
    pattern = r"(p\d+)_"
    train = [{"name": "p1_a", "where": "list.csv row 2"}, {"name": "p2_a"}]
    val = [{"name": "p1_b", "where": "list.csv row 4"}, {"name": "p3_a"}]
    problems = split_problems(train, val, pattern)
    assert [(p.where, p.message) for p in problems] == [
        ("list.csv row 4", "patient 'p1' is in validation (p1_b) and in training (p1_a)")]
    assert [(p.where, p.message) for p in split_problems([], val, pattern)] == [("train split", "is empty")]
    assert split_problems(train, [{"name": "p2_b"}], pattern)[0].where == "p2_b"  # no row: the volume's name


def test_a_pattern_matching_no_name_is_an_error_unless_patients_come_from_elsewhere():
    items = [{"name": f"case{i}.nii.gz"} for i in range(5)]
    data = DataConfig(patient_pattern=r"(p\d+)_")
    with pytest.raises(CT3DError, match=r"matches none of the 5 volume names \(e.g. case0.nii.gz, case1.nii.gz, "
                                        r"case2.nii.gz\)"):
        check_patient_pattern(items, data)
    check_patient_pattern(items, DataConfig(patient_pattern=""))
    check_patient_pattern(items, DataConfig(patient_pattern=r"(p\d+)_", patient_column="pid"))
    check_patient_pattern([], data)
    check_patient_pattern([{**items[0], "patient": "x"}, *items[1:]], data)
    check_patient_pattern([*items, {"name": "p1_a"}], data)
