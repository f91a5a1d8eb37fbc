"""Calibration and decisions: expected calibration error and reliability bins, temperature scaling fit
on validation logits, and per-label decision thresholds tuned on validation. Our own: MONAI and Ignite
have none of these for classification."""

from __future__ import annotations

import torch


def reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> torch.Tensor:
    """(C, bins, 3): per output and equal-width probability bin, the mean predicted probability, the
    fraction of positives and the count (empty bins: NaN, NaN, 0)."""
    probs, labels = probs.float(), labels.float()
    index = (probs * bins).long().clamp(0, bins - 1)  # (N, C)
    out = torch.zeros(probs.shape[1], bins, 3)
    for c in range(probs.shape[1]):
        count = torch.bincount(index[:, c], minlength=bins).float()
        mean_p = torch.bincount(index[:, c], weights=probs[:, c], minlength=bins) / count
        frac = torch.bincount(index[:, c], weights=labels[:, c], minlength=bins) / count
        out[c] = torch.stack([mean_p, frac, count], dim=1)
    return out


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> list[float]:
    """Per output: the count-weighted mean |mean probability - fraction positive| over the bins."""
    table = reliability(probs, labels, bins)
    gaps = (table[..., 0] - table[..., 1]).abs().nan_to_num(0.0)
    counts = table[..., 2]
    return (gaps * counts).sum(dim=1).div(counts.sum(dim=1).clamp(min=1)).tolist()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, task: str, points: int = 400) -> list[float]:
    """Temperatures T minimising the validation negative log-likelihood of logits / T: one per label
    (sigmoid outputs), one for all classes (softmax). The likelihood is convex in 1/T, so a fine log-spaced
    grid over T in [0.05, 20] finds the minimum without a line search that can run off to infinity. A label
    with one class in the data, or whose classes the logits separate perfectly (the likelihood then grows
    without bound as T falls), keeps T = 1."""
    logits, labels = logits.float().detach(), labels.float()
    grid = torch.logspace(torch.log10(torch.tensor(0.05)), torch.log10(torch.tensor(20.0)), points)
    if task == "multiclass":
        if bool((logits.argmax(1) == labels.argmax(1)).all()):
            return [1.0]
        target = labels.argmax(1)
        nll = torch.stack([torch.nn.functional.cross_entropy(logits / t, target) for t in grid])
        return [float(grid[int(torch.argmin(nll))])]
    highest_negative = torch.where(labels == 0, logits, torch.full_like(logits, -torch.inf)).max(0).values
    lowest_positive = torch.where(labels == 1, logits, torch.full_like(logits, torch.inf)).min(0).values
    fit = (labels.min(0).values != labels.max(0).values) & (highest_negative >= lowest_positive)
    nll = torch.stack([torch.nn.functional.binary_cross_entropy_with_logits(logits / t, labels, reduction="none")
                       .mean(0) for t in grid])  # (points, C)
    best = grid[torch.argmin(nll, dim=0)]
    return [float(t) if ok else 1.0 for t, ok in zip(best, fit)]


def apply_temperature(logits: torch.Tensor, temperature: list[float] | None) -> torch.Tensor:
    if not temperature:
        return logits
    return logits / torch.tensor(temperature, dtype=logits.dtype, device=logits.device)


def _candidate_scores(p: torch.Tensor, y: torch.Tensor, rule: str, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Every distinct probability as a threshold (decide p >= t) and its score under `rule`."""
    order = torch.argsort(p, descending=True)
    p, y = p[order], y[order]
    tp, fp = torch.cumsum(y, 0), torch.cumsum(1 - y, 0)
    last_of_tie = torch.cat([p[1:] != p[:-1], torch.tensor([True])])
    tp, fp, t = tp[last_of_tie], fp[last_of_tie], p[last_of_tie]
    pos, neg = float(y.sum()), float((1 - y).sum())
    if rule == "youden":
        return t, tp / max(pos, 1.0) - fp / max(neg, 1.0)
    fn = pos - tp
    b2 = beta * beta
    return t, (1 + b2) * tp / ((1 + b2) * tp + b2 * fn + fp).clamp(min=1e-12)


def tune_thresholds(probs: torch.Tensor, labels: torch.Tensor, rule: str, beta: float = 1.0,
                    fixed: float = 0.5) -> list[float]:
    """Per output, the threshold that maximises Youden's J or F-beta on these outputs (decisions are
    p >= threshold); `fixed` for rule "fixed" and for outputs with one class in the data."""
    if rule == "fixed":
        return [fixed] * probs.shape[1]
    out = []
    for c in range(probs.shape[1]):
        y = labels[:, c].float()
        if y.min() == y.max():
            out.append(fixed)
            continue
        thresholds, scores = _candidate_scores(probs[:, c].float(), y, rule, beta)
        out.append(float(thresholds[int(torch.argmax(scores))]))
    return out

