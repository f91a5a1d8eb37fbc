"""Datalists: CSV and JSON parsed into items, every problem named with its file and row."""

import json
from pathlib import Path

import pytest

from engine.config.schema import DataConfig, Task
from engine.data.datalist import load_datalist, resolve_image
from engine.utils.errors import CT3DError
from helpers import make_csv

LABELS = ["Lung nodule", "Emphysema"]


def problems_of(path: Path, spec: DataConfig | None = None) -> str:
    with pytest.raises(CT3DError) as info:
        load_datalist(path, spec or DataConfig())
    return str(info.value)


def test_ct_rate_csv_parses_labels_in_column_order(tmp_path):
    path = make_csv(tmp_path, ["a.nii.gz,1,0", "b.nii.gz,0,1"])
    datalist = load_datalist(path, DataConfig())
    assert datalist.labels == LABELS
    assert [it["label"] for it in datalist.items] == [[1.0, 0.0], [0.0, 1.0]]
    assert datalist.items[0]["image"] == str(tmp_path / "a.nii.gz")


def test_label_columns_select_and_order(tmp_path):
    path = make_csv(tmp_path, ["a.nii.gz,1,0"])
    datalist = load_datalist(path, DataConfig(label_columns=["Emphysema", "Lung nodule"]))
    assert datalist.labels == ["Emphysema", "Lung nodule"] and datalist.items[0]["label"] == [0.0, 1.0]


def test_missing_volume_names_file_and_row(tmp_path):
    path = make_csv(tmp_path, ["a.nii.gz,1,0", "gone.nii.gz,0,1"], create=False)
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    message = problems_of(path)
    assert "row 3" in message and "gone.nii.gz" in message and "does not exist" in message
    assert "row 2" not in message


@pytest.mark.parametrize("value", ["2", "x", "nan", "-1", ""])
def test_label_out_of_range_names_row(tmp_path, value):
    path = make_csv(tmp_path, ["a.nii.gz,1,0", f"b.nii.gz,{value},0"])
    message = problems_of(path)
    assert "row 3" in message and "b.nii.gz" in message


def test_every_problem_is_reported_at_once(tmp_path):
    path = make_csv(tmp_path, ["a.nii.gz,7,0", "b.nii.gz,0,1", "a.nii.gz,0,0"])
    (tmp_path / "b.nii.gz").unlink()
    message = problems_of(path)
    assert "3 problem(s)" in message
    assert "row 2" in message and "row 3" in message and "duplicate" in message


def test_missing_label_column_is_named(tmp_path):
    path = make_csv(tmp_path, ["a.nii.gz,1,0"])
    message = problems_of(path, DataConfig(label_columns=["Cardiomegaly"]))
    assert "'Cardiomegaly'" in message and "data.label_columns" in message


def test_missing_image_column_is_named(tmp_path):
    path = make_csv(tmp_path, ["a.nii.gz,1,0"], header="Volume,Lung nodule,Emphysema")
    assert "'VolumeName'" in problems_of(path)


def test_empty_datalist(tmp_path):
    assert "empty" in problems_of(make_csv(tmp_path, []))


def test_missing_datalist_file(tmp_path):
    assert "no such file" in problems_of(tmp_path / "none.csv")


def test_json_datalist_with_its_own_validation_list(tmp_path):
    for name in ("a.nii.gz", "b.nii.gz"):
        (tmp_path / name).write_bytes(b"x")
    path = tmp_path / "list.json"
    path.write_text(json.dumps({"training": [{"image": "a.nii.gz", "label": [1, 0, 1]}],
                                "validation": [{"image": "b.nii.gz", "label": [0, 0, 1]}]}))
    train = load_datalist(path, DataConfig())
    val = load_datalist(path, DataConfig(), "validation")
    assert train.labels == ["label_0", "label_1", "label_2"]
    assert train.items[0]["label"] == [1.0, 0.0, 1.0] and val.items[0]["label"] == [0.0, 0.0, 1.0]


def test_json_bad_label_names_entry(tmp_path):
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    path = tmp_path / "list.json"
    path.write_text(json.dumps({"training": [{"image": "a.nii.gz", "label": [1, 0]}, {"image": "a.nii.gz"}]}))
    message = problems_of(path)
    assert "entry 1" in message


def test_multiclass_one_hot_and_range(tmp_path):
    path = make_csv(tmp_path, ["a.nii.gz,2", "b.nii.gz,0"], header="VolumeName,grade")
    datalist = load_datalist(path, DataConfig(task=Task.multiclass, num_classes=3))
    assert datalist.labels == ["class_0", "class_1", "class_2"]
    assert datalist.items[0]["label"] == [0.0, 0.0, 1.0]
    assert "0..2" in problems_of(make_csv(tmp_path, ["a.nii.gz,3"], header="VolumeName,grade"),
                                 DataConfig(task=Task.multiclass, num_classes=3))


def test_binary_takes_one_column(tmp_path):
    path = make_csv(tmp_path, ["a.nii.gz,1,0"])
    assert load_datalist(path, DataConfig(task=Task.binary, label_columns=["Emphysema"])).items[0]["label"] == [0.0]
    assert "one label column" in problems_of(path, DataConfig(task=Task.binary))


def test_ct_rate_layout():
    root = Path("/data/dataset")
    expected = root / "train/train_12/train_12_a/train_12_a_2.nii.gz"
    assert resolve_image("train_12_a_2.nii.gz", root, "ct-rate") == expected
    assert resolve_image("x.nii.gz", root, "flat") == root / "x.nii.gz"
