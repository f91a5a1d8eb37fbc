"""The held-out test set: carved by patient, never trained or validated on, scored once at the end with the
selected checkpoint, thresholds and calibration, with BCa intervals; leakage into it refused."""

import json

import pytest

from engine.config.loading import load_config
from engine.data.held_out import carve_test
from engine.data.prepare import read_split
from engine.training.workflow import train
from engine.utils.errors import CT3DError
from helpers import tiny_overrides


def test_a_run_with_a_test_fraction_writes_the_test_block_from_patients_it_never_saw(tmp_path, tiny_demo):
    folder = train(load_config(None, tiny_overrides(tmp_path, tiny_demo, "data.test_fraction=0.25",
                                                    "metrics.calibrate=true", "metrics.bootstrap=200")))
    summary = json.loads((folder / "summary.json").read_text())
    test = summary["test"]
    seen = {row["patient"] for row in read_split(folder / "split.csv").values()}
    header, *rows = tiny_demo.read_text().splitlines()
    every = {line.split(",")[0].rsplit("_", 2)[0] for line in rows}  # train_12_a_1.nii.gz -> train_12
    assert test["volumes"] == summary["test_volumes"] > 0 and test["patients"] == len(every - seen)
    assert summary["train_volumes"] + summary["val_volumes"] + summary["test_volumes"] == len(rows)
    assert test["bootstrap"]["method"] == "BCa" and set(test["bootstrap"]["intervals"]) >= {"auc_macro"}
    assert test["thresholds"] == summary["thresholds"] and test["calibration"]["scale"] == \
        summary["calibration"]["scale"]  # the selection's decisions, applied as they are
    page = (folder / "report.html").read_text()
    assert "Held-out test set: the figures to publish" in page and "selection set" in page
    assert "selection_set" in summary


def test_carved_test_patients_depend_on_the_patient_and_seed_alone():
    items = [{"name": f"p{i}_{k}", "patient": f"p{i}"} for i in range(200) for k in range(2)]
    rest, test = carve_test(items, 0.2, seed=0, patient=lambda it: it["patient"])
    patients = {it["patient"] for it in test}
    assert 25 <= len(patients) <= 55 and not patients & {it["patient"] for it in rest}
    _, fewer = carve_test(items[:300], 0.2, seed=0, patient=lambda it: it["patient"])  # rows removed
    assert {it["patient"] for it in fewer} == patients & {it["patient"] for it in items[:300]}


def test_a_test_datalist_that_shares_patients_with_training_is_refused(tmp_path, tiny_demo):
    cfg = load_config(None, tiny_overrides(tmp_path, tiny_demo, f"data.test={tiny_demo}"))
    with pytest.raises(CT3DError, match="test split: patient train_\\d+ is also in training or validation"):
        train(cfg)
