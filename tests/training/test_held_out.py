"""The held-out test set: carved by patient, never trained or validated on, scored once at the end with the
selected checkpoint, thresholds and calibration, with BCa intervals; leakage into it refused."""

import json

import pytest

from engine.config.loading import load_config
from engine.data.run_split import read_split
from engine.data.split import carve_test
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
    from engine.training.outputs import summary_table

    table = summary_table(summary, summary["labels"]).splitlines()
    assert table[0].split() == ["best", "final", "test"]  # the closing table shows the figures to publish
    shown = next(r for r in table if r.startswith("fbeta_micro")).split()[3]
    assert shown == f"{test['metrics']['fbeta_micro']:.4f}"


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


def test_a_test_datalist_is_its_json_test_list_bad_rows_are_collected_and_metadata_applies(tmp_path):
    from engine.config.schema import DataConfig
    from engine.data.prepare import load_test

    for name in ("a.nii.gz", "b.nii.gz", "c.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"training": [{"image": "a.nii.gz", "label": [1]}],
                                    "test": [{"image": "b.nii.gz", "label": [0]},
                                             {"image": "gone.nii.gz", "label": [1]}]}))
    problems = []
    items = load_test(DataConfig(train=str(datalist), test=str(datalist)), [], problems)
    assert [it["name"] for it in items] == ["b.nii.gz"] and [p.name for p in problems] == ["gone.nii.gz"]
    metadata = tmp_path / "metadata.csv"
    metadata.write_text("VolumeName,RescaleSlope,RescaleIntercept,XYSpacing,ZSpacing\n"
                        'c.nii.gz,2,-1024,"[0.7, 0.7]",1.5\n')
    carved = [{"image": str(tmp_path / n), "name": n, "label": [0.0]} for n in ("c.nii.gz", "d.nii.gz")]
    problems = []
    items = load_test(DataConfig(metadata=[str(metadata)]), carved, problems)  # no data.test: the carved items
    assert [(it["name"], it["rescale"], it["pixdim"]) for it in items] == [("c.nii.gz", [2.0, -1024.0],
                                                                            [0.7, 0.7, 1.5])]
    assert len(problems) == 1 and "d.nii.gz" in problems[0].message
    assert load_test(DataConfig(), carved) == carved
