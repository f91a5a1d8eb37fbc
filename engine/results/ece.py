"""How far an expected calibration error (ECE) stands from noise: its patient-level BCa interval, and its floor,
the ECE a perfectly calibrated model with the same probabilities would still show at this many volumes (labels
drawn as Bernoulli(p), the same bins). At 40 volumes that floor is 0.06-0.13: an ECE of 0.08 there says nothing.
Per label for sigmoid outputs; one-vs-rest per class and top-label (the top probability against whether the top
class is right) for softmax outputs. Vectorised: each bin's gap is a weighted sum of p - y over volumes."""

from __future__ import annotations

import math

import torch

from engine.results.calibration import expected_calibration_error
from engine.results.metrics import macro_mean
from engine.results.resampling import bca_interval, patient_index, patient_weights

FLOOR_DRAWS = 200  # simulated label sets per floor: Monte Carlo error ~5% of it for 40 volumes in one bin, less beyond


def _bins(probs: torch.Tensor, bins: int) -> torch.Tensor:
    """(N, C) each probability's bin, as engine.results.calibration.reliability bins it."""
    return (probs.float() * bins).long().clamp(0, bins - 1)


def _residuals(probs: torch.Tensor, labels: torch.Tensor, bins: int) -> torch.Tensor:
    """(N, C * bins): each volume's p - y in its label's bin column, zero elsewhere. Summed over volumes, a column
    is its bin's count x (mean probability - fraction positive), whose absolute values ECE adds up."""
    columns = _bins(probs, bins) + bins * torch.arange(probs.shape[1])
    return torch.zeros(probs.shape[0], probs.shape[1] * bins, dtype=torch.float64).scatter_(
        1, columns, probs.double() - labels.double())


def _ece(sums: torch.Tensor, totals: torch.Tensor, bins: int) -> torch.Tensor:
    """(B, C) ECE from (B, C * bins) weighted residual sums and (B,) total weights; NaN with no weight."""
    ece = sums.view(sums.shape[0], -1, bins).abs().sum(2) / totals.clamp(min=1e-12)[:, None]
    return torch.where(totals[:, None] > 0, ece, torch.full_like(ece, math.nan))


def ece_intervals(probs: torch.Tensor, labels: torch.Tensor, patients: list[str], keep: torch.Tensor, bins: int,
                  resamples: int, seed: int, level: float = 0.95) -> tuple[list[list[float]], list[float]]:
    """BCa intervals at `level` of each column's ECE and of their mean over the `keep` columns, resampling
    patients (the jackknife leaves each patient out by subtraction); NaN without resamples or volumes."""
    if not probs.shape[0] or not resamples:
        return [[math.nan, math.nan] for _ in range(probs.shape[1])], [math.nan, math.nan]
    residuals = _residuals(probs, labels, bins)
    weights = patient_weights(patients, resamples, seed)
    count, of_volume = patient_index(patients)
    per_patient = torch.zeros(count, residuals.shape[1], dtype=torch.float64).index_add_(0, of_volume, residuals)
    volumes = torch.bincount(of_volume, minlength=count).double()
    figures = {"boot": _ece(weights @ residuals, weights.sum(1), bins),
               "full": _ece(residuals.sum(0, keepdim=True), torch.tensor([float(probs.shape[0])]), bins),
               "jack": _ece(per_patient.sum(0) - per_patient, probs.shape[0] - volumes, bins)}
    intervals = [bca_interval(figures["boot"][:, c], float(figures["full"][0, c]), figures["jack"][:, c], level)
                 for c in range(probs.shape[1])]
    if not bool(keep.any()):
        return intervals, [math.nan, math.nan]
    macro = {kind: values[:, keep].mean(1) for kind, values in figures.items()}
    return intervals, bca_interval(macro["boot"], float(macro["full"][0]), macro["jack"], level)


def calibration_floor(probs: torch.Tensor, bins: int, draws: int = FLOOR_DRAWS, seed: int = 0) -> list[float]:
    """Per column, the expected ECE of a perfectly calibrated model with these probabilities: the mean ECE over
    `draws` label sets drawn as Bernoulli(p), the same bins and volumes; NaN without volumes."""
    if not probs.shape[0]:
        return [math.nan] * probs.shape[1]
    generator, p = torch.Generator().manual_seed(seed), probs.double()
    index, out = _bins(probs, bins), []
    for c in range(probs.shape[1]):
        drawn = (torch.rand(draws, p.shape[0], generator=generator, dtype=torch.float64) < p[:, c]).double()
        per_bin = (p[:, c] - drawn) @ torch.nn.functional.one_hot(index[:, c], bins).double()  # (draws, bins)
        out.append(float(per_bin.abs().sum(1).mean()) / p.shape[0])
    return out


def top_label(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1) the top probability and (N, 1) whether the top class is the true one (multiclass)."""
    return probs.max(1).values[:, None], (probs.argmax(1) == labels.argmax(1)).double()[:, None]


def ece_figures(probs: torch.Tensor, labels: torch.Tensor, patients: list[str], names: list[str], task: str,
                keep: torch.Tensor, bins: int, resamples: int, seed: int, level: float = 0.95) -> dict:
    """The calibration block's ECE figures: per label and macro (the mean over the `keep` labels), their BCa
    intervals (`resamples` patient resamples) and floors (FLOOR_DRAWS simulated label sets, seeded by `seed`);
    for multiclass the top-label ECE too."""
    multiclass = task == "multiclass"
    columns_p, columns_y = probs, labels
    if multiclass:
        confidence, correct = top_label(probs, labels)
        columns_p = torch.cat([probs.double(), confidence.double()], 1)
        columns_y = torch.cat([labels.double(), correct], 1)
    ece = expected_calibration_error(probs, labels, bins)
    width = columns_p.shape[1]
    keep_columns = torch.cat([keep.bool(), torch.zeros(width - len(names), dtype=torch.bool)])
    intervals, macro_interval = ece_intervals(columns_p, columns_y, patients, keep_columns, bins, resamples, seed,
                                              level)
    floor = calibration_floor(columns_p, bins, FLOOR_DRAWS, seed)
    out = {"bins": bins, "ece_kind": "one-vs-rest per class" if multiclass else "per label",
           "ece_macro": macro_mean(ece, labels, keep), "ece": dict(zip(names, ece)),
           "ece_interval_method": "BCa", "ece_interval": dict(zip(names, intervals)),
           "ece_macro_interval": macro_interval, "ece_floor": dict(zip(names, floor)),
           "ece_macro_floor": macro_mean(floor[:len(names)], labels, keep), "ece_floor_draws": FLOOR_DRAWS}
    if multiclass:
        out.update({"ece_top_label": expected_calibration_error(confidence, correct, bins)[0],
                    "ece_top_label_interval": intervals[-1], "ece_top_label_floor": floor[-1]})
    return out
