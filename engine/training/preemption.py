"""Preemption: where a mid-epoch checkpoint resumes exactly, and SIGTERM (Kubernetes' notice before it
preempts or evicts a pod) noted for the checkpoints' handlers, which turn it into a checkpoint and a clean stop
on every rank."""

from __future__ import annotations

import signal
from typing import Any

from ignite.engine import Engine


def _batch_of_epoch(trainer: Engine) -> int:
    s = trainer.state
    return (s.iteration - 1) % s.epoch_length + 1


def steps_optimizer(trainer: Engine) -> bool:
    """Whether this iteration ends with an optimizer step: MONAI's rule for `accumulation_steps` (every
    acc-th batch of the epoch, and the epoch's last)."""
    batch = _batch_of_epoch(trainer)
    return batch % getattr(trainer, "accumulation_steps", 1) == 0 or batch == trainer.state.epoch_length


def resumable_here(trainer: Engine) -> bool:
    """Whether a mid-epoch checkpoint taken now resumes exactly: right after an optimizer step (no
    gradients of an accumulation window in flight), before the epoch's last batch (whose end-of-epoch
    work, validation included, belongs to the epoch-end checkpoint), and not after a NaN stop."""
    return (_batch_of_epoch(trainer) < trainer.state.epoch_length and steps_optimizer(trainer)
            and not trainer.should_terminate)


class SignalFlag:
    """SIGTERM (Kubernetes' notice of preemption or eviction; torchrun passes it on) noted, not acted on: the
    checkpoints' handlers read `requested` at the next reduce of the step log (every train.log_every
    iterations) and at the epoch's end, and stop every rank at one iteration (checkpoint.Checkpoints).
    Installed while the trainer runs."""

    def __init__(self):
        self.requested = False
        self._previous: Any = None

    def install(self, trainer: Engine | None = None) -> None:
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
