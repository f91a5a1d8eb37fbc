"""Averaging several outputs for one volume: an ensemble's members or test-time flips. Each output is
calibrated on its own first (calibrations are fitted on single outputs), the probabilities averaged, and the
mean returned as logits whose probabilities are it, so nothing downstream calibrates again. Small and pure, so
mutation testing covers it (docs/testing.md)."""

from __future__ import annotations

import torch

from engine.results.calibration import apply_calibration
from engine.results.metrics import as_logits, probabilities

FLIP_AXES = (2, 3, 4)  # the spatial axes of a (batch, channel, x, y, z) batch


def mean_probability(logits: list[torch.Tensor], calibrations: list[dict | None], task: str) -> torch.Tensor:
    """Logits whose probabilities are the mean over `logits` of probabilities(apply_calibration(z, c))."""
    if len(logits) != len(calibrations):
        raise ValueError(f"{len(logits)} outputs but {len(calibrations)} calibrations")
    mean = torch.stack([probabilities(apply_calibration(z, c), task) for z, c in zip(logits, calibrations)]).mean(0)
    return as_logits(mean, task)


def flipped_views(inputs: torch.Tensor) -> list[torch.Tensor]:
    """The batch and its flips along each spatial axis, one at a time (4 views)."""
    return [inputs] + [torch.flip(inputs, dims=(axis,)) for axis in FLIP_AXES]


def mean_thresholds(per_member: list[list[float]]) -> list[float]:
    """Per label, the mean of the members' thresholds (an ensemble's decision threshold)."""
    return [sum(column) / len(column) for column in zip(*per_member)]
