"""Ignite event handlers: validation metrics, the metrics table, checkpoints and progress."""

from __future__ import annotations

import csv
import io
import logging
import math
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from engine.checkpoint import save_checkpoint
from engine.io import TMP_PREFIX, write_text
from engine.metrics import classification_metrics, probabilities

log = logging.getLogger("ct3d")


class ValidationMetrics:
    """Collects the evaluator's logits and labels over an epoch, gathers them from every rank, and
    puts loss and every metric into `engine.state.metrics`. One pass feeds every metric, where
    MONAI's handlers would each keep their own copy of the outputs."""

    def __init__(self, names: list[str], task: str, loss_fn: Callable, threshold: float, beta: float):
        if not names:
            raise ValueError("names: expected at least one label name")
        self.names, self.task, self.loss_fn = names, task, loss_fn
        self.threshold, self.beta = threshold, beta
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.compute)

    def reset(self, engine: Engine | None = None) -> None:
        self._logits, self._labels = [], []

    def update(self, engine: Engine) -> None:
        out = engine.state.output
        self._logits.append(out["pred"].detach().float().cpu())
        self._labels.append(out["label"].detach().float().cpu())

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All ranks' logits and labels, every sample once: ranks hold unequal, unpadded shares, so
        each pads to the largest share for the gather and the padding is cut off after."""
        logits, labels = torch.cat(self._logits), torch.cat(self._labels)
        world = idist.get_world_size()
        if world == 1:
            return logits, labels
        sizes = idist.all_gather(torch.tensor([logits.shape[0]])).tolist()
        most = max(sizes)

        def gather(t: torch.Tensor) -> torch.Tensor:
            padded = torch.cat([t, t.new_zeros(most - t.shape[0], *t.shape[1:])])
            everything = idist.all_gather(padded)
            return torch.cat([everything[r * most: r * most + n] for r, n in enumerate(sizes)])

        return gather(logits), gather(labels)

    def compute(self, engine: Engine) -> None:
        logits, labels = self.outputs()
        metrics = classification_metrics(probabilities(logits, self.task), labels, self.names, self.task,
                                         self.threshold, self.beta)
        metrics["val_loss"] = float(self.loss_fn(logits, labels))
        engine.state.metrics.update(metrics)
        self.last_probs, self.last_labels = probabilities(logits, self.task), labels


class TrainStats:
    """Mean training loss over each epoch, the current learning rate, and an LR history of about
    `lr_points` points per epoch for the report."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr_points: int = 50):
        self.optimizer, self.lr_points = optimizer, lr_points
        self.loss_sum, self.count, self.last_epoch_loss = 0.0, 0, float("nan")
        self.lr_history: list[tuple[int, float]] = []
        self.epoch_seconds: list[float] = []  # epoch start to next epoch start: every handler included
        self._epoch_start: float | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._finish)

    def _reset(self, engine: Engine) -> None:
        self.loss_sum, self.count = 0.0, 0
        now = time.perf_counter()
        if self._epoch_start is not None:
            self.epoch_seconds.append(round(now - self._epoch_start, 4))
        self._epoch_start = now

    def _update(self, engine: Engine) -> None:
        self.loss_sum += float(engine.state.output["loss"].detach())
        self.count += 1
        every = max(1, (engine.state.epoch_length or 1) // self.lr_points)
        if engine.state.iteration % every == 0 or engine.state.iteration == 1:
            self.lr_history.append((engine.state.iteration, self.lr))

    def _finish(self, engine: Engine) -> None:
        self.last_epoch_loss = self.loss_sum / max(1, self.count)

    def state_dict(self) -> dict:
        return {"lr_history": [list(p) for p in self.lr_history]}

    def load_state_dict(self, state: dict) -> None:
        self.lr_history = [tuple(p) for p in state["lr_history"]]

    @property
    def running_loss(self) -> float:
        return self.loss_sum / self.count if self.count else float("nan")

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


class MetricsTable:
    """One row per validation in `metrics.csv` (rewritten atomically), best key metric tracked."""

    def __init__(self, path: Path, key: str, stats: TrainStats, names: list[str], mode: str = "max",
                 write: bool = True):
        if mode not in ("max", "min"):
            raise ValueError(f"mode: expected 'max' or 'min', got {mode!r}")
        self.path, self.key, self.stats, self.sign = Path(path), key, stats, 1.0 if mode == "max" else -1.0
        self.columns = ["epoch", "iteration", "train_loss", "lr", "val_loss",
                        "auc_macro", "auc_micro", "fbeta_macro", "fbeta_micro", "precision", "recall",
                        "specificity", "accuracy", "seconds"]
        self.columns += [f"auc/{n}" for n in names] + [f"fbeta/{n}" for n in names]
        self.rows: list[dict] = []
        self.best: dict | None = None
        self.write = write
        self._start = time.time()

    def record(self, trainer: Engine, evaluator: Engine) -> bool:
        """Adds the row for this validation; True when the key metric improved."""
        row = {"epoch": trainer.state.epoch, "iteration": trainer.state.iteration,
               "train_loss": self.stats.last_epoch_loss, "lr": self.stats.lr,
               "seconds": round(time.time() - self._start, 1)}
        row.update({c: evaluator.state.metrics.get(c) for c in self.columns if c not in row})
        self.rows.append(row)
        value = row[self.key]
        improved = value is not None and not math.isnan(value) and (
            self.best is None or math.isnan(self.best[self.key]) or self.sign * value > self.sign * self.best[self.key])
        if improved or self.best is None:
            self.best = row
        if self.write:
            self._write()
        return improved

    def _write(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns)
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        write_text(self.path, buf.getvalue())

    def state_dict(self) -> dict:
        return {"rows": self.rows, "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.rows, self.best = list(state["rows"]), state["best"]


def _snapshot(value):
    """A copy of a checkpoint state that later training steps cannot change (tensors cloned to CPU)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_snapshot(v) for v in value)
    return value


class Checkpoints:
    """best.pt when the key metric improves, last.pt after every epoch, final.pt at the end.
    Our own: Ignite's Checkpoint cannot overwrite a fixed file name and does not fsync.
    The state is snapshotted at once and written (atomically) by a background thread, so training
    does not wait on the disk; the next save, and `wait()`, wait for the previous write."""

    def __init__(self, folder: Path, make_state: Callable[[], dict], write: bool = True):
        self.folder, self.make_state, self.write = Path(folder), make_state, write
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None
        if write:  # clear temp files left by a killed writer (one process writes a run folder)
            for stale in self.folder.glob(f"{TMP_PREFIX}*"):
                stale.unlink(missing_ok=True)

    def save(self, *names: str, background: bool = True) -> list[Path]:
        """Writes the current state to each `name`.pt (in this order); a no-op where write is False."""
        if not self.write:
            return []
        state = _snapshot(self.make_state())
        paths = [self.folder / f"{name}.pt" for name in names]
        self.wait()

        def write() -> None:
            try:
                for path in paths:
                    save_checkpoint(path, state)
            except BaseException as exc:  # re-raised in the training thread by wait()
                self._error = exc

        if background:
            self._writer = threading.Thread(target=write, name="ct3d-checkpoint", daemon=False)
            self._writer.start()
        else:
            write()
            self.wait()
        return paths

    def wait(self) -> None:
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


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

    def __init__(self, stats: TrainStats, log_every: int, tty: bool | None = None):
        self.stats, self.log_every = stats, log_every
        self.tty = sys.stderr.isatty() if tty is None else tty

    def attach(self, trainer: Engine) -> None:
        if self.tty:
            from ignite.handlers import ProgressBar

            ProgressBar(persist=False).attach(trainer, output_transform=lambda out: {"loss": float(out["loss"].detach())})
            return
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=self.log_every), self._line)

    def _line(self, trainer: Engine) -> None:
        s = trainer.state
        log.info("epoch %d/%d iteration %d/%d loss %.4f lr %.3g", s.epoch, s.max_epochs,
                 (s.iteration - 1) % s.epoch_length + 1, s.epoch_length, self.stats.running_loss, self.stats.lr)
