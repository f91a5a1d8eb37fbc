"""Ignite event handlers: validation metrics, the training history, the metrics table, buffer sync and
progress (the step's own bookkeeping, the step log, is in steps.py). Each attaches itself to the events it
needs; each with state has state_dict/load_state_dict."""

from __future__ import annotations

import csv
import io
import logging
import math
import sys
import time
from pathlib import Path
from typing import Callable

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from engine.config.metric_registry import METRICS
from engine.results.calibration import (
    apply_calibration,
    calibration_from,
    expected_calibration_error,
    fit_calibration,
    tune_thresholds,
)
from engine.results.metrics import classification_metrics, decisions, macro_mean, probabilities
from engine.utils.io import write_text

log = logging.getLogger("ct3d")


class ValidationMetrics:
    """Collects the evaluator's logits and labels over an epoch, gathers them from every rank, and
    puts loss and every metric into `engine.state.metrics`. One pass feeds every metric, where
    MONAI's handlers would each keep their own copy of the outputs.

    With `fit` (training), each validation also fits what turns outputs into decisions: a calibration
    (`calibrate`: Platt per label, a temperature for multiclass) and per-label thresholds (`rule`: fixed,
    youden, fbeta) on the calibrated probabilities; the metrics use them, and `state_dict` carries them into
    the checkpoint written after it. Without `fit` (evaluate), the given `thresholds` and `calibration` are
    used as they are. The loss is always the raw logits'."""

    def __init__(self, names: list[str], task: str, loss_fn: Callable, threshold: float, beta: float,
                 rule: str = "fixed", calibrate: bool = False, bins: int = 10, fit: bool = True,
                 thresholds: list[float] | None = None, calibration: dict | None = None,
                 keep: torch.Tensor | None = None, paired: bool = False):
        if not names:
            raise ValueError("names: expected at least one label name")
        self.names, self.task, self.loss_fn = names, task, loss_fn
        self.threshold, self.beta, self.rule, self.calibrate, self.bins, self.fit = (threshold, beta, rule, calibrate,
                                                                                     bins, fit)
        self.thresholds: list[float] = list(thresholds) if thresholds else [threshold] * len(names)
        self.calibration, self.keep = calibration, keep  # keep: the labels macro figures average (None: both classes)
        self.paired = paired  # outputs are (ranked logits, decided logits) side by side: inference.with_tta(ranked=)
        self.ece: list[float] = []
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self.last_probs = self.last_labels = self.last_logits = torch.empty(0)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.compute)

    def reset(self, engine: Engine | None = None) -> None:
        self._logits, self._labels = [], []

    def update(self, engine: Engine) -> None:
        """Kept where they are (the GPU): a copy to the host per batch would wait for the device each time."""
        out = engine.state.output
        self._logits.append(out["pred"].detach().float())
        self._labels.append(out["label"].detach().float())

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All ranks' logits and labels, every sample once (ranks hold unequal, unpadded shares; a rank
        with no share validates a stand-in labelled NaN, left out here)."""
        logits, labels = (torch.cat(parts) if parts else torch.zeros(0, len(self.names))
                          for parts in (self._logits, self._labels))
        if idist.get_world_size() == 1:
            return logits.cpu(), labels.cpu()  # once per validation
        shapes = [[int(n), logits.shape[1]] for n in idist.all_gather(torch.tensor([logits.shape[0]])).tolist()]
        logits, labels = (torch.cat(idist.all_gather_tensors_with_shapes(t, shapes)).cpu() for t in (logits, labels))
        real = ~labels.isnan().any(dim=1)
        return logits[real], labels[real]

    def compute(self, engine: Engine) -> None:
        """The metrics, fitted on rank 0 alone and broadcast (under torchrun): every rank then holds the same
        numbers, thresholds and calibration, so whatever decides on them (early stopping, best.pt, a sweep's
        pruner) decides alike, however each rank's CPU would have rounded."""
        logits, labels = self.outputs()
        calibrated = None
        if self.paired:
            logits, calibrated = logits.split(len(self.names), dim=1)
        decided = self._decide(logits, labels, calibrated) if idist.get_rank() == 0 else None
        if idist.get_world_size() > 1:
            import torch.distributed as dist

            shared = [decided[:4] if decided is not None else None]
            dist.broadcast_object_list(shared, src=0)
            metrics, self.thresholds, self.calibration, self.ece = shared[0]
            probs = decided[4] if decided is not None else torch.empty(0)
        else:
            metrics, self.thresholds, self.calibration, self.ece, probs = decided
        engine.state.metrics.update(metrics)
        self.last_probs, self.last_labels, self.last_logits = probs, labels, logits

    def _decide(self, logits: torch.Tensor, labels: torch.Tensor, calibrated: torch.Tensor | None = None) -> tuple:
        """(metrics, thresholds, calibration, per-label ECE, probabilities) of the gathered outputs (`calibrated`:
        the logits decisions use, where made apart from `logits`, which AUC ranks)."""
        calibration, thresholds = self.calibration, self.thresholds
        if self.fit:  # a calibration restored from a checkpoint goes when calibration is off now
            calibration = fit_calibration(logits, labels, self.task) if self.calibrate else None
        probs = probabilities(apply_calibration(logits, calibration) if calibrated is None else calibrated, self.task)
        if self.fit and self.task != "multiclass":  # multiclass decides by arg-max: no threshold to tune
            thresholds = tune_thresholds(probs, labels, self.rule, self.beta, self.threshold)
        # rank figures (AUC) from the raw outputs: a calibration that flattens a label must not change its ranking
        metrics = classification_metrics(probabilities(logits, self.task), labels, self.names, self.task, thresholds,
                                         self.beta, decided=decisions(probs, self.task, thresholds), calibrated=probs,
                                         keep=self.keep)
        metrics["val_loss"] = float(self.loss_fn(logits, labels))
        ece = expected_calibration_error(probs, labels, self.bins)
        metrics["ece_macro"] = macro_mean(ece, labels, self.keep)
        return metrics, list(thresholds), calibration, ece, probs

    def state_dict(self) -> dict:
        """What decisions need: the checkpoint's thresholds and calibration (scale and bias; None: not
        calibrated)."""
        calibration = self.calibration or {}
        return {"thresholds": list(self.thresholds), "scale": calibration.get("scale"), "bias": calibration.get("bias")}

    def load_state_dict(self, state: dict) -> None:
        self.thresholds, self.calibration = list(state["thresholds"]), calibration_from(state)


class History:
    """The learning rate at about `lr_points` iterations per epoch (for the report), each epoch's seconds
    and the training time so far, all kept across resumes. Attach it after the validation handler and
    before Checkpoints: an epoch's time then includes its validation, and its checkpoint holds it."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr_points: int = 50):
        self.optimizer, self.lr_points = optimizer, lr_points
        self.lr_history: list[tuple[int, float]] = []
        self.epoch_seconds: list[float] = []
        self.seconds_before = 0.0  # training time of earlier runs of this run folder
        self.epoch_ended_at: float | None = None  # wall clock at the end of this start's last epoch (validated)
        self._started = self._epoch_start = time.perf_counter()

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self._started

    def _epoch_started(self, trainer: Engine) -> None:
        self._epoch_start = time.perf_counter()

    def _epoch_completed(self, trainer: Engine) -> None:
        self.epoch_seconds.append(round(time.perf_counter() - self._epoch_start, 4))
        self.epoch_ended_at = time.time()

    def _iteration(self, trainer: Engine) -> None:
        every = max(1, (trainer.state.epoch_length or 1) // self.lr_points)
        if trainer.state.iteration % every == 0 or trainer.state.iteration == 1:
            self.lr_history.append((trainer.state.iteration, self.lr))

    def state_dict(self) -> dict:
        return {"lr_history": [list(p) for p in self.lr_history], "epoch_seconds": list(self.epoch_seconds),
                "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.lr_history = [tuple(p) for p in state["lr_history"]]
        self.epoch_seconds = list(state["epoch_seconds"])
        self.seconds_before, self._started = state["seconds"], time.perf_counter()


class MetricsTable:
    """One row per validation in `metrics.csv` (rewritten atomically) with the epoch's mean training loss
    (the trainer's `train_loss` metric), the best row by the key metric, and that validation's outputs
    (probabilities and labels) for the report."""

    def __init__(self, path: Path, key: str, history: History, names: list[str], validation: ValidationMetrics,
                 mode: str = "max", beta: float = 1.0, write: bool = True):
        if mode not in ("max", "min"):
            raise ValueError(f"mode: expected 'max' or 'min', got {mode!r}")
        self.path, self.key, self.history, self.validation = Path(path), key, history, validation
        self.sign, self.beta, self.write = 1.0 if mode == "max" else -1.0, beta, write
        self.columns = ["epoch", "iteration", "train_loss", "lr", *METRICS, "seconds"]
        self.columns += [f"auc/{n}" for n in names] + [f"fbeta/{n}" for n in names]
        self.rows: list[dict] = []
        self.best: dict | None = None
        self.best_outputs: dict = {}
        self._improved_epoch: int | None = None

    def attach(self, trainer: Engine, evaluator: Engine) -> None:
        evaluator.add_event_handler(Events.STARTED, lambda _: log.info("validating epoch %d", trainer.state.epoch))
        evaluator.add_event_handler(Events.COMPLETED, lambda _: self.record(trainer, evaluator))

    def record(self, trainer: Engine, evaluator: Engine) -> bool:
        """Adds the row for this validation; True when the key metric improved."""
        m = evaluator.state.metrics
        row = {"epoch": trainer.state.epoch, "iteration": trainer.state.iteration,
               "train_loss": trainer.state.metrics.get("train_loss", float("nan")), "lr": self.history.lr,
               "seconds": round(self.history.seconds, 1)}
        row.update({c: m.get(c) for c in self.columns if c not in row})
        self.rows.append(row)
        value = row[self.key]
        improved = value is not None and not math.isnan(value) and (
            self.best is None or math.isnan(self.best[self.key]) or self.sign * value > self.sign * self.best[self.key])
        if improved or self.best is None:  # the first validation is the best so far even when NaN
            improved = improved or self.best is None
            self.best = row
            self._improved_epoch = row["epoch"]
            v = self.validation
            self.best_outputs = {"probs": v.last_probs, "labels": v.last_labels, "logits": v.last_logits,
                                 "ranks": idist.get_world_size(),  # the rows' order: see gathered_order
                                 **v.state_dict(), "ece": list(v.ece)}
        if self.write:
            self._write()
        log.info("epoch %d validation: loss %.4f, AUC macro %.4f, F%g macro %.4f%s", row["epoch"], m["val_loss"],
                 m["auc_macro"], self.beta, m["fbeta_macro"], " (best)" if improved else "")
        return improved

    def improved_at(self, epoch: int) -> bool:
        return self._improved_epoch == epoch

    def _write(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns)
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        write_text(self.path, buf.getvalue())

    def state_dict(self) -> dict:
        return {"rows": self.rows, "best": self.best, "best_outputs": self.best_outputs}

    def load_state_dict(self, state: dict) -> None:
        self.rows, self.best, self.best_outputs = list(state["rows"]), state["best"], dict(state["best_outputs"])


class SyncBuffers:
    """Copies rank 0's buffers (BatchNorm running statistics) to every rank at the end of each epoch.
    DDP broadcasts them before each forward, so after the last one each rank holds its own; without
    this, ranks would validate different models and the checkpoint would match only rank 0's."""

    def __init__(self, network: torch.nn.Module):
        self.network = network

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if idist.get_world_size() > 1:
            for buffer in self.network.buffers():
                buffer.data.copy_(idist.broadcast(buffer.data, src=0))


class Progress:
    """A tqdm bar on a terminal; plain log lines otherwise (a pod's log)."""

    def __init__(self, history: History, steps, tty: bool | None = None):  # steps: a steps.StepLog
        self.history, self.steps = history, steps
        self.tty = sys.stderr.isatty() if tty is None else tty

    def attach(self, trainer: Engine) -> None:
        if self.tty:
            from ignite.handlers import ProgressBar

            ProgressBar(persist=False).attach(trainer, metric_names=["running_loss"])
            return
        logged = Events.ITERATION_COMPLETED(event_filter=lambda engine, _: self.steps.reduced_now)
        trainer.add_event_handler(logged, self._line)

    def _line(self, trainer: Engine) -> None:
        s = trainer.state
        log.info("epoch %d/%d iteration %d/%d loss %.4f lr %.3g", s.epoch, s.max_epochs,
                 (s.iteration - 1) % s.epoch_length + 1, s.epoch_length, s.metrics.get("running_loss", math.nan),
                 self.history.lr)
