"""The training step's bookkeeping without a host sync or a collective per step (StepLog: the loss, a NaN stop,
the flags of SIGTERM and the checkpoint clock, reduced once per train.log_every), and rank 0's verdict on
stopping made every rank's (share_stop)."""

from __future__ import annotations

import logging
import math
from typing import Callable

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

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
