"""Calibration and decisions: expected calibration error and reliability bins, Platt scaling per label (a scale
and an intercept on the logit, which a temperature alone lacks: pos_weight shifts every logit by about
log(pos_weight)) and temperature scaling for multiclass, fitted on validation logits; and per-label decision
thresholds tuned on validation. A calibration is {"scale": [...], "bias": [...] or None}: probability =
sigmoid(logit * scale + bias), softmax(logits * scale) for multiclass. Our own: MONAI and Ignite have none
of these for classification."""

from __future__ import annotations

import torch

from engine.results.metrics import roc_points


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


def _platt_nll(z: torch.Tensor, t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(a * z + b, t, reduction="none").sum(0)


def fit_platt(logits: torch.Tensor, labels: torch.Tensor, iterations: int = 100) -> tuple[list[float], list[float]]:
    """Per label, the scale a and intercept b minimising the negative log-likelihood of sigmoid(a z + b) against
    Platt's targets ((N+ + 1) / (N+ + 2) for positives, 1 / (N- + 2) for negatives, which keep a and b finite
    when the classes are separated): Newton's method on the convex two-parameter likelihood, each step halved
    until the likelihood does not rise. The slope is kept >= 0 (a label the model ranks backwards gets its base
    rate, never a reversal). A label with one class keeps a = 1, b = 0."""
    z, y = logits.double().detach(), labels.double()
    pos, neg = y.sum(0), (1 - y).sum(0)
    t = torch.where(y > 0.5, (pos + 1) / (pos + 2), 1 / (neg + 2))
    a, b = torch.ones(z.shape[1], dtype=torch.float64), torch.zeros(z.shape[1], dtype=torch.float64)
    for _ in range(iterations):
        p = torch.sigmoid(a * z + b)
        w = p * (1 - p)
        g_a, g_b = ((p - t) * z).sum(0), (p - t).sum(0)
        h_aa, h_ab, h_bb = (w * z * z).sum(0) + 1e-12, (w * z).sum(0), w.sum(0) + 1e-12
        det = (h_aa * h_bb - h_ab * h_ab).clamp(min=1e-300)
        d_a, d_b = (h_bb * g_a - h_ab * g_b) / det, (h_aa * g_b - h_ab * g_a) / det
        before, step = _platt_nll(z, t, a, b), torch.ones_like(a)
        for _ in range(40):  # halve each label's step until its likelihood does not rise
            worse = _platt_nll(z, t, a - step * d_a, b - step * d_b) > before
            if not bool(worse.any()):
                break
            step = torch.where(worse, step / 2, step)
        a, b = a - step * d_a, b - step * d_b
        if float(torch.maximum((step * d_a).abs(), (step * d_b).abs()).max()) < 1e-10:
            break
    # A slope <= 0 would reverse (or flatten) the label's ranking: intercept-only instead, the b whose sigmoid is
    # the targets' mean (the likelihood's optimum at a = 0, in closed form)
    reversed_ = a <= 0
    mean = t.mean(0).clamp(1e-12, 1 - 1e-12)
    a, b = torch.where(reversed_, torch.zeros_like(a), a), torch.where(reversed_, torch.log(mean / (1 - mean)), b)
    fit = (pos > 0) & (neg > 0)
    return ([float(v) if ok else 1.0 for v, ok in zip(a, fit)], [float(v) if ok else 0.0 for v, ok in zip(b, fit)])


def fit_calibration(logits: torch.Tensor, labels: torch.Tensor, task: str) -> dict:
    """Platt per label for sigmoid outputs; one temperature (as a shared scale) for softmax outputs."""
    if task == "multiclass":
        return {"scale": [1.0 / fit_temperature(logits, labels, task)[0]], "bias": None}
    scale, bias = fit_platt(logits, labels)
    return {"scale": scale, "bias": bias}


def calibration_from(fitted: dict | None) -> dict | None:
    """The calibration a checkpoint (or a validation's state) holds: {"scale", "bias"}, or a temperature from
    before Platt scaling (scale 1 / T, no intercept); None when uncalibrated."""
    fitted = fitted or {}
    if fitted.get("scale"):
        return {"scale": list(fitted["scale"]), "bias": list(fitted["bias"]) if fitted.get("bias") else None}
    if fitted.get("temperature"):
        return {"scale": [1.0 / t for t in fitted["temperature"]], "bias": None}
    return None


def apply_calibration(logits: torch.Tensor, calibration: dict | None) -> torch.Tensor:
    """logits * scale + bias (a shared scale for multiclass); the logits as they are without a calibration."""
    if not calibration:
        return logits
    out = logits * torch.tensor(calibration["scale"], dtype=logits.dtype, device=logits.device)
    if calibration.get("bias"):
        out = out + torch.tensor(calibration["bias"], dtype=logits.dtype, device=logits.device)
    return out


def _candidate_scores(p: torch.Tensor, y: torch.Tensor, rule: str, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Every distinct probability as a threshold (decide p >= t) and its score under `rule`."""
    t, tp, fp = roc_points(p, y)
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

