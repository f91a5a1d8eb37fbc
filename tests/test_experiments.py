"""Cross-validation, ensembles and sweeps."""

import csv
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from engine.config import load_config
from engine.datalist import patient_of
from engine.errors import CT3DError
from engine.prepare import load_splits
from engine.schema import DataConfig
from helpers import ENV, ROOT, TEXT, cli, command, tiny_overrides

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


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 300) -> None:
    end = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else proc.returncode
        assert time.time() < end, f"{path} did not appear"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory, tiny_demo):
    """`cv` with 3 folds, killed (SIGKILL) in the middle of fold 1, then run again."""
    tmp = tmp_path_factory.mktemp("cv")
    overrides = tiny_overrides(tmp, tiny_demo, "data.folds=3", "train.epochs=4", "output.name=cv",
                               "metrics.bootstrap=200")
    proc = subprocess.Popen(command("cv", *overrides), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, **TEXT)
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
    for k in range(3):
        split = list(csv.DictReader(open(folds / f"fold{k}" / "split.csv")))
        assert sum(r["split"] == "validation" for r in split) == summary["folds"][k]["val_volumes"]
    assert "pooled" in (folds / "cv_report.html").read_text() and "pooled out-of-fold" in again.stdout


def test_ensemble_of_two_fold_checkpoints_gives_the_mean_of_their_probabilities(cv_run, tiny_demo, tmp_path):
    from engine.demo import LABELS
    from engine.inference import predict

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


def sweep_overrides(tmp: Path, datalist: Path, *extra: str) -> list[str]:
    return [*tiny_overrides(tmp, datalist, "train.epochs=4", "output.name=study", "metrics.bootstrap=0"),
            "sweep.space={train.lr: {type: log, low: 0.0001, high: 0.01}, model.dropout: {choices: [0.0, 0.2]}}",
            "sweep.pruner=none", "sweep.heartbeat_seconds=0.5", *extra]


def test_sweep_of_two_workers_records_every_trial_and_survives_a_killed_worker(tmp_path, tiny_demo):
    """4 trials, 2 worker processes; one worker is killed (SIGKILL) in the middle of a trial: the other marks
    that trial failed when its heartbeat stops, runs it again from its checkpoint, and the study ends with 4
    finished trials (plus the failed one, with its reason)."""
    import psutil

    proc = subprocess.Popen(command("sweep", *sweep_overrides(tmp_path, tiny_demo, "sweep.trials=4",
                                                              "sweep.workers=2")),
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **TEXT)
    study = tmp_path / "runs" / "study"
    end = time.time() + 300
    while not list(study.glob("trial*/checkpoints/last.pt")):
        assert proc.poll() is None and time.time() < end
        time.sleep(0.02)
    trial = next(study.glob("trial*/checkpoints/last.pt")).parent.parent
    victim = int((trial / "heartbeat").read_text())
    assert victim in [c.pid for c in psutil.Process(proc.pid).children()]
    psutil.Process(victim).send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    summary = json.loads((study / "sweep_summary.json").read_text())
    assert summary["counts"] == {"complete": 4, "fail": 1}, summary["counts"]
    failed = next(t for t in summary["trials"] if t["state"] == "fail")
    assert failed["run"] == f"study/{trial.name}" and failed["note"].startswith("worker lost: no heartbeat")
    retry = next(t for t in summary["trials"] if t["note"] == f"retry of trial {failed['number']}")
    assert retry["state"] == "complete" and retry["run"] == failed["run"] and retry["params"] == failed["params"]
    assert f"resumed from {trial / 'checkpoints'}" in out
    assert summary["best"]["value"] == max(t["value"] for t in summary["trials"] if t["state"] == "complete")
    assert "Parameter importances" in (study / "sweep_report.html").read_text()


def test_pruned_trial_stops_training_and_records_why(tmp_path, tiny_demo):
    from engine.sweep import pruning
    from engine.workflow import train

    class Trial:  # Optuna's trial as the pruning hook sees it; this one's pruner always says stop
        number, reported, attrs = 7, [], {}

        def report(self, value, step):
            self.reported.append((step, value))

        def should_prune(self):
            return True

        def set_user_attr(self, key, value):
            self.attrs[key] = value

    trial, reason = Trial(), {}
    folder = train(load_config(None, tiny_overrides(tmp_path, tiny_demo, "train.epochs=3")),
                   attach=pruning(trial, "val_loss", reason))
    assert [step for step, _ in trial.reported] == [1]  # stopped after the first validation
    assert trial.attrs["pruned"].startswith("pruned at epoch 1: val_loss")
    assert json.loads((folder / "summary.json").read_text())["final"]["epoch"] == 1


def test_ensemble_members_must_share_labels_and_preprocessing(cv_run, tiny_demo, tmp_path):
    from engine.checkpoint import load_checkpoint, save_checkpoint
    from engine.inference import predict

    folds, _, _, _ = cv_run
    a = folds / "fold0" / "checkpoints" / "best.pt"
    other = load_checkpoint(a)
    other["preprocessing"] = {**other["preprocessing"], "spatial_size": [48, 48, 48]}
    save_checkpoint(tmp_path / "other.pt", other)
    with pytest.raises(CT3DError, match=r"ensemble: .*other.pt has other preprocessing than .*fold0"):
        predict(load_config(None, [f"checkpoint={a}", f"checkpoint={tmp_path / 'other.pt'}", f"input={tiny_demo}",
                                   f"output.dir={tmp_path}"], command="predict"))


def test_no_fold_is_empty_even_when_few_patients_draw_unevenly(tmp_path):
    from engine.datalist import split

    items = [{"image": str(i), "name": str(i), "label": [float(i % 2)]} for i in range(5)]
    sides = [split(items, 0.2, seed=s, folds=5, fold=k)[1] for s in range(20) for k in range(5)]
    assert all(len(val) == 1 for val in sides)  # five patients, five folds: one each, whatever the draw


def test_cv_refuses_fold_folders_made_with_other_settings(cv_run):
    from engine.cv import cv

    _, overrides, _, _ = cv_run
    with pytest.raises(CT3DError, match=r"cv: .*fold0 was trained with other settings \(model.widen_factor\)"):
        cv(load_config(None, [*overrides, "model.widen_factor=0.5"]))
    with pytest.raises(CT3DError, match="checkpoints: an ensemble of 2 checkpoints is for predict"):
        load_config(None, [*overrides, "checkpoint=a.pt", "checkpoint=b.pt"], command="evaluate")


def test_checkpoints_from_before_anti_aliasing_predict_without_it():
    from engine.inference import checkpoint_preprocessing

    saved = {"preprocessing": {"orientation": "RAS", "spacing": None, "hu_window": [-1000.0, 1000.0],
                               "scale_range": [-1.0, 1.0], "spatial_size": [32, 32, 32], "resize": "resize",
                               "dtype": "float16"}}
    assert checkpoint_preprocessing(saved).anti_aliasing is False
