"""Preemption: where a mid-epoch checkpoint resumes exactly, and SIGTERM (Kubernetes' notice before it
preempts or evicts a pod) turned into a checkpoint and a clean stop on every rank."""

from __future__ import annotations

import logging
import signal
from typing import Any

import torch
from ignite.engine import Engine, Events

log = logging.getLogger("ct3d")


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


class StopOnSignal:
    """SIGTERM (Kubernetes' notice of preemption or eviction; torchrun passes it on) stops training at the
    end of the current iteration, on every rank at the same one, after rank 0 wrote last.pt: the resumed
    run continues at the next batch. Installed while the trainer runs; `stopped` says whether it fired."""

    def __init__(self, checkpoints: Any):  # an engine.checkpoint.Checkpoints
        self.checkpoints, self.requested, self.stopped = checkpoints, False, False
        self._previous: Any = None

    def attach(self, trainer: Engine) -> None:
        """After Checkpoints' own handlers: at an epoch's end last.pt has just been written."""
        trainer.add_event_handler(Events.STARTED, self._install)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self, True)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self, False)

    def _install(self, trainer: Engine) -> None:
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def __call__(self, trainer: Engine, mid_epoch: bool) -> None:
        import ignite.distributed as idist

        if mid_epoch and not resumable_here(trainer):
            return  # the next step boundary, or the epoch's end, stops it
        distributed = idist.get_world_size() > 1
        requested = self.requested
        if distributed:  # any rank told to stop stops them all, at this iteration
            requested = bool(idist.all_reduce(torch.tensor(float(requested))) > 0)
        if requested:
            if mid_epoch:
                self.checkpoints.save("last", background=False)
            self.checkpoints.wait()
            if distributed:
                idist.barrier()  # rank 0 has written before any rank leaves
            self.stopped = True
            log.warning("stopped by SIGTERM at iteration %d; %s holds it: run again to continue",
                        trainer.state.iteration, self.checkpoints.folder / "last.pt")
            trainer.terminate()
