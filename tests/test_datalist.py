import json
from pathlib import Path

import pytest

from engine.datalist import label_frequencies, load_datalist, resolve_image, split
from engine.errors import CT3DError
from engine.schema import DataConfig, Task

LABELS = ["Lung nodule", "Emphysema"]


def make_csv(folder: Path, rows: list[str], header="VolumeName,Lung nodule,Emphysema", create=True) -> Path:
    for row in rows:
        name = row.split(",")[0]
        if create and name:
            (folder / name).write_bytes(b"x")
    path = folder / "labels.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


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
    from engine.prepare import load_splits

    path = make_csv(tmp_path, [f"case{i}.nii.gz,{i % 2},0" for i in range(6)])
    with pytest.raises(CT3DError, match=r"data.patient_pattern.*matches none of the 6 volume names.*case0.nii.gz"):
        load_splits(DataConfig(train=str(path)))
    train, val = load_splits(DataConfig(train=str(path), patient_pattern=""))[:2]  # each volume its own patient
    assert len(train) + len(val) == 6


def test_ct_rate_layout():
    root = Path("/data/dataset")
    expected = root / "train/train_12/train_12_a/train_12_a_2.nii.gz"
    assert resolve_image("train_12_a_2.nii.gz", root, "ct-rate") == expected
    assert resolve_image("x.nii.gz", root, "flat") == root / "x.nii.gz"
