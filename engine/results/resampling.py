"""The patient-level resampling every interval rests on: which patient each volume belongs to, bootstrap and
leave-one-patient-out (jackknife) weights, and the BCa interval from their replicates (Efron & Tibshirani,
ch. 14). A resample draws patients with replacement and weighs each volume by how often its patient was drawn,
so volumes of one patient stay together (they are not independent). Our own: MONAI's metrics give point
estimates only."""

from __future__ import annotations

import math
from statistics import NormalDist

import torch


def patient_index(patients: list[str]) -> tuple[int, torch.Tensor]:
    """(how many patients, (N,) each volume's patient as 0 .. count - 1 in order of first appearance)."""
    ids = {p: i for i, p in enumerate(dict.fromkeys(patients))}
    return len(ids), torch.tensor([ids[p] for p in patients], dtype=torch.long)


def patient_weights(patients: list[str], resamples: int, seed: int) -> torch.Tensor:
    """(resamples, N) weights: how often each volume's patient was drawn in each resample."""
    count, of_volume = patient_index(patients)
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.randint(count, (resamples, count), generator=generator)
    counts = torch.zeros(resamples, count, dtype=torch.float64).scatter_add_(
        1, drawn, torch.ones(resamples, count, dtype=torch.float64))
    return counts[:, of_volume]


def jackknife_weights(patients: list[str]) -> torch.Tensor:
    """(patients, N) weights: each row leaves one patient's volumes out."""
    count, of_volume = patient_index(patients)
    return 1.0 - torch.nn.functional.one_hot(of_volume, count).T.double()


def bca_interval(replicates: torch.Tensor, estimate: float, jackknife: torch.Tensor, level: float) -> list[float]:
    """The BCa interval (Efron & Tibshirani, ch. 14) from bootstrap `replicates`, the full-data `estimate` and
    leave-one-patient-out `jackknife` values (NaN entries left out): the percentiles Phi(z0 + (z0 + z) /
    (1 - a (z0 + z))) for z = z_(tail), z_(1 - tail), with z0 the bias correction (the share of replicates
    below the estimate, ties half) and a the acceleration (skewness of the jackknife)."""
    finite = replicates[~replicates.isnan()]
    if finite.numel() < 2 or math.isnan(estimate):
        return [math.nan, math.nan]
    normal, n = NormalDist(), finite.numel()
    below = float((finite < estimate).sum() + 0.5 * (finite == estimate).sum()) / n
    z0 = normal.inv_cdf(min(max(below, 0.5 / n), 1 - 0.5 / n))
    jack = jackknife[~jackknife.isnan()]
    spread = jack.mean() - jack  # two values are symmetric (no skew), fewer have no spread: acceleration 0
    scale = float((spread ** 2).sum())
    accel = float((spread ** 3).sum()) / (6 * scale ** 1.5) if scale > 0 else 0.0
    tail = (1 - level) / 2
    out = []
    for z in (normal.inv_cdf(tail), normal.inv_cdf(1 - tail)):
        shifted = z0 + (z0 + z) / (1 - accel * (z0 + z))
        out.append(float(torch.quantile(finite, normal.cdf(shifted))))
    return out
