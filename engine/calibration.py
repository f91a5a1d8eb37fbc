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


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, task: str, steps: int = 100) -> list[float]:
    """Temperatures T minimising the validation negative log-likelihood of logits / T: one per label
    (sigmoid outputs), one for all classes (softmax). A label with one class in the data, or whose classes
    the logits separate perfectly (the likelihood then grows without bound as T falls), keeps T = 1."""
    logits, labels = logits.float().detach(), labels.float()
    shared = task == "multiclass"
    log_t = torch.zeros(1 if shared else logits.shape[1], requires_grad=True)
    if shared:
        top = logits.argmax(1) == labels.argmax(1)
        both = torch.full((logits.shape[1],), not bool(top.all()))
    else:
        highest_negative = torch.where(labels == 0, logits, torch.full_like(logits, -torch.inf)).max(0).values
        lowest_positive = torch.where(labels == 1, logits, torch.full_like(logits, torch.inf)).min(0).values
        both = (labels.min(0).values != labels.max(0).values) & (highest_negative >= lowest_positive)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        optimizer.zero_grad()
        scaled = logits / log_t.exp()
        if shared:
            loss = torch.nn.functional.cross_entropy(scaled, labels.argmax(1))
        else:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(scaled[:, both], labels[:, both])
        loss.backward()
        return loss

    if both.any():
        optimizer.step(nll)
    temperature = log_t.detach().exp().clamp(0.05, 20.0)
    if not torch.isfinite(temperature).all():
        temperature = torch.ones_like(temperature)
    if not shared:
        temperature[~both] = 1.0
    elif not both.any():
        temperature[:] = 1.0
    return [float(t) for t in temperature]


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

