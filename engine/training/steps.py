"""The training step's bookkeeping without a host sync or a collective per step (StepLog: the loss, a NaN stop,
the flags of SIGTERM and the checkpoint clock, reduced once per train.log_every), what stops a run (early
stopping, rank 0's verdict made every rank's) and how it ends (run_to_end)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import EarlyStopping

from engine.training.checkpoint import Checkpoints, Resume, find_latest_checkpoint, load_checkpoint, progress_of
from engine.training.handlers import MetricsTable
from engine.training.ranks import on_rank_0
from engine.utils.errors import CT3DError, Interrupted

log = logging.getLogger("ct3d")


class StepLog:
    """The training step's bookkeeping without a host sync or a collective per step. Each iteration adds its
    loss and a not-finite flag to a tensor on the training device. Every `every` iterations (train.log_every),
    at the epoch's last one, and at every iteration while `keep_reducing` is set (a stop or save is pending),
    one all-reduce carries [loss sum, not-finite count, steps, then each `request`'s flag] from every rank and
    is read on the host once. Then: `running_loss` (the window's mean over ranks, for progress and W&B) and,
    at the epoch's last iteration, `train_loss` (the epoch's mean) in `engine.state.metrics`; `flags` (each
    request summed over ranks > 0, the same on every rank); with `stop_on_nan`, a not-finite loss on any rank
    stops every rank at the same iteration (`diverged`). Replaces Ignite's Average / RunningAverage /
    TerminateOnNan, which each all-reduce and read the loss every step. state_dict: the epoch's sums so far
    (taken at a reduce, so exact), so a resumed epoch logs the loss an uninterrupted one would."""

    def __init__(self, every: int, stop_on_nan: bool = True):
        self.every, self.stop_on_nan = every, stop_on_nan
        self.requests: list[Callable[[], bool]] = []
        self.flags: list[bool] = []
        self.reduced_now = self.keep_reducing = self.diverged = False
        self.running_loss = math.nan
        self.epoch_sum, self.epoch_steps = 0.0, 0
        self._window: torch.Tensor | None = None  # [loss sum, not-finite count] on the device
        self._steps = 0

    def request(self, flag: Callable[[], bool]) -> int:
        """Adds a host-side flag to every reduce; returns its index in `flags`."""
        self.requests.append(flag)
        self.flags.append(False)
        return len(self.requests) - 1

    def attach(self, trainer: Engine) -> None:
        """After the resume's handler: a start at an epoch's boundary (fresh, at an epoch's end, or an epoch to
        be run again after a mid-epoch checkpoint of another batch size) begins with empty sums."""
        trainer.add_event_handler(Events.STARTED, self._started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._step)

    def _started(self, engine: Engine) -> None:
        if engine.state.epoch_length and engine.state.iteration % engine.state.epoch_length == 0:
            self.epoch_sum, self.epoch_steps = 0.0, 0

    def due(self, engine: Engine) -> bool:
        s = engine.state
        return self.keep_reducing or s.iteration % self.every == 0 or s.iteration % s.epoch_length == 0

    def _step(self, engine: Engine) -> None:
        loss = engine.state.output["loss"].detach().float().sum()
        if self._window is None:
            self._window = torch.zeros(2, device=loss.device)
        self._window += torch.stack([loss, (~torch.isfinite(loss)).float()])
        self._steps += 1
        self.reduced_now = self.due(engine)
        if self.reduced_now:
            self._reduce(engine)

    def _reduce(self, engine: Engine) -> None:
        host = torch.tensor([float(self._steps)] + [float(bool(flag())) for flag in self.requests])
        values = torch.cat([self._window, host.to(self._window.device)])
        if idist.get_world_size() > 1:
            values = idist.all_reduce(values)
        loss_sum, bad, steps, *flags = values.tolist()  # the one host read per window
        self._window.zero_()
        self._steps = 0
        self.flags = [flag > 0 for flag in flags]
        self.running_loss = loss_sum / steps
        self.epoch_sum, self.epoch_steps = self.epoch_sum + loss_sum, self.epoch_steps + int(steps)
        engine.state.metrics["running_loss"] = self.running_loss
        if engine.state.iteration % engine.state.epoch_length == 0:  # the epoch's mean, then a fresh epoch
            engine.state.metrics["train_loss"] = self.epoch_sum / self.epoch_steps
            self.epoch_sum, self.epoch_steps = 0.0, 0
        if self.stop_on_nan and bad > 0:
            self.diverged = True
            log.warning("a loss was NaN or infinite in the last %d iteration(s): stopping", int(steps))
            engine.terminate()

    def state_dict(self) -> dict:
        return {"epoch_sum": self.epoch_sum, "epoch_steps": self.epoch_steps}

    def load_state_dict(self, state: dict) -> None:
        self.epoch_sum, self.epoch_steps = float(state["epoch_sum"]), int(state["epoch_steps"])


def share_stop(trainer: Engine, evaluator: Engine) -> None:
    """Under torchrun, after each validation (attach it last): rank 0's verdict on stopping, whatever set it
    (early stopping, a sweep's pruner), becomes every rank's, by one broadcast a validation."""

    def decide(_: Engine) -> None:
        if idist.get_world_size() > 1:
            verdict = idist.broadcast(torch.tensor(float(trainer.should_terminate)), src=0)
            trainer.should_terminate = bool(verdict > 0)

    evaluator.add_event_handler(Events.COMPLETED, decide)


def early_stopping(trainer: Engine, evaluator: Engine, key: str, mode: str, patience: int,
                   min_delta: float) -> EarlyStopping:
    """Ignite's EarlyStopping on the `key` metric after each validation (NaN counts as no improvement)."""
    sign = 1.0 if mode == "max" else -1.0

    def score(engine: Engine) -> float:
        value = engine.state.metrics[key]
        return -math.inf if value is None or math.isnan(value) else sign * value

    stopper = EarlyStopping(patience, score, trainer, min_delta=min_delta)
    evaluator.add_event_handler(Events.COMPLETED, stopper)
    return stopper


def run_to_end(trainer: Engine, checkpoints: Checkpoints, table: MetricsTable, resume: Resume, folder: Path,
               steps: StepLog) -> Callable[[], None]:
    """Runs the trainer. A diverged loss (the step log saw a NaN or infinite loss on some rank: every rank
    stopped at the same iteration) is a clear error on every rank, and no final.pt with NaN weights is written:
    last.pt holds the last good state. Returns what completes the checkpoints (waits for the last epoch's
    write, then final.pt unless this start found the run finished and final.pt there)."""
    try:
        trainer.run()
    except BaseException:
        checkpoints.wait()
        raise
    finally:
        checkpoints.on_signal.restore()
    if checkpoints.stopped:
        checkpoints.wait()
        raise Interrupted(f"stopped by SIGTERM at iteration {trainer.state.iteration}; "
                          f"{folder / 'checkpoints' / 'last.pt'} holds it: run again to continue")
    if steps.diverged:
        checkpoints.wait()
        kept = find_latest_checkpoint(folder / "checkpoints")  # none yet when it diverged in the first epoch
        where = f"The last good state is {kept}" if kept else "No checkpoint was written before it"
        raise CT3DError(f"training stopped at epoch {trainer.state.epoch}, iteration {trainer.state.iteration}: "
                        f"the loss became NaN or infinite (mean of the last reduce: {steps.running_loss:g}). {where}; "
                        f"try a lower train.lr, train.amp=off, or check the data")
    if not table.rows:
        checkpoints.wait()
        raise CT3DError(f"run {folder}: no validation was recorded; nothing to summarise")
    # every rank takes the same branch (save_final gathers from all): rank 0's view of the disk decides
    final = folder / "checkpoints" / "final.pt"
    at = (trainer.state.epoch, trainer.state.iteration)
    # finished before this start, and final.pt holds that very state (an extension stopped in its last validation
    # leaves an older final.pt: written again, so final.pt and summary.json describe the same model)
    finished = trainer.state.epoch == resume.epoch and on_rank_0(lambda: final_holds(final, at))
    return checkpoints.wait if finished else checkpoints.save_final


def final_holds(final: Path, progress: tuple) -> bool:
    """Whether `final` exists and was taken at `progress` (epoch, iteration)."""
    if not final.is_file():
        return False
    try:
        return progress_of(load_checkpoint(final, mmap=True)) == tuple(progress)
    except Exception:  # unreadable: written again
        return False
