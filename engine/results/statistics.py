"""Patient-level bootstrap intervals for ROC AUC and F-beta, per label and macro: bias-corrected and
accelerated (BCa; the acceleration from a jackknife over patients, engine/results/resampling.py), intervals for
the population's value, and the paired comparison of two models (with DeLong's test, engine/results/delong.py).
A macro figure averages one label set in every resample: the labels with both classes in the data and at least
`min_positive` positive patients (`macro_labels`); a label with fewer still has its own interval, flagged
unreliable (one patient more or less swings it by tenths, and averaged in it breaks the macro's coverage). A
resample in which a macro label has a single class is degenerate, left out of the macro's interval and counted.
Vectorised over resamples: 1,000 resamples of 3,000 volumes x 18 labels take seconds."""

from __future__ import annotations

import math

import torch

from engine.results.delong import delong_comparison
from engine.results.ece import ece_figures
from engine.results.metrics import decisions, macro_labels, positive_patients
from engine.results.resampling import bca_interval, jackknife_weights, patient_index, patient_weights

FEW_POSITIVE_PATIENTS = 10  # below this, a label is left out of macro figures and its interval flagged


def _weighted_auc(p: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """ROC AUC of scores `p` (N,) and 0/1 labels `y` (N,) under weights `w` (B, N), ties counting one
    half (the Mann-Whitney statistic); NaN where a resample has no positive or no negative."""
    values, group = torch.unique(p, sorted=True, return_inverse=True)  # ascending score groups
    g = values.numel()
    pos = torch.zeros(w.shape[0], g, dtype=w.dtype).index_add_(1, group, w * y)
    neg = torch.zeros(w.shape[0], g, dtype=w.dtype).index_add_(1, group, w * (1 - y))
    below = torch.cumsum(neg, dim=1) - neg  # negative weight strictly below each group
    total_pos, total_neg = pos.sum(1), neg.sum(1)
    auc = (pos * (below + 0.5 * neg)).sum(1) / (total_pos * total_neg)
    return torch.where((total_pos > 0) & (total_neg > 0), auc, torch.full_like(auc, math.nan))


def _weighted_fbeta(d: torch.Tensor, y: torch.Tensor, w: torch.Tensor, beta: float) -> torch.Tensor:
    """F-beta of decisions `d` (N,) against `y` (N,) under weights (B, N); NaN where a resample has no positive
    (recall has nothing to count: an all-negative label has no interval, not [0, 0])."""
    tp, fp, fn = w @ (d * y), w @ (d * (1 - y)), w @ ((1 - d) * y)
    b2 = beta * beta
    denominator = (1 + b2) * tp + b2 * fn + fp
    return torch.where(tp + fn > 0, (1 + b2) * tp / denominator.clamp(min=1e-12), torch.full_like(tp, math.nan))


def _aucs(p: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(B, C) AUC of each label under weights (B, N)."""
    return torch.stack([_weighted_auc(p[:, c], y[:, c], w) for c in range(p.shape[1])], dim=1)


def _both_classes(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(B, C): whether a label has positive and negative weight in each resample."""
    return ((w @ y) > 0) & ((w @ (1 - y)) > 0)


def _per_label(p, y, d, w, beta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, C) AUC, F-beta and whether both classes are present, under weights (B, N)."""
    fbetas = torch.stack([_weighted_fbeta(d[:, c], y[:, c], w, beta) for c in range(p.shape[1])], dim=1)
    return _aucs(p, y, w), fbetas, _both_classes(y, w)


def _macro(values: torch.Tensor, both: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean over the `keep` labels; NaN where one of them lacks a class (a degenerate resample)."""
    if not bool(keep.any()):
        return torch.full((values.shape[0],), math.nan, dtype=values.dtype)
    mean = values[:, keep].mean(1)
    return torch.where(both[:, keep].all(1), mean, torch.full_like(mean, math.nan))


def _label_rule(y: torch.Tensor, patients: list[str], names: list[str], min_positive: int) -> tuple:
    """(the macro labels, {name: positive patients} of every label, those of the labels with both classes but
    under `min_positive` positive patients: left out of the macro)."""
    keep = macro_labels(y, patients, min_positive)
    both = macro_labels(y, patients, 1)
    counts = dict(zip(names, positive_patients(y, patients).tolist()))
    return keep, counts, {n: counts[n] for c, n in enumerate(names) if bool(both[c]) and not bool(keep[c])}


def bootstrap_intervals(probs: torch.Tensor, labels: torch.Tensor, decisions: torch.Tensor, patients: list[str],
                        names: list[str], beta: float = 1.0, resamples: int = 1000, seed: int = 0,
                        level: float = 0.95, min_positive: int = FEW_POSITIVE_PATIENTS) -> dict:
    """BCa intervals at `level` for `auc/<name>`, `auc_macro`, `fbeta/<name>` and `fbeta_macro`, from (N, C)
    probabilities, 0/1 labels and 0/1 decisions, resampling patients. Returns {"method", "level", "resamples",
    "unit", "patients", "intervals", "degenerate" (resamples left out per figure: a label with one class),
    "macro_labels", "min_positive_patients", "few_positive_patients" ({name: positive patients} of the labels
    with both classes left out of the macro for having fewer than `min_positive`), "unreliable" (the interval
    keys of every label under `min_positive` positive patients)}."""
    if probs.shape[0] != len(patients):
        raise ValueError(f"patients: expected one per row ({probs.shape[0]}), got {len(patients)}")
    p, y, d = probs.double(), labels.double(), decisions.double()
    keep, counts, few = _label_rule(y, patients, names, min_positive)
    figures = {}
    for kind, w in (("boot", patient_weights(patients, resamples, seed)),
                    ("full", torch.ones(1, len(patients), dtype=torch.float64)),
                    ("jack", jackknife_weights(patients))):
        aucs, fbetas, both = _per_label(p, y, d, w, beta)
        figures[kind] = {"auc_macro": _macro(aucs, both, keep), "fbeta_macro": _macro(fbetas, both, keep),
                         **{f"auc/{n}": aucs[:, c] for c, n in enumerate(names)},
                         **{f"fbeta/{n}": fbetas[:, c] for c, n in enumerate(names)}}
    intervals = {key: bca_interval(boot, float(figures["full"][key][0]), figures["jack"][key], level)
                 for key, boot in figures["boot"].items()}
    degenerate = {key: int(boot.isnan().sum()) for key, boot in figures["boot"].items()}
    return {"method": "BCa", "level": level, "resamples": resamples, "unit": "patient",
            "patients": patient_index(patients)[0], "intervals": intervals, "degenerate": degenerate,
            "macro_labels": [n for n, k in zip(names, keep) if k], "min_positive_patients": min_positive,
            "few_positive_patients": few,
            "unreliable": sorted(f"{kind}/{n}" for n in names for kind in ("auc", "fbeta") if counts[n] < min_positive)}


def paired_comparison(probs_a: torch.Tensor, probs_b: torch.Tensor, labels: torch.Tensor, patients: list[str],
                      names: list[str], resamples: int = 1000, seed: int = 0, level: float = 0.95,
                      min_positive: int = FEW_POSITIVE_PATIENTS) -> dict:
    """Two models' outputs on the same volumes: macro AUC and each label's AUC of both, their difference
    (second - first) and its BCa interval, each resample scoring both models on the same drawn patients, and
    under "delong" DeLong's patient-clustered test of the same difference. The bootstrap interval can reject a
    true null too often at tens to hundreds of patients (7-11% at a nominal 5% with AUCs near 0.95): test with
    DeLong's p, show the interval as a spread."""
    y = labels.double()
    keep, _, few = _label_rule(y, patients, names, min_positive)
    weights = {"boot": patient_weights(patients, resamples, seed),
               "full": torch.ones(1, len(patients), dtype=torch.float64), "jack": jackknife_weights(patients)}
    values = {}
    for kind, w in weights.items():
        both = _both_classes(y, w)
        per_model = [_aucs(p.double(), y, w) for p in (probs_a, probs_b)]
        values[kind] = {"auc_macro": [_macro(a, both, keep) for a in per_model],
                        **{f"auc/{n}": [a[:, c] for a in per_model] for c, n in enumerate(names)}}
    delong = delong_comparison(probs_a, probs_b, y, patients, names, keep, level)
    out = {"resamples": resamples, "level": level, "method": "BCa", "unit": "patient",
           "patients": patient_index(patients)[0], "macro_labels": [n for n, k in zip(names, keep) if k],
           "min_positive_patients": min_positive, "few_positive_patients": few}
    for key in values["full"]:
        first, second = (float(v[0]) for v in values["full"][key])
        differences = {kind: values[kind][key][1] - values[kind][key][0] for kind in ("boot", "jack")}
        out[key] = {"first": first, "second": second, "difference": second - first,
                    "interval": bca_interval(differences["boot"], second - first, differences["jack"], level),
                    "degenerate": int(differences["boot"].isnan().sum()), "delong": delong[key]}
    return out


def per_label_calibration(calibration: dict | None, names: list[str]) -> dict:
    """{"scale": {label: a}, "intercept": {label: b}} (multiclass: the shared scale under every label, no
    intercept); None for each when uncalibrated."""
    if not calibration:
        return {"scale": None, "intercept": None}
    scale = calibration["scale"] * (len(names) if len(calibration["scale"]) == 1 else 1)
    bias = calibration.get("bias")
    return {"scale": dict(zip(names, scale)), "intercept": dict(zip(names, bias)) if bias else None}


def run_statistics(probs: torch.Tensor, labels: torch.Tensor, patients: list[str], names: list[str], task: str,
                   thresholds: list[float], calibration: dict | None, metrics,
                   ranked: torch.Tensor | None = None) -> dict:
    """The figures a run or an evaluation reports beside its point estimates, for summary.json and
    evaluation.json: the decision thresholds and calibration used (per label scale and intercept: probability
    = sigmoid(logit * scale + intercept); multiclass: one shared scale), expected calibration error per label
    with its interval and noise floor (engine/results/ece.py), the labels macro figures leave out (one class:
    "auc_left_out"; both, but under metrics.min_positive_patients positive patients: "below_min_positive"), and
    patient-level bootstrap intervals (`metrics`: the config's MetricsConfig). `probs` are calibrated (decisions,
    ECE); AUC intervals rank `ranked`, the uncalibrated probabilities, where given."""
    least = metrics.min_positive_patients
    keep, _, below = _label_rule(labels, patients, names, least)
    single = [n for j, n in enumerate(names) if labels.shape[0] and labels[:, j].min() == labels[:, j].max()]
    ece = ece_figures(probs, labels, patients, names, task, keep, metrics.calibration_bins, metrics.bootstrap,
                      metrics.bootstrap_seed)
    out = {
        "thresholds": dict(zip(names, thresholds)),
        "calibration": {**ece, **per_label_calibration(calibration, names)},
        "auc_macro_labels": int(keep.sum()), "auc_left_out": single, "below_min_positive": below,
        "min_positive_patients": least,
    }
    if metrics.bootstrap and probs.shape[0]:
        out["bootstrap"] = bootstrap_intervals(probs if ranked is None else ranked, labels,
                                               decisions(probs, task, thresholds), patients, names,
                                               metrics.beta, metrics.bootstrap, metrics.bootstrap_seed,
                                               min_positive=least)
    return out
