"""The folds of cv: every patient validated once, no fold empty."""

import pytest

from engine.config.loading import load_config
from engine.config.schema import DataConfig
from engine.data.prepare import load_splits
from engine.data.split import patient_of, split
from engine.utils.errors import CT3DError

PATTERN = DataConfig().patient_pattern


@pytest.mark.parametrize("stratify", [False, True])
def test_folds_put_every_patient_on_exactly_one_validation_side(tiny_demo, stratify):
    patients = {patient_of(it, PATTERN) for it in load_splits(DataConfig(train=str(tiny_demo)))[0]
                + load_splits(DataConfig(train=str(tiny_demo)))[1]}
    sides = []
    for k in range(3):
        train, val, _ = load_splits(DataConfig(train=str(tiny_demo), folds=3, fold=k, stratify=stratify))
        assert {patient_of(it, PATTERN) for it in train}.isdisjoint({patient_of(it, PATTERN) for it in val})
        sides.append([patient_of(it, PATTERN) for it in val])
    every = [p for side in sides for p in side]
    assert sorted(every) == sorted(patients) and all(sides)  # each patient validated once, no fold empty
    with pytest.raises(CT3DError, match="data.fold: must be below data.folds=3"):
        load_config(None, [f"data.train={tiny_demo}", "data.folds=3", "data.fold=3"])


def test_no_fold_is_empty_even_when_few_patients_draw_unevenly(tmp_path):
    from engine.data.split import split

    items = [{"image": str(i), "name": str(i), "label": [float(i % 2)]} for i in range(5)]
    sides = [split(items, 0.2, seed=s, folds=5, fold=k)[1] for s in range(20) for k in range(5)]
    assert all(len(val) == 1 for val in sides)  # five patients, five folds: one each, whatever the draw


@pytest.mark.parametrize("stratify", [False, True])
def test_folds_are_even_at_sixty_patients_whatever_the_seed(stratify):
    """60 patients in 5 folds: every fold within one patient of 12 for every seed (by hashing alone the smallest
    fold held 3), stratified too."""
    items = [{"image": f"v{i}", "name": f"p{i}_a_1", "label": [float(i % 4 == 0), float(i % 7 == 0)]}
             for i in range(60)]
    for seed in range(20):
        sizes = [len(split(items, 0.2, seed=seed, folds=5, fold=k)[1]) for k in range(5)]
        assert sum(sizes) == 60 and min(sizes) >= 11 and max(sizes) <= 13, (seed, sizes)
