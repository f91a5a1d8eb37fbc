import csv
import json

import numpy as np
import pytest

from engine.checkpoint import load_checkpoint
from engine.config import load_config
from engine.demo import LABELS, phantom
from engine.errors import CT3DError
from engine.inference import evaluate, predict
from engine.workflow import train
from helpers import tiny_overrides
from volumes import write_dicom_series, write_nifti


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_demo):
    tmp = tmp_path_factory.mktemp("trained")
    overrides = tiny_overrides(tmp, tiny_demo, "train.epochs=2")
    return train(load_config(None, overrides)), overrides, tmp


def test_evaluate_reproduces_best_validation_metrics(trained):
    folder, overrides, tmp = trained
    summary = json.loads((folder / "summary.json").read_text())
    cfg = load_config(None, [*overrides, f"checkpoint={folder / 'checkpoints' / 'best.pt'}", "output.name=eval"],
                      command="evaluate")
    metrics = evaluate(cfg)
    for key in ("auc_macro", "fbeta_macro", "accuracy", "val_loss", "auc/Emphysema"):
        assert metrics[key] == pytest.approx(summary["best"][key], abs=1e-4), key
    saved = json.loads((tmp / "runs" / "eval" / "evaluation.json").read_text())
    assert saved["epoch"] == summary["best_epoch"]


def test_predict_folder_with_dicom_series_and_nifti(trained, tmp_path):
    folder, overrides, _ = trained
    rng = np.random.default_rng(0)
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_nifti(inputs / "a.nii.gz", phantom(rng, (32, 32, 32), (1, 0, 0, 1)))
    write_dicom_series(inputs / "series_b", phantom(rng, (32, 32, 32), (0, 1, 1, 0)))
    (inputs / "notes.txt").write_text("not a volume")
    cfg = load_config(None, [f"checkpoint={folder / 'checkpoints' / 'final.pt'}", f"input={inputs}",
                             f"output.dir={tmp_path}", "output.name=pred"], command="predict")
    path = predict(cfg)
    rows = list(csv.DictReader(open(path)))
    assert [r["VolumeName"] for r in rows] == ["a.nii.gz", "series_b"]
    assert list(rows[0]) == ["VolumeName", *LABELS]  # label order from the checkpoint
    assert all(0.0 <= float(r[label]) <= 1.0 for r in rows for label in LABELS)


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
    for label in LABELS:
        assert float(first[label]) == pytest.approx(float(rows[name][label]), abs=1e-5)


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
