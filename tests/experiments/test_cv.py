"""Cross-validation and ensembles of its fold checkpoints."""

import csv
import json
import statistics
import time
from pathlib import Path

import numpy as np
import pytest

from engine.config.loading import load_config
from engine.config.schema import DataConfig
from engine.data.demo import LABELS
from engine.utils.errors import CT3DError
from forked import Forked
from helpers import cli, start, tiny_overrides

PATTERN = DataConfig().patient_pattern


def wait_for(path: Path, proc: Forked, seconds: float = 300) -> None:
    end = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.output()[0][-3000:]
        assert time.time() < end, f"{path} did not appear"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory, tiny_demo):
    """`cv` with 3 folds, killed (SIGKILL) in the middle of fold 1, then run again."""
    tmp = tmp_path_factory.mktemp("cv")
    overrides = tiny_overrides(tmp, tiny_demo, "data.folds=3", "train.epochs=4", "output.name=cv",
                               "metrics.bootstrap=200", "metrics.calibrate=true")  # each fold its own Platt fit
    proc = start("cv", *overrides, merged=True)
    folds = tmp / "runs" / "cv"
    wait_for(folds / "fold1" / "checkpoints" / "last.pt", proc)
    proc.kill()
    proc.wait()
    assert not (folds / "fold1" / "summary.json").exists() and not (folds / "fold2").exists()
    fold0 = (folds / "fold0" / "checkpoints" / "final.pt").stat().st_mtime_ns
    again = cli("cv", *overrides)
    assert again.returncode == 0, again.stderr[-3000:]
    return folds, overrides, again, fold0


def test_cv_resumes_after_a_kill_mid_fold_and_finishes_the_rest(cv_run, tiny_demo):
    folds, _, again, fold0 = cv_run
    assert "fold 1/3: finished earlier" in again.stderr  # fold 0 kept, not trained again
    assert (folds / "fold0" / "checkpoints" / "final.pt").stat().st_mtime_ns == fold0
    assert f"resumed from {folds / 'fold1' / 'checkpoints' / 'last.pt'}" in again.stderr
    summary = json.loads((folds / "cv_summary.json").read_text())
    assert [f["fold"] for f in summary["folds"]] == [0, 1, 2]
    pooled = summary["pooled"]
    names = {r[0] for r in csv.reader(open(tiny_demo))} - {"VolumeName"}
    assert pooled["volumes"] == len(names) == 24  # out of fold: every volume once
    low, high = pooled["bootstrap"]["intervals"]["auc_macro"]
    assert low <= pooled["metrics"]["auc_macro"] <= high
    import torch
    from sklearn.metrics import roc_auc_score

    from engine.training.checkpoint import load_checkpoint

    best = [load_checkpoint(folds / f"fold{k}" / "checkpoints" / "best.pt")["metrics_table"]["best_outputs"]
            for k in range(3)]
    raw, labels = torch.sigmoid(torch.cat([b["logits"] for b in best])), torch.cat([b["labels"] for b in best])
    per_label = [roc_auc_score(labels[:, j], raw[:, j]) for j in range(labels.shape[1])
                 if labels[:, j].min() != labels[:, j].max()]  # tests run with metrics.min_positive_patients=1
    assert pooled["metrics"]["auc_macro"] == pytest.approx(sum(per_label) / len(per_label))  # raw outputs pooled
    assert pooled["note"].startswith("pooled across fold models") and pooled["min_positive_patients"] == 1
    for k in range(3):
        rows = list(csv.DictReader(open(folds / f"fold{k}" / "split.csv")))
        assert sum(r["split"] == "validation" for r in rows) == summary["folds"][k]["val_volumes"]
    own = [json.loads((folds / f"fold{k}" / "summary.json").read_text())["best"]["auc_macro"] for k in range(3)]
    headline = summary["headline"]["auc_macro"]
    assert headline["mean"] == pytest.approx(statistics.mean(own))
    assert headline["sd"] == pytest.approx(np.std(own, ddof=1))
    report = (folds / "cv_report.html").read_text()
    assert report.index("mean of the folds' own") < report.index("pooled across fold models")
    assert again.stdout.index("mean of the folds' own") < again.stdout.index("pooled out-of-fold")


def test_cv_summary_leaves_labels_with_few_positive_patients_out_of_the_pooled_macro(cv_run, tmp_path):
    """The same folds summarised with metrics.min_positive_patients=10 (too many for a fold of 8 patients to train
    with, not for the 24 pooled): the labels under it leave the pooled macro and are flagged."""
    import shutil

    import torch
    from sklearn.metrics import roc_auc_score

    from engine.experiments.cv import cv_summary
    from engine.training.checkpoint import load_checkpoint

    folds, overrides, _, _ = cv_run
    copy = tmp_path / "cv"
    shutil.copytree(folds, copy)
    summary = cv_summary(copy, load_config(None, [*overrides, "metrics.min_positive_patients=10"]))
    pooled = summary["pooled"]
    best = [load_checkpoint(folds / f"fold{k}" / "checkpoints" / "best.pt")["metrics_table"]["best_outputs"]
            for k in range(3)]
    raw, labels = torch.sigmoid(torch.cat([b["logits"] for b in best])), torch.cat([b["labels"] for b in best])
    split = [r for k in range(3) for r in csv.DictReader(open(folds / f"fold{k}" / "split.csv"))
             if r["split"] == "validation"]  # in gathered order: one rank
    positive = {n: len({r["patient"] for r, y in zip(split, labels[:, j]) if y == 1}) for j, n in enumerate(LABELS)}
    assert positive == {"Lung nodule": 8, "Pleural effusion": 10, "Emphysema": 6, "Cardiomegaly": 10}
    kept = [j for j, n in enumerate(LABELS) if positive[n] >= 10]
    per_label = [roc_auc_score(labels[:, j], raw[:, j]) for j in kept]
    assert pooled["metrics"]["auc_macro"] == pytest.approx(sum(per_label) / len(per_label))
    assert pooled["left_out"] == {"one_class": [], "few_positive_patients": {"Lung nodule": 8, "Emphysema": 6}}
    assert {"auc/Lung nodule", "auc/Emphysema"} <= set(pooled["bootstrap"]["unreliable"]) <= set(pooled["unreliable"])
    assert pooled["bootstrap"]["macro_labels"] == ["Pleural effusion", "Cardiomegaly"] == pooled["macro_labels"]
    report = (copy / "cv_report.html").read_text()
    assert "under 10 positive patients: Lung nodule (8), Emphysema (6)" in report
    assert "unreliable: 6 positive patients" in report


def test_ensemble_of_two_fold_checkpoints_gives_the_mean_of_their_probabilities(cv_run, tiny_demo, tmp_path, capsys):
    from engine.serving.commands import predict

    folds, _, _, _ = cv_run
    a, b = (folds / f"fold{k}" / "checkpoints" / "best.pt" for k in (0, 1))

    def rows(*checkpoints: str, name: str) -> dict:
        path = predict(load_config(None, [*checkpoints, f"input={tiny_demo}", f"output.dir={tmp_path}",
                                          f"output.name={name}"], command="predict"))
        return {r["VolumeName"]: r for r in csv.DictReader(open(path))}

    alone_a, alone_b = rows(f"checkpoint={a}", name="a"), rows(f"checkpoint={b}", name="b")
    both = rows(f"checkpoint={a}", f"checkpoint={b}", name="ab")
    by_glob = rows(f"checkpoints={folds}/fold[01]/checkpoints/best.pt", name="glob")
    for volume, row in both.items():
        for label in LABELS:
            mean = (float(alone_a[volume][label]) + float(alone_b[volume][label])) / 2
            assert float(row[label]) == pytest.approx(mean, abs=2e-6)
            assert by_glob[volume][label] == row[label]
            assert int(row[f"{label}_decision"]) == int(float(row[label]) >= 0.5)  # folds share no validation
    assert "ensemble thresholds: the fixed threshold" in capsys.readouterr().out


def test_ensemble_members_must_share_labels_and_preprocessing(cv_run, tiny_demo, tmp_path):
    from engine.serving.commands import predict
    from engine.training.checkpoint import load_checkpoint, save_checkpoint

    folds, _, _, _ = cv_run
    a = folds / "fold0" / "checkpoints" / "best.pt"
    other = load_checkpoint(a)
    other["preprocessing"] = {**other["preprocessing"], "spatial_size": [48, 48, 48]}
    save_checkpoint(tmp_path / "other.pt", other)
    with pytest.raises(CT3DError, match=r"ensemble: .*other.pt has other preprocessing than .*fold0"):
        predict(load_config(None, [f"checkpoint={a}", f"checkpoint={tmp_path / 'other.pt'}", f"input={tiny_demo}",
                                   f"output.dir={tmp_path}"], command="predict"))


def test_cv_refuses_fold_folders_made_with_other_settings(cv_run):
    from engine.experiments.cv import cv

    _, overrides, _, _ = cv_run
    with pytest.raises(CT3DError, match=r"cv: .*fold0 was trained with other settings \(model.widen_factor\)"):
        cv(load_config(None, [*overrides, "model.widen_factor=0.5"]))
    with pytest.raises(CT3DError, match="checkpoints: an ensemble of 3 checkpoints is for predict"):
        load_config(None, [*overrides, "checkpoint=a.pt", "checkpoint=b.pt", "checkpoint=c.pt"], command="evaluate")
    with pytest.raises(CT3DError, match="checkpoints: an ensemble of 2 checkpoints is for predict"):
        load_config(None, [*overrides, "checkpoint=a.pt", "checkpoint=b.pt"], command="export")


def test_cv_refuses_before_any_fold_trains_when_a_fold_cannot_carry_the_macro(tmp_path, tiny_demo):
    """Each of 3 folds validates 8 of the 24 tiny volumes: no label reaches 10 positive patients in any fold, and
    the refusal comes before fold 0 trains (not after the earlier folds have)."""
    from engine.experiments.cv import cv

    cfg = load_config(None, tiny_overrides(tmp_path, tiny_demo, "data.folds=3", "output.name=short",
                                           "metrics.min_positive_patients=10"))
    with pytest.raises(CT3DError, match=r"min_positive_patients=10: no label has that many positive patients in the "
                                        r"fold 0 validation split"):
        cv(cfg)
    assert not (tmp_path / "runs" / "short").exists()
