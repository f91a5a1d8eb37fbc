"""An ensemble's thresholds, refit on its members' shared validation, through real checkpoints: load_ensemble and
predict. The expected thresholds are scikit-learn's ROC curve on probabilities this test averages itself."""

import csv
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from scipy.special import expit
from sklearn.metrics import roc_curve

from engine.config.loading import load_config
from engine.data.demo import LABELS, phantom
from engine.serving.commands import predict
from engine.serving.inference import load_ensemble
from engine.training.checkpoint import load_checkpoint, save_checkpoint, write_weights_only
from engine.training.workflow import train
from helpers import tiny_overrides
from volumes import write_nifti


def validation_volumes(run) -> list[str]:
    return [r["volume"] for r in csv.DictReader(open(run / "split.csv")) if r["split"] == "validation"]


@pytest.fixture(scope="module")
def members(tmp_path_factory, tiny_demo):
    """A run tuned for Youden's J and calibrated, and a second member on the same validation: its best outputs
    shifted and rescaled (another seed's model would differ so), its calibration another, its rows in the order
    two ranks would have gathered them."""
    tmp = tmp_path_factory.mktemp("ensemble")
    overrides = tiny_overrides(tmp, tiny_demo, "train.epochs=2", "metrics.threshold_rule=youden",
                               "metrics.calibrate=true")
    first = train(load_config(None, overrides))
    second = tmp / "runs" / "second"
    (second / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "split.csv"):
        shutil.copy(first / name, second / name)
    state = load_checkpoint(first / "checkpoints" / "best.pt")
    best = state["metrics_table"]["best_outputs"]
    n = best["logits"].shape[0]
    two_ranks = [i for rank in range(2) for i in range(rank, n, 2)]  # rank 0's rows, then rank 1's
    noise = torch.from_numpy(np.random.default_rng(0).normal(size=tuple(best["logits"].shape))).float()
    best.update(logits=(best["logits"] * 1.7 + 0.8 + noise)[two_ranks], labels=best["labels"][two_ranks], ranks=2)
    state["calibration"] = {**state["calibration"], "scale": [0.6] * len(LABELS), "bias": [-0.2] * len(LABELS)}
    save_checkpoint(second / "checkpoints" / "best.pt", state)
    return first / "checkpoints" / "best.pt", second / "checkpoints" / "best.pt", two_ranks, tmp


def test_load_ensemble_refits_youden_thresholds_on_the_members_averaged_validation(members):
    a, b, two_ranks, _ = members
    _, _, thresholds, record = load_ensemble([str(a), str(b)], torch.device("cpu"))
    volumes = validation_volumes(a.parent.parent)
    assert record == {"method": "refit", "rule": "youden", "volumes": len(volumes)}
    probs = []
    for path, order in ((a, list(range(len(volumes)))), (b, two_ranks)):
        state = load_checkpoint(path)
        best = state["metrics_table"]["best_outputs"]
        by_volume = {volumes[i]: row for i, row in zip(order, best["logits"].double().numpy())}
        z = np.stack([by_volume[v] for v in volumes])
        scale, bias = np.array(state["calibration"]["scale"]), np.array(state["calibration"]["bias"])
        probs.append(expit(z * scale + bias))
    p = np.mean(probs, axis=0)
    labels = load_checkpoint(a)["metrics_table"]["best_outputs"]["labels"].numpy()
    assert any(labels[:, j].min() != labels[:, j].max() for j in range(len(LABELS)))  # a label to refit
    for j, label in enumerate(LABELS):
        if labels[:, j].min() == labels[:, j].max():
            assert thresholds[j] == 0.5, label
            continue
        fpr, tpr, cuts = roc_curve(labels[:, j], p[:, j], drop_intermediate=False)
        assert thresholds[j] == pytest.approx(cuts[int(np.argmax(tpr - fpr))], abs=1e-5), label


def test_predict_decides_an_ensemble_at_its_refit_thresholds_and_says_so(members, capsys):
    a, b, _, tmp = members
    volume = write_nifti(tmp / "v.nii.gz", phantom(np.random.default_rng(4), (32, 32, 32), (1, 0, 1, 0)))
    path = predict(load_config(None, [f"checkpoint={a}", f"checkpoint={b}", f"input={volume}",
                                      f"output.dir={tmp}", "output.name=predict-ab"], command="predict"))
    out = capsys.readouterr().out
    assert "ensemble thresholds: refit on the members' shared validation (" in out and "rule youden" in out
    record = json.loads((path.parent / "ensemble.json").read_text())
    _, _, thresholds, _ = load_ensemble([str(a), str(b)], torch.device("cpu"))
    assert list(record["thresholds"].values()) == pytest.approx(thresholds) and record["members"] == [str(a), str(b)]
    (row,) = list(csv.DictReader(open(path)))
    for label, t in zip(LABELS, thresholds):
        assert int(row[f"{label}_decision"]) == int(float(row[label]) >= t), label


def test_members_on_other_volumes_or_without_outputs_fall_back_to_the_mean_loudly(members, tmp_path, caplog):
    a, b, _, _ = members
    own = [load_checkpoint(p)["metrics_table"]["best_outputs"]["thresholds"] for p in (a, b)]
    mean = np.mean(own, axis=0).tolist()
    other = tmp_path / "other"
    shutil.copytree(b.parent.parent, other)
    rows = list(csv.DictReader(open(other / "split.csv")))
    moved = next(r for r in rows if r["split"] == "train")  # another validation of as many volumes
    back = next(r for r in rows if r["split"] == "validation")
    moved["split"], back["split"] = "validation", "train"
    with open(other / "split.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    weights_only = write_weights_only(b, tmp_path / "copy" / "checkpoints" / "w.pt")
    for member, reason in ((other / "checkpoints" / "best.pt", "different volumes"),
                           (weights_only, "no config.yaml of its run")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ct3d"):
            _, _, thresholds, record = load_ensemble([str(a), str(member)], torch.device("cpu"))
        assert thresholds == pytest.approx(mean) and record["method"] == "mean" and reason in record["reason"]
        assert any("not refit for the ensemble" in r.getMessage() for r in caplog.records)
    shutil.copy(a.parent.parent / "config.yaml", tmp_path / "copy" / "config.yaml")
    _, _, thresholds, record = load_ensemble([str(a), str(weights_only)], torch.device("cpu"))
    assert thresholds == pytest.approx(mean) and "holds no validation outputs" in record["reason"]
