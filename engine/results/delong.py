"""DeLong's test of two models' ROC AUC on the same volumes (DeLong, DeLong & Clarke-Pearson 1988), its variance
clustered by patient (Obuchowski 1997): the paired bootstrap of the difference can reject a true null too often
at 40-200 patients (7-11% at a nominal 5% with AUCs near 0.95, tests/results/test_delong.py); this test held
4-6% for the macro there (errs conservative: 1.2% for one label at 40 patients). Our own: scipy and sklearn have
no DeLong, and it must see patients. Pure torch, one sort per label and model (O(N log N))."""

from __future__ import annotations

import math
from statistics import NormalDist

import torch

from engine.results.resampling import patient_index


def influence(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor]:
    """ROC AUC A of `scores` (N,) against 0/1 `labels` (N,) and each volume's influence on it: (V10_i - A) / m
    for the m positives and (V01_j - A) / n for the n negatives, with DeLong's structural components V10_i (the
    share of negatives that positive i outranks, ties half) and V01_j (the share of positives that outrank
    negative j). NaN with one class."""
    s, positive = scores.double(), labels.double() > 0.5
    y = positive.double()
    values, group = torch.unique(s, sorted=True, return_inverse=True)
    pos = torch.zeros(values.numel(), dtype=torch.float64).index_add_(0, group, y)
    neg = torch.zeros(values.numel(), dtype=torch.float64).index_add_(0, group, 1 - y)
    m, n = float(pos.sum()), float(neg.sum())
    if m == 0 or n == 0:
        return math.nan, torch.full_like(s, math.nan)
    v10 = ((torch.cumsum(neg, 0) - neg + 0.5 * neg) / n)[group]  # negatives strictly below, ties half
    v01 = ((m - torch.cumsum(pos, 0) + 0.5 * pos) / m)[group]  # positives strictly above, ties half
    auc = float(v10[positive].sum()) / m
    return auc, torch.where(positive, (v10 - auc) / m, (v01 - auc) / n)


def clustered_variance(psi: torch.Tensor, of_volume: torch.Tensor, count: int,
                       positive: torch.Tensor | None = None) -> float:
    """The variance of the statistic whose per-volume influence is `psi`, volumes of one patient correlated as
    they may be: each patient's influence summed before squaring. With `positive` (one label's 0/1 classes), as
    Obuchowski (1997) clusters DeLong's components: Kp / (Kp - 1) x the sum of squares of each patient's sum over
    its positive volumes, Kn / (Kn - 1) x that over its negatives, plus 2 K / (K - 1) x their products, over the
    Kp patients with a positive, the Kn with a negative and all K; with one volume per patient that is DeLong's
    S10 / m + S01 / n exactly. Without (a mean over labels, whose classes differ): K / (K - 1) x the sum of the
    patients' summed influence, squared."""
    if count < 2 or bool(psi.isnan().any()):
        return math.nan
    if positive is None:
        sums = torch.zeros(count, dtype=torch.float64).index_add_(0, of_volume, psi.double())
        return count / (count - 1) * float((sums ** 2).sum())
    is_positive = positive.double() > 0.5
    parts = [torch.zeros(count, dtype=torch.float64).index_add_(0, of_volume, torch.where(side, psi.double(), 0.0))
             for side in (is_positive, ~is_positive)]
    holds = [torch.zeros(count, dtype=torch.bool).index_fill_(0, of_volume[side], True).sum() for side in
             (is_positive, ~is_positive)]
    kp, kn = int(holds[0]), int(holds[1])
    if kp < 2 or kn < 2:
        return math.nan
    return (kp / (kp - 1) * float((parts[0] ** 2).sum()) + kn / (kn - 1) * float((parts[1] ** 2).sum())
            + 2 * count / (count - 1) * float((parts[0] * parts[1]).sum()))


def delong_test(difference: float, psi: torch.Tensor, of_volume: torch.Tensor, count: int, level: float,
                positive: torch.Tensor | None = None) -> dict:
    """{"difference", "se", "z", "p" (normal, two-sided), "interval" (at `level`)} of an AUC difference with
    per-volume influence `psi` (`positive`: one label's classes, clustered_variance); NaN where undefined (a class
    missing or in one patient only; z and p with a zero standard error)."""
    variance = math.nan if math.isnan(difference) else clustered_variance(psi, of_volume, count, positive)
    if math.isnan(variance):
        return {"difference": difference, "se": math.nan, "z": math.nan, "p": math.nan,
                "interval": [math.nan, math.nan]}
    normal, se = NormalDist(), math.sqrt(variance)
    z = difference / se if se > 0 else math.nan
    half = normal.inv_cdf(0.5 + level / 2) * se
    return {"difference": difference, "se": se, "z": z, "p": math.nan if math.isnan(z) else 2 * normal.cdf(-abs(z)),
            "interval": [difference - half, difference + half]}


def delong_comparison(probs_a: torch.Tensor, probs_b: torch.Tensor, labels: torch.Tensor, patients: list[str],
                      names: list[str], keep: torch.Tensor, level: float = 0.95) -> dict[str, dict]:
    """DeLong's test of the second model's AUC minus the first's, per label ("auc/<name>") and for the mean over
    the `keep` labels ("auc_macro", whose influence is the mean of theirs), clustered by patient."""
    count, of_volume = patient_index(patients)
    out, kept = {}, []
    for c, name in enumerate(names):
        (first, psi_a), (second, psi_b) = influence(probs_a[:, c], labels[:, c]), influence(probs_b[:, c], labels[:, c])
        out[f"auc/{name}"] = delong_test(second - first, psi_b - psi_a, of_volume, count, level, labels[:, c])
        out[f"auc/{name}"]["unreliable"] = not bool(keep[c])  # few positive patients: its own size runs hot
        if bool(keep[c]):
            kept.append((second - first, psi_b - psi_a))
    if kept:
        difference, psi = sum(d for d, _ in kept) / len(kept), torch.stack([p for _, p in kept]).mean(0)
    else:
        difference, psi = math.nan, torch.full((len(patients),), math.nan, dtype=torch.float64)
    return {"auc_macro": delong_test(difference, psi, of_volume, count, level), **out}
