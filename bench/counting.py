"""Counting what stalls a training step, by wrapping Python-level calls (no GPU needed): host reads of tensors
(`.item()`, `.tolist()`, `bool()`, `float()`, `int()`, `.numpy()`: each waits for the device's queue on a GPU)
on the training thread, and torch.distributed collectives. DDP's own gradient all-reduces and buffer
broadcasts run in C++ (its reducer, `_broadcast_coalesced`), so they are not counted: the figure is what we
add besides DDP's. Not counted either: the optimizer reading its step counter (torch.optim's `_get_value`), a
tensor torch keeps on the CPU on every device, so no sync on a GPU. What only a GPU shows (a boolean mask's
nonzero, a host-to-device copy) is not seen here. `Counts.attach` records both per training iteration (a
train() `attach` hook)."""

from __future__ import annotations

import sys
import threading

import torch
import torch.distributed as dist
from ignite.engine import Events

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "barrier", "monitored_barrier", "reduce", "gather", "gather_object",
               "scatter", "reduce_scatter_tensor", "all_to_all")


def _optimizer_step_count(frame) -> bool:
    code = frame.f_code
    return code.co_name == "_get_value" and code.co_filename.endswith(("optim/optimizer.py", "optim\\optimizer.py"))


class Counts:
    """While installed: `reads` (host reads on the installing thread) and `collectives` so far; `per_iteration`
    once attached to a trainer: (iteration, reads, collectives) of each iteration, from the end of the previous
    iteration's handlers to the end of its own (so the next batch, augmentation, the step and every handler)."""

    def __init__(self):
        self.reads = self.collectives = 0
        self.per_iteration: list[tuple[int, int, int]] = []
        self._undo: list = []
        self._last = (0, 0)

    def install(self) -> Counts:
        thread = threading.get_ident()

        def wrap(owner, name: str, field: str, here_only: bool):
            original = getattr(owner, name)

            def counted(*args, **kwargs):
                if not here_only or threading.get_ident() == thread and not _optimizer_step_count(sys._getframe(1)):
                    setattr(self, field, getattr(self, field) + 1)
                return original(*args, **kwargs)

            setattr(owner, name, counted)
            self._undo.append((owner, name, original))

        for name in HOST_READS:
            wrap(torch.Tensor, name, "reads", True)
        for name in COLLECTIVES:
            if hasattr(dist, name):
                wrap(dist, name, "collectives", False)
        return self

    def remove(self) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo.clear()

    def attach(self, trainer, evaluator=None) -> None:
        def mark(engine) -> None:
            now = (self.reads, self.collectives)
            self.per_iteration.append((engine.state.iteration, now[0] - self._last[0], now[1] - self._last[1]))
            self._last = now

        trainer.add_event_handler(Events.STARTED, lambda _: setattr(self, "_last", (self.reads, self.collectives)))
        trainer.add_event_handler(Events.ITERATION_COMPLETED, mark)


def classify(per_iteration: list[tuple[int, int, int]], epoch_length: int, log_every: int) -> dict:
    """Per-iteration counts split into steps that reduce the step log (every `log_every`-th iteration, and each
    epoch's last) and the others; an epoch's first iteration is left out (its window holds the previous epoch's
    validation and checkpoint)."""
    logging, plain = [], []
    for iteration, reads, collectives in per_iteration:
        if (iteration - 1) % epoch_length == 0:
            continue
        logged = iteration % log_every == 0 or iteration % epoch_length == 0
        (logging if logged else plain).append((reads, collectives))
    return {"plain_steps": len(plain), "plain_reads": sum(r for r, _ in plain),
            "plain_collectives": sum(c for _, c in plain), "logging_steps": len(logging),
            "logging_reads": sum(r for r, _ in logging), "logging_collectives": sum(c for _, c in logging)}
