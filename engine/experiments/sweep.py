"""`sweep`: hyper-parameter search with Optuna. The study lives in a journal file
(output.dir/<name>/study.journal; Optuna's JournalFileBackend needs no database server, so worker
processes, or pods on a shared claim, share one study). Each trial is a normal run folder
(<name>/trial000, ...). Workers claim trials under a file lock, so the study holds exactly
`sweep.trials` trials that did not fail; a running trial's worker touches a heartbeat file, and a trial
silent for four heartbeats (its worker was killed, its node lost) is marked failed with the reason and
retried with the same parameters in the same run folder, resuming from its last checkpoint. Pruned
trials stop through the trainer's terminate (as Ignite's EarlyStopping does), the reason recorded."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from engine.config.loading import to_yaml, with_overrides
from engine.config.schema import Config
from engine.config.space import check_space, metric_and_direction
from engine.experiments.sweep_report import write_sweep_summary
from engine.training.build import setup_logging
from engine.training.workflow import train
from engine.utils.errors import CT3DError, Interrupted
from engine.utils.io import write_text

log = logging.getLogger("ct3d")
JOURNAL = "study.journal"
LOST_AFTER = 4  # heartbeats


def study_folder(cfg: Config) -> Path:
    return Path(cfg.output.dir) / (cfg.output.name or "sweep")


def suggest(trial, space: dict[str, dict]) -> dict[str, Any]:
    params = {}
    for key, spec in space.items():
        if "choices" in spec:
            params[key] = trial.suggest_categorical(key, list(spec["choices"]))
        elif spec.get("type") == "int":
            params[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]))
        else:
            params[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]),
                                              log=spec.get("type") == "log")
    return params


def startup_trials(trials: int) -> int:
    """TPE's random start-up trials for a budget of `trials`: a third of it, 2 to 10 (Optuna's default of 10
    made a 10-trial sweep pure random search)."""
    return max(2, min(10, trials // 3))


def median_at(study, step: int, number: int) -> float | None:
    """What MedianPruner compares a trial with at `step`: the median of the completed trials' values there."""
    import statistics

    from optuna.trial import TrialState

    values = [t.intermediate_values[step] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if step in t.intermediate_values and t.number != number]
    return statistics.median(values) if values else None


def open_study(cfg: Config, worker: int = 0):
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

    folder = study_folder(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    path = str(folder / JOURNAL)
    storage = JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
    # Steps are epochs, from 1; Optuna prunes from step n_warmup_steps on: none at or before the warm-up's last epoch.
    pruner = optuna.pruners.MedianPruner(n_startup_trials=cfg.sweep.pruner_startup_trials,
                                         n_warmup_steps=cfg.sweep.pruner_warmup_epochs + 1) \
        if cfg.sweep.pruner == "median" else optuna.pruners.NopPruner()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=cfg.sweep.seed + 7919 * worker,
                                         n_startup_trials=startup_trials(cfg.sweep.trials))
    study = optuna.create_study(study_name=folder.name, storage=storage, direction=metric_and_direction(cfg)[1],
                                sampler=sampler, pruner=pruner, load_if_exists=True)
    return study, storage


def _heartbeat(run: Path) -> Path:
    return run / "heartbeat"


def reap_lost(study, storage, cfg: Config) -> None:
    """Marks running trials whose heartbeat stopped as failed, with the reason, and queues each again with
    its parameters and run folder (so the retry resumes from the folder's last checkpoint)."""
    from optuna.trial import TrialState

    silent = LOST_AFTER * cfg.sweep.heartbeat_seconds
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        run = Path(cfg.output.dir) / t.user_attrs.get("run", "")
        beat = _heartbeat(run)
        last = t.datetime_start.timestamp()  # a retry's folder holds the lost worker's old heartbeat
        if "run" in t.user_attrs and beat.is_file():
            last = max(last, beat.stat().st_mtime)
        if time.time() - last > silent:
            reason = f"worker lost: no heartbeat for {time.time() - last:.0f} s (more than {silent:g} s)"
            storage.set_trial_user_attr(t._trial_id, "failure", reason)
            study.tell(t.number, state=TrialState.FAIL)
            study.enqueue_trial(t.params, user_attrs={"run": t.user_attrs.get("run", ""), "retry_of": t.number})
            log.warning("sweep: trial %d failed (%s); queued again to resume", t.number, reason)


def claim(study, storage, cfg: Config):
    """The next trial to run (a queued retry first), or None when the study has its trials; waits while
    another worker's trials are still running (one of them may be lost and need a retry)."""
    from optuna.storages.journal import JournalFileOpenLock
    from optuna.trial import TrialState

    lock = JournalFileOpenLock(str(study_folder(cfg) / "claims"))
    while True:
        lock.acquire()
        try:
            reap_lost(study, storage, cfg)
            trials = study.get_trials(deepcopy=False)
            counted = [t for t in trials if t.state != TrialState.FAIL]
            failed = [t for t in trials if t.state == TrialState.FAIL  # lost workers' trials are retried
                      and not t.user_attrs.get("failure", "").startswith("worker lost")]
            if len(failed) > cfg.sweep.trials:  # every trial fails: a data or config error, not bad luck
                raise CT3DError(f"sweep {study_folder(cfg)}: {len(failed)} trials failed (more than sweep.trials="
                                f"{cfg.sweep.trials}); the last: {failed[-1].user_attrs.get('failure', '?')}")
            if len(counted) < cfg.sweep.trials or any(t.state == TrialState.WAITING for t in trials):
                return study.ask()
            running = any(t.state == TrialState.RUNNING for t in trials)
        finally:
            lock.release()
        if not running:
            return None
        time.sleep(cfg.sweep.heartbeat_seconds)


class Beat:
    """Writes the worker's pid to a trial's heartbeat file and touches it every `seconds` while it runs."""

    def __init__(self, path: Path, seconds: float):
        self.path, self.seconds, self._stop = path, seconds, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(f"{os.getpid()}\n")  # which process runs the trial
        while not self._stop.wait(self.seconds):
            try:
                self.path.touch()
            except OSError as exc:  # a shared filesystem's hiccup must not end the heartbeat
                log.warning("sweep: heartbeat %s: %s", self.path, exc)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def pruning(trial, metric: str, reason: dict):
    """A hook for train(): after each validation, report the metric to Optuna; when its pruner says so,
    record why and stop the trainer."""
    from ignite.engine import Events

    def attach(trainer, evaluator) -> None:
        reported: list[float] = []  # this trial's values so far: the pruner compares the best of them

        def report(engine) -> None:
            from optuna.exceptions import UpdateFinishedTrialError
            from optuna.study import StudyDirection

            value = engine.state.metrics.get(metric)
            if value is None or math.isnan(value):
                return
            reported.append(value)
            try:
                trial.report(value, step=trainer.state.epoch)
            except UpdateFinishedTrialError:  # marked lost (a silent heartbeat) and retried elsewhere: stop
                reason["text"] = "taken over: the trial was marked failed and retried by another worker"
                trainer.terminate()
                return
            if trial.should_prune():
                median = median_at(trial.study, trainer.state.epoch, trial.number)
                compared = f" ({median:.4f})" if median is not None else ""
                best = (max if trial.study.direction == StudyDirection.MAXIMIZE else min)(reported)
                reason["text"] = (f"pruned at epoch {trainer.state.epoch}: {metric}'s best so far, {best:.4f}, is "
                                  f"worse than the median of the completed trials at that epoch{compared}")
                trial.set_user_attr("pruned", reason["text"])
                log.info("sweep: trial %d %s", trial.number, reason["text"])
                trainer.terminate()

        evaluator.add_event_handler(Events.COMPLETED, report)

    return attach


def run_trial(study, trial, cfg: Config, space: dict[str, dict]) -> None:
    import json

    from optuna.trial import TrialState

    params = suggest(trial, space)
    retry = "retry_of" in trial.user_attrs
    run = trial.user_attrs.get("run") or f"{study_folder(cfg).name}/trial{trial.number:03d}"
    trial.set_user_attr("run", run)
    metric = metric_and_direction(cfg)[0]
    # only a retry resumes its folder's checkpoint; a new trial never continues a stale folder's run
    trial_cfg = with_overrides(cfg, {**params, "output.name": run, "train.resume": "auto" if retry else "off"},
                               f"sweep trial {trial.number}")
    log.info("sweep: trial %d in %s: %s", trial.number, run, ", ".join(f"{k}={v}" for k, v in params.items()))
    reason: dict = {}
    try:
        with Beat(_heartbeat(Path(cfg.output.dir) / run), cfg.sweep.heartbeat_seconds):
            folder = train(trial_cfg, attach=pruning(trial, metric, reason))
    except Interrupted:  # SIGTERM (a pod preempted): the trial stays running; its heartbeat stops and a
        raise  # worker retries it from the checkpoint just written
    except Exception as exc:  # noqa: BLE001 - any error (a CUDA OOM, a bad volume) fails this trial, not the study
        trial.set_user_attr("failure", f"{type(exc).__name__}: {exc}" if not isinstance(exc, CT3DError) else str(exc))
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        log.warning("sweep: trial %d failed: %s", trial.number, exc)
        return
    if reason:
        study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
        return
    value = json.loads((folder / "summary.json").read_text())["best"].get(metric)
    if value is None or math.isnan(value):
        trial.set_user_attr("failure", f"{metric} was never a number (a label with one class only?)")
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        return
    study.tell(trial, value, skip_if_finished=True)


def work(cfg: Config, worker: int) -> None:
    """One worker: claims and runs trials until the study has them all."""
    space = check_space(cfg)
    study, storage = open_study(cfg, worker)
    while (trial := claim(study, storage, cfg)) is not None:
        run_trial(study, trial, cfg, space)


def sweep(cfg: Config) -> Path:
    """`sweep`: `sweep.workers` local processes (or this one) work on the study, then the summary."""
    setup_logging()
    check_space(cfg)
    folder = study_folder(cfg)
    worker = int(os.environ.get("CT3D_SWEEP_WORKER", os.environ.get("JOB_COMPLETION_INDEX", "0")))
    if cfg.sweep.workers == 1:
        work(cfg, worker)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / "sweep.yaml", to_yaml(cfg))
        procs = [subprocess.Popen([sys.executable, "-m", "engine.run", "sweep", "--config", str(folder / "sweep.yaml"),
                                   "sweep.workers=1"], env={**os.environ, "CT3D_SWEEP_WORKER": str(i)})
                 for i in range(cfg.sweep.workers)]
        codes = [p.wait() for p in procs]
        if any(codes):
            log.warning("sweep: worker exit codes %s", codes)
    summary = write_sweep_summary(open_study(cfg, worker)[0], cfg, folder)
    best = summary.get("best")
    print(f"\nct3d sweep {folder}: {summary['counts']}"
          + (f"; best trial {best['number']} {summary['metric']} {best['value']:.4f} ({best['params']}) in "
             f"{best['run']}" if best else "")
          + f"\n-> {folder / 'sweep_summary.json'}, {folder / 'sweep_report.html'}")
    return folder
