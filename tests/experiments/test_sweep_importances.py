"""A sweep's parameter importances, on studies built in memory: none below 20 finished trials, with the reason in
sweep_summary.json and the report; from 20 on, the parameter that sets the objective named first."""

import json

import numpy as np
import optuna
import pytest

from engine.config.schema import Config
from engine.experiments.sweep_report import FEW_TRIALS, IMPORTANCE_METHOD, importances, write_sweep_summary

optuna.logging.set_verbosity(optuna.logging.WARNING)


def study_of(objective, finished: int, seed: int = 0, failed: int = 0) -> optuna.Study:
    """`finished` complete trials of x, y uniform on [0, 1] drawn at random (seeded), valued objective(x, y, rng);
    then `failed` failed ones, which never count."""
    rng = np.random.default_rng(seed)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed))
    for _ in range(finished):
        trial = study.ask()
        study.tell(trial, objective(trial.suggest_float("x", 0, 1), trial.suggest_float("y", 0, 1), rng))
    for _ in range(failed):
        study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    return study


def x_alone(x: float, y: float, rng) -> float:
    return x + 1e-3 * rng.normal()  # y plays no part


def test_fewer_than_20_finished_trials_give_no_importances_and_say_why(tmp_path):
    study = study_of(x_alone, 19, failed=5)  # 24 trials, 19 finished
    assert importances(study) == f"not computed: {FEW_TRIALS} (19 finished)"
    summary = write_sweep_summary(study, Config(), tmp_path)
    written = json.loads((tmp_path / "sweep_summary.json").read_text())
    assert written["importances"] == summary["importances"] and FEW_TRIALS in written["importances"]
    assert written["importance_method"] == IMPORTANCE_METHOD == "PED-ANOVA"
    page = (tmp_path / "sweep_report.html").read_text()
    assert f"Parameter importances ({IMPORTANCE_METHOD})" in page and FEW_TRIALS in page


def test_20_finished_trials_give_importances():
    assert isinstance(importances(study_of(x_alone, 20)), dict)


@pytest.mark.parametrize("seed", range(5))
def test_the_parameter_that_sets_the_objective_comes_first(tmp_path, seed):
    """30 trials, objective x plus noise a thousandth of its range: x comes first with over twice y's share.
    (PED-ANOVA gives x under 0.67 in about 1 such study in 100, measured on 200 seeds: not every seed passes.)"""
    study = study_of(x_alone, 30, seed)
    found = importances(study)
    assert list(found) == ["x", "y"] and found["x"] > 2 * found["y"]
    write_sweep_summary(study, Config(), tmp_path)
    written = json.loads((tmp_path / "sweep_summary.json").read_text())
    assert written["importances"] == found and written["importance_method"] == "PED-ANOVA"
    assert "PED-ANOVA" in (tmp_path / "sweep_report.html").read_text()
