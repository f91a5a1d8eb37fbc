"""Sweeps: every trial recorded, a killed worker survived, pruning."""

import json
import signal
import time
from pathlib import Path

from engine.config.loading import load_config
from engine.config.schema import DataConfig
from helpers import cli, start, tiny_overrides

PATTERN = DataConfig().patient_pattern


def sweep_overrides(tmp: Path, datalist: Path, *extra: str) -> list[str]:
    return [*tiny_overrides(tmp, datalist, "train.epochs=4", "output.name=study", "metrics.bootstrap=0"),
            "sweep.space={train.lr: {type: log, low: 0.0001, high: 0.01}, model.dropout: {choices: [0.0, 0.2]}}",
            "sweep.pruner=none", "sweep.heartbeat_seconds=0.5", *extra]


def test_sweep_of_two_workers_records_every_trial_and_survives_a_killed_worker(tmp_path, tiny_demo):
    """4 trials, 2 worker processes; one worker is killed (SIGKILL) in the middle of a trial: the other marks
    that trial failed when its heartbeat stops, runs it again from its checkpoint, and the study ends with 4
    finished trials (plus the failed one, with its reason)."""
    import psutil

    proc = start("sweep", *sweep_overrides(tmp_path, tiny_demo, "sweep.trials=4", "sweep.workers=2"), merged=True)
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
    page = (study / "sweep_report.html").read_text()
    assert "Parameter importances (PED-ANOVA)" in page and summary["importance_method"] == "PED-ANOVA"
    assert "selected twice" in page and "selected twice" in summary["selection"]


def test_a_real_two_trial_sweep_prunes_the_clearly_worse_trial(tmp_path, tiny_demo):
    """`sweep` as a user runs it, median pruner on: trial 0 trains (lr 0.003: its validation loss falls from
    ~0.77 to ~0.67), trial 1 barely moves (lr 1e-7: ~0.79 throughout, what the tiny phantoms gave). After one
    warm-up epoch trial 1 is worse than the median of the completed trials (trial 0 alone) and is stopped at
    epoch 2, with that median, read here from trial 0's own metrics.csv, in its note."""
    import csv

    overrides = [*tiny_overrides(tmp_path, tiny_demo, "train.epochs=4", "output.name=study", "metrics.bootstrap=0"),
                 "sweep.space={train.lr: {choices: [1.0e-7, 0.003]}}", "sweep.seed=0",  # seed 0 draws 0.003 first
                 "sweep.trials=2", "sweep.metric=val_loss", "sweep.pruner=median", "sweep.pruner_startup_trials=1",
                 "sweep.pruner_warmup_epochs=1"]
    proc = cli("sweep", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = tmp_path / "runs" / "study"
    summary = json.loads((study / "sweep_summary.json").read_text())
    first, second = sorted(summary["trials"], key=lambda t: t["number"])
    assert first["params"] == {"train.lr": 0.003} and second["params"] == {"train.lr": 1.0e-7}
    assert first["state"] == "complete" and second["state"] == "pruned", summary["trials"]
    rows = {int(r["epoch"]): float(r["val_loss"])
            for r in csv.DictReader(open(study / first["run"].split("/", 1)[1] / "metrics.csv"))}
    assert second["note"].startswith("pruned at epoch 2: val_loss") and f"({rows[2]:.4f})" in second["note"]
    pruned_rows = list(csv.DictReader(open(study / second["run"].split("/", 1)[1] / "metrics.csv")))
    assert [int(r["epoch"]) for r in pruned_rows] == [1, 2]  # stopped: never trained epochs 3 and 4
    assert float(pruned_rows[1]["val_loss"]) > rows[2]
    best = min(float(r["val_loss"]) for r in pruned_rows)  # what Optuna's median pruner compares, not epoch 2's
    assert f"val_loss's best so far, {best:.4f}, is worse" in second["note"]


def test_pruned_trial_stops_training_and_records_why(tmp_path, tiny_demo):
    from optuna.study import StudyDirection

    from engine.experiments.sweep import pruning
    from engine.training.workflow import train

    class Study:  # no completed trial to compare with
        direction = StudyDirection.MINIMIZE

        def get_trials(self, deepcopy=False, states=()):
            return []

    class Trial:  # Optuna's trial as the pruning hook sees it; this one's pruner always says stop
        number, reported, attrs, study = 7, [], {}, Study()

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
    assert trial.attrs["pruned"].startswith(f"pruned at epoch 1: val_loss's best so far, {trial.reported[0][1]:.4f}")
    assert json.loads((folder / "summary.json").read_text())["final"]["epoch"] == 1


def test_study_sizes_tpe_start_up_to_the_budget_and_prunes_after_the_warm_up(tmp_path):
    """A real Optuna study as `sweep` opens it: TPE's random start-up is a third of a 10-trial budget (not all of
    it), and the median pruner lets a clearly worse trial run through the warm-up epochs, then stops it, and says
    what it was compared with."""
    import optuna

    from engine.experiments.sweep import median_at, open_study, startup_trials

    assert [startup_trials(n) for n in (3, 10, 30, 100)] == [2, 3, 10, 10]
    cfg = load_config(None, [f"output.dir={tmp_path}", "output.name=s", "data.demo.enabled=true", "sweep.trials=10",
                             "sweep.space={train.lr: {type: log, low: 0.0001, high: 0.01}}", "sweep.pruner=median",
                             "sweep.pruner_warmup_epochs=2"], command="sweep")
    study, _ = open_study(cfg)
    assert study.sampler._n_startup_trials == 3
    for good in (0.90, 0.92):
        trial = study.ask()
        for epoch in range(1, 5):
            trial.report(good, epoch)
        study.tell(trial, good)
    worse = study.ask()
    pruned_at = []
    for epoch in range(1, 5):
        worse.report(0.5, epoch)
        if worse.should_prune():
            pruned_at.append(epoch)
    assert pruned_at[:1] == [3] and median_at(study, 3, worse.number) == 0.91
    assert isinstance(study.pruner, optuna.pruners.MedianPruner)
