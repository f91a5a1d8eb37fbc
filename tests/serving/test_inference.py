import csv
import json
import logging

import numpy as np
import pytest

from engine.config.loading import load_config
from engine.data.demo import LABELS, phantom
from engine.serving.commands import evaluate, predict
from engine.training.checkpoint import load_checkpoint
from engine.training.workflow import train
from engine.utils.errors import CT3DError
from helpers import tiny_overrides
from volumes import write_dicom_series, write_itk, write_nifti


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_demo):
    tmp = tmp_path_factory.mktemp("trained")
    # thresholds tuned for F1 and Platt scaling fitted on validation: evaluate and predict must use the checkpoint's
    overrides = tiny_overrides(tmp, tiny_demo, "train.epochs=2", "metrics.threshold_rule=fbeta",
                               "metrics.calibrate=true")
    return train(load_config(None, overrides)), overrides, tmp


def test_evaluate_reproduces_best_validation_metrics(trained):
    folder, overrides, tmp = trained
    summary = json.loads((folder / "summary.json").read_text())
    cfg = load_config(None, [*overrides, f"checkpoint={folder / 'checkpoints' / 'best.pt'}", "output.name=eval"],
                      command="evaluate")
    metrics = evaluate(cfg)
    for key in ("auc_macro", "fbeta_macro", "accuracy", "val_loss", "auc/Lung nodule", "fbeta/Lung nodule",
                "precision", "ece_macro"):
        assert metrics[key] == pytest.approx(summary["best"][key], abs=1e-4), key
    saved = json.loads((tmp / "runs" / "eval" / "evaluation.json").read_text())
    assert saved["epoch"] == summary["best_epoch"] and saved["data"].startswith(
        "the run's own validation split; selection set: 4 of 4 volumes")
    assert saved["thresholds"] == pytest.approx(summary["thresholds"]) and len(set(saved["thresholds"].values())) > 1
    for part in ("scale", "intercept"):
        assert saved["calibration"][part] == pytest.approx(summary["calibration"][part])
    assert any(b != 0 for b in summary["calibration"]["intercept"].values())  # an intercept was fitted
    assert saved["bootstrap"]["intervals"]["auc_macro"] == pytest.approx(summary["bootstrap"]["intervals"]["auc_macro"])


def test_evaluate_refuses_volumes_the_checkpoint_trained_on(trained, tmp_path, tiny_demo):
    folder, overrides, _ = trained
    cfg = load_config(None, [*overrides, f"checkpoint={folder / 'checkpoints' / 'best.pt'}", f"data.val={tiny_demo}",
                             f"output.dir={tmp_path}"], command="evaluate")
    with pytest.raises(CT3DError, match=r"evaluate: \d+ of the 24 volumes were in the training split of .*train_"):
        evaluate(cfg)


def test_predict_writes_decisions_at_the_checkpoints_thresholds_and_tta_averages_flips(trained, tmp_path):
    import torch

    from engine.data.preprocess import preprocessing_transform
    from engine.serving.inference import checkpoint_preprocessing, decision_settings, load_trained_model

    folder, _, _ = trained
    volume = write_nifti(tmp_path / "v.nii.gz", phantom(np.random.default_rng(4), (32, 32, 32), (1, 0, 1, 0)))
    ckpt = folder / "checkpoints" / "best.pt"
    rows = {}
    for tta in ("none", "flips"):
        path = predict(load_config(None, [f"checkpoint={ckpt}", f"input={volume}", f"infer.tta={tta}",
                                          f"output.dir={tmp_path}", f"output.name={tta}"], command="predict"))
        (rows[tta],) = list(csv.DictReader(open(path)))
    assert list(rows["none"]) == ["VolumeName", *LABELS, *(f"{name}_decision" for name in LABELS)]

    model, state = load_trained_model(str(ckpt), torch.device("cpu"))
    thresholds, calibration = decision_settings(state)
    scale, bias = torch.tensor(calibration["scale"]), torch.tensor(calibration["bias"])
    x = preprocessing_transform(checkpoint_preprocessing(state))({"image": str(volume), "name": "v"})["image"]
    x = x.float()[None]
    with torch.no_grad():  # by hand: the mean of calibrated sigmoids over the volume and its three flips
        views = [x, x.flip(2), x.flip(3), x.flip(4)]
        by_hand = torch.stack([torch.sigmoid(model(v) * scale + bias) for v in views]).mean(0)[0]
        plain = torch.sigmoid(model(x)[0] * scale + bias)
    for j, label in enumerate(LABELS):
        assert float(rows["flips"][label]) == pytest.approx(float(by_hand[j]), abs=2e-5)
        assert float(rows["none"][label]) == pytest.approx(float(plain[j]), abs=2e-5)
        for tta in ("none", "flips"):
            assert rows[tta][f"{label}_decision"] == str(int(float(rows[tta][label]) >= thresholds[j]))
    assert any(abs(float(rows["flips"][n]) - float(rows["none"][n])) > 1e-4 for n in LABELS)  # flips did something


def test_predict_folder_gives_a_row_per_series_and_lists_what_it_left_out(trained, tmp_path, caplog):
    folder, overrides, _ = trained
    rng = np.random.default_rng(0)
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_nifti(inputs / "a.nii.gz", phantom(rng, (32, 32, 32), (1, 0, 0, 1)))
    write_dicom_series(inputs / "series_b", phantom(rng, (32, 32, 32), (0, 1, 1, 0)), suffix="")  # PACS names
    export = inputs / "patient7" / "study"
    write_dicom_series(export, phantom(rng, (32, 32, 32), (0, 0, 1, 0)), description="Axial", suffix="")
    write_dicom_series(export, phantom(rng, (32, 32, 32), (1, 0, 0, 0)), description="Bone", suffix="")
    write_dicom_series(export, phantom(rng, (32, 32, 1), (0, 0, 0, 0)), description="Scout", suffix="",
                       localizer=True)
    (inputs / "notes.txt").write_text("not a volume")
    cfg = load_config(None, [f"checkpoint={folder / 'checkpoints' / 'final.pt'}", f"input={inputs}",
                             f"output.dir={tmp_path}", "output.name=pred", "loader.batch_size=2"], command="predict")
    with caplog.at_level(logging.INFO, logger="ct3d"):
        path = predict(cfg)
    rows = list(csv.DictReader(open(path)))
    assert [r["VolumeName"] for r in rows] == ["a.nii.gz", "patient7/study/Axial", "patient7/study/Bone", "series_b"]
    assert list(rows[0])[:5] == ["VolumeName", *LABELS]  # label order from the checkpoint
    assert all(0.0 <= float(r[label]) <= 1.0 for r in rows for label in LABELS)
    skipped = list(csv.DictReader(open(path.parent / "skipped.csv")))
    by_place = {r["where"].removeprefix(str(inputs) + "/"): r["problem"] for r in skipped}
    assert sorted(by_place) == ["notes.txt", "patient7/study/Scout"]
    assert "not a volume" in by_place["notes.txt"] and "localizer" in by_place["patient7/study/Scout"]
    assert any("ETA" in r.getMessage() for r in caplog.records)  # progress in a pod's log


def test_one_volume_in_every_format_gets_the_same_probabilities(trained, tmp_path):
    folder, _, _ = trained
    volume = phantom(np.random.default_rng(3), (32, 32, 32), (1, 1, 0, 0))
    inputs = tmp_path / "formats"
    inputs.mkdir()
    write_nifti(inputs / "v.nii.gz", volume, lps=True)
    write_itk(inputs / "v.nrrd", volume)
    write_itk(inputs / "v.mha", volume)
    write_dicom_series(inputs / "dicom", volume, suffix="")
    path = predict(load_config(None, [f"checkpoint={folder / 'checkpoints' / 'final.pt'}", f"input={inputs}",
                                      f"output.dir={tmp_path}", "output.name=formats"], command="predict"))
    rows = list(csv.DictReader(open(path)))
    assert sorted(r["VolumeName"] for r in rows) == ["dicom", "v.mha", "v.nii.gz", "v.nrrd"]
    for label in LABELS:
        values = [float(r[label]) for r in rows]
        assert max(values) - min(values) < 1e-4, (label, values)


def test_unreadable_input_is_left_out_not_fatal(trained, tmp_path):
    folder, _, _ = trained
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_nifti(inputs / "good.nii.gz", phantom(np.random.default_rng(1), (32, 32, 32), (0, 1, 0, 0)))
    (inputs / "cut.nii.gz").write_bytes((inputs / "good.nii.gz").read_bytes()[:200])
    path = predict(load_config(None, [f"checkpoint={folder / 'checkpoints' / 'final.pt'}", f"input={inputs}",
                                      f"output.dir={tmp_path}", "output.name=cut"], command="predict"))
    assert [r["VolumeName"] for r in csv.DictReader(open(path))] == ["good.nii.gz"]
    skipped = list(csv.DictReader(open(path.parent / "skipped.csv")))
    assert [r["volume"] for r in skipped] == ["cut.nii.gz"] and "cut.nii.gz" in skipped[0]["problem"]


def test_predict_one_volume_and_datalist_agree(trained, tmp_path, tiny_demo):
    folder, _, _ = trained
    ckpt = f"checkpoint={folder / 'checkpoints' / 'final.pt'}"
    name = tiny_demo.read_text().splitlines()[1].split(",")[0]
    one = predict(load_config(None, [ckpt, f"input={tiny_demo.parent / name}", f"output.dir={tmp_path}",
                                     "output.name=one"], command="predict"))
    many = predict(load_config(None, [ckpt, f"input={tiny_demo}", f"output.dir={tmp_path}", "output.name=many"],
                               command="predict"))
    first = list(csv.DictReader(open(one)))[0]
    rows = {r["VolumeName"]: r for r in csv.DictReader(open(many))}
    assert len(rows) == 24
    for label in LABELS:  # one volume alone or in a batch of 8: oneDNN's convolutions differ by batch in the
        # float32 rounding (1.2e-5 seen with AVX2 kernels); a wrong volume or label would differ by far more
        assert float(first[label]) == pytest.approx(float(rows[name][label]), abs=1e-4)


def test_checkpoint_needing_pickle_is_refused(tmp_path, capfd):
    import torch

    class Payload:
        def __reduce__(self):
            return (print, ("pickle ran",))

    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": Payload()}, path)
    with pytest.raises(CT3DError, match="full pickle"):
        load_checkpoint(path)
    assert "pickle ran" not in capfd.readouterr().out


def test_predict_and_evaluate_need_a_checkpoint():
    with pytest.raises(CT3DError, match="checkpoint"):
        load_config(None, ["data.demo.enabled=true"], command="evaluate")
    with pytest.raises(CT3DError, match="input"):
        load_config(None, ["checkpoint=x.pt"], command="predict")


def test_input_without_volumes_is_an_error_listing_what_was_there(trained, tmp_path):
    folder, _, _ = trained
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "readme.txt").write_text("no scans here")
    with pytest.raises(CT3DError, match=r"(?s)no volumes.*readme.txt: not a volume"):
        predict(load_config(None, [f"checkpoint={folder / 'checkpoints' / 'final.pt'}", f"input={tmp_path / 'in'}",
                                   f"output.dir={tmp_path}"], command="predict"))


def test_predict_saliency_writes_one_map_per_volume_on_the_input_grid(trained, tmp_path):
    import nibabel as nib

    folder, _, _ = trained
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(2)
    write_nifti(inputs / "lps.nii.gz", phantom(rng, (40, 36, 30), (1, 0, 0, 0)), spacing=(1.5, 1.5, 3.0), lps=True)
    write_dicom_series(inputs / "series", phantom(rng, (32, 32, 24), (0, 1, 0, 0)), suffix="")
    cfg = load_config(None, [f"checkpoint={folder / 'checkpoints' / 'final.pt'}", f"input={inputs}", "saliency=true",
                             f"output.dir={tmp_path}", "output.name=cam"], command="predict")
    path = predict(cfg)
    maps = sorted(p.name for p in (path.parent / "saliency").iterdir())
    assert maps == ["lps.nii.gz", "series.nii.gz"]
    source, heat = nib.load(str(inputs / "lps.nii.gz")), nib.load(str(path.parent / "saliency" / "lps.nii.gz"))
    assert heat.shape == (40, 36, 30, len(LABELS)) and np.allclose(heat.affine, source.affine, atol=1e-4)
    values = heat.get_fdata()
    assert values.min() >= -1e-4 and values.max() <= 1 + 1e-4 and values.max() > 0.5
    assert nib.load(str(path.parent / "saliency" / "series.nii.gz")).shape == (32, 32, 24, len(LABELS))


def test_evaluate_refuses_another_scan_of_a_training_patient_unless_allowed(trained, tmp_path, tiny_demo):
    """`train_3_b_1` is not a volume the run saw, but its patient `train_3` was trained on: not held out."""
    import shutil

    from engine.data.run_split import read_split

    folder, overrides, _ = trained
    rows = read_split(folder / "split.csv")
    trained_volume = next(v for v, row in rows.items() if row["split"] == "train")
    validation = [v for v, row in rows.items() if row["split"] == "validation"]
    patient = rows[trained_volume]["patient"]
    other_scan = trained_volume.replace("_a_", "_b_")
    shutil.copy(tiny_demo.parent / trained_volume, tmp_path / other_scan)
    for name in validation:
        shutil.copy(tiny_demo.parent / name, tmp_path / name)
    header, *lines = tiny_demo.read_text().splitlines()
    label_of = {line.split(",")[0]: line.split(",", 1)[1] for line in lines}
    datalist = tmp_path / "held_out.csv"
    datalist.write_text("\n".join([header, f"{other_scan},{label_of[trained_volume]}",
                                   *(f"{v},{label_of[v]}" for v in validation)]) + "\n")
    base = [*overrides, f"checkpoint={folder / 'checkpoints' / 'best.pt'}", f"data.val={datalist}",
            f"output.dir={tmp_path}"]
    with pytest.raises(CT3DError, match=rf"1 patient\(s\) of these volumes were trained on .*{patient}"):
        evaluate(load_config(None, base, command="evaluate"))
    allowed = evaluate(load_config(None, [*base, "infer.allow_trained_patients=true"], command="evaluate"))
    assert "auc_macro" in allowed


def test_evaluate_compares_two_checkpoints_on_the_same_volumes(trained, tmp_path):
    folder, overrides, _ = trained
    best, final = (str(folder / "checkpoints" / f"{n}.pt") for n in ("best", "final"))
    pair = [*overrides, f"checkpoint={best}", f"checkpoint={final}", f"output.dir={tmp_path}", "output.name=pair"]
    # the run's own validation split selected both: refused, and nothing written
    with pytest.raises(CT3DError, match=r"selection set of .*best.pt \(4 of 4\).*infer.allow_selection_set=true"):
        evaluate(load_config(None, pair, command="evaluate"))
    assert not (tmp_path / "pair" / "evaluation.json").exists()
    evaluate(load_config(None, [*pair, "infer.allow_selection_set=true"], command="evaluate"))
    saved = json.loads((tmp_path / "pair" / "evaluation.json").read_text())
    assert saved["comparison"]["selection_set"] == {"volumes": {best: 4, final: 4}, "allowed": True}
    first, second, comparison = saved["first"], saved["second"], saved["comparison"]
    assert first["checkpoint"] == best and second["checkpoint"] == final and first["volumes"] == second["volumes"]
    macro = comparison["auc_macro"]
    assert macro["first"] == pytest.approx(first["metrics"]["auc_macro"], abs=1e-6)
    assert macro["second"] == pytest.approx(second["metrics"]["auc_macro"], abs=1e-6)
    low, high = macro["interval"]
    assert low <= macro["difference"] <= high and comparison["method"] == "BCa"


def test_evaluate_needs_only_the_checkpoint_and_the_data_to_score(trained, tmp_path, tiny_demo):
    """An outside data set: no data.train. The loss's pos_weight (val_loss) and the leakage check come from the
    run's split.csv; on the run's own validation volumes, listed alone, the figures are the best epoch's."""
    folder, overrides, _ = trained
    summary = json.loads((folder / "summary.json").read_text())
    validation = {r["volume"] for r in csv.DictReader(open(folder / "split.csv")) if r["split"] == "validation"}
    lines = tiny_demo.read_text().splitlines()
    rows = [line for line in lines[1:] if line.split(",")[0] in validation]
    (tmp_path / "outside.csv").write_text("\n".join([lines[0], *rows]))
    for line in lines[1:]:
        name = line.split(",")[0]
        if name in validation:
            (tmp_path / name).symlink_to(tiny_demo.parent / name)
    keep = [o for o in overrides if not o.startswith("data.train=")]
    cfg = load_config(None, [*keep, f"checkpoint={folder / 'checkpoints' / 'best.pt'}",
                             f"data.val={tmp_path / 'outside.csv'}", "output.name=outside"], command="evaluate")
    metrics = evaluate(cfg)
    for key in ("auc_macro", "val_loss", "fbeta_macro"):
        assert metrics[key] == pytest.approx(summary["best"][key], abs=1e-4), key
