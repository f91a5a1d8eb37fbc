"""Validation metrics from MONAI's metric functions: ROC AUC and F-beta per label, macro and micro,
and precision, recall, specificity and accuracy at a threshold (one for all labels, or one per label).
Every macro figure averages one label set: the labels with both classes in the data (`macro_labels`); a
label with no positive (or no negative) is left out of macro AUC and macro F-beta alike, and counted."""

from __future__ import annotations

import torch
from monai.metrics import compute_roc_auc
from monai.metrics.confusion_matrix import compute_confusion_matrix_metric, get_confusion_matrix
from monai.metrics.f_beta_score import compute_f_beta_score

from engine.config.metric_registry import computed


def probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=1) if task == "multiclass" else torch.sigmoid(logits.float())


def as_logits(probs: torch.Tensor, task: str) -> torch.Tensor:
    """Logits whose `probabilities` are `probs` (for averaged probabilities: ensembles, test-time flips)."""
    return torch.log(probs.clamp_min(1e-12)) if task == "multiclass" else torch.logit(probs, eps=1e-7)


def decisions(probs: torch.Tensor, task: str, threshold: float | list[float]) -> torch.Tensor:
    """0/1 per output: the arg-max class for multiclass, probability >= its threshold otherwise."""
    if task == "multiclass":
        return torch.nn.functional.one_hot(probs.argmax(dim=1), probs.shape[1]).float()
    return (probs >= torch.as_tensor(threshold, dtype=probs.dtype)).float()


def roc_points(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(thresholds, true positives, false positives) at every distinct score of one label, highest first:
    deciding p >= threshold, tied scores decided together (MONAI computes the area only)."""
    order = torch.argsort(probs, descending=True)
    p, y = probs[order], labels[order]
    tp, fp = torch.cumsum(y, 0), torch.cumsum(1 - y, 0)
    last_of_tie = torch.cat([p[1:] != p[:-1], torch.tensor([True])])
    return p[last_of_tie], tp[last_of_tie], fp[last_of_tie]


def positive_patients(labels: torch.Tensor, patients: list[str] | None = None) -> torch.Tensor:
    """(C,) per label, how many patients have a positive volume (`patients`: one id per row; None: each row its own
    patient)."""
    if patients is None:
        return (labels > 0.5).sum(0)
    if len(patients) != labels.shape[0]:
        raise ValueError(f"patients: expected one per row ({labels.shape[0]}), got {len(patients)}")
    ids = {p: i for i, p in enumerate(dict.fromkeys(patients))}
    of_row = torch.tensor([ids[p] for p in patients], dtype=torch.long)
    per_patient = torch.zeros(len(ids), labels.shape[1]).index_add_(0, of_row, (labels > 0.5).float())
    return (per_patient > 0).sum(0)


def macro_labels(labels: torch.Tensor, patients: list[str] | None = None, min_positive: int = 1) -> torch.Tensor:
    """(C,) bool: the labels every macro figure averages: both classes in the data and at least `min_positive`
    positive patients (`patients`: one id per row; None counts rows). A label below it still has its own figure,
    but one positive patient more or less swings it by tenths: averaged in, it would carry the macro's interval
    with it (docs/statistics.md)."""
    if not labels.shape[0]:
        return torch.zeros(labels.shape[1], dtype=torch.bool)
    return (labels.amax(0) != labels.amin(0)) & (positive_patients(labels, patients) >= min_positive)


def macro_mean(values: list[float], labels: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    """The mean of per-label `values` over the labels every macro figure averages (`keep`; macro_labels(labels)
    by default): a label with one class in the data has no calibration error to speak of, nor an AUC."""
    return _mean_over(values, macro_labels(labels) if keep is None else keep)


def _mean_over(values: list[float], keep: torch.Tensor) -> float:
    chosen = [v for v, k in zip(values, keep.tolist()) if k]
    return sum(chosen) / len(chosen) if chosen else float("nan")


def _auc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC, NaN when only one class is present (MONAI warns and returns NaN too)."""
    if labels.min() == labels.max():
        return float("nan")
    return float(compute_roc_auc(probs, labels))


def confusion(probs: torch.Tensor, labels: torch.Tensor, task: str, threshold: float | list[float]) -> torch.Tensor:
    """(num_outputs, 4) counts: tp, fp, tn, fn per output."""
    return get_confusion_matrix(decisions(probs, task, threshold), labels).sum(dim=0)


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor, names: list[str], task: str,
                           threshold: float | list[float] = 0.5, beta: float = 1.0,
                           decided: torch.Tensor | None = None, calibrated: torch.Tensor | None = None,
                           keep: torch.Tensor | None = None) -> dict[str, float]:
    """Every validation metric from (N, C) probabilities and (N, C) 0/1 labels. Macro AUC and macro F-beta
    average the labels with both classes present (`macro_labels`); `auc_labels` says how many that was.
    `decided`: 0/1 decisions to use instead of thresholding `probs`. Metrics added to the registry with a
    `compute` of their own follow the built-ins, given `calibrated` probabilities where `probs` are the raw
    ones AUC ranks. `keep`: the labels the macro figures average (macro_labels with the run's patients and
    metrics.min_positive_patients); by default those with both classes. F-beta of a label with no positive is
    undefined (NaN, shown n/a): recall has nothing to count."""
    probs, labels = probs.float().cpu(), labels.float().cpu()
    per_label_auc = [_auc(probs[:, j], labels[:, j]) for j in range(labels.shape[1])]
    keep = macro_labels(labels) if keep is None else keep.bool().cpu()
    # decisions made elsewhere: cross-validation decides each fold at its own thresholds
    decided = decisions(probs, task, threshold) if decided is None else decided.float().cpu()
    cm = get_confusion_matrix(decided, labels).sum(dim=0)
    cm_all = cm.sum(dim=0)
    fbeta = [f if positive else float("nan")
             for f, positive in zip(compute_f_beta_score(cm, beta).flatten().tolist(), (labels.amax(0) > 0.5).tolist())]
    out = {
        "auc_macro": _mean_over(per_label_auc, keep),
        "auc_labels": float(keep.sum()),
        "auc_micro": _auc(probs.flatten(), labels.flatten()),
        "fbeta_macro": _mean_over(fbeta, keep),
        "fbeta_micro": float(compute_f_beta_score(cm_all, beta)),
        "precision": float(compute_confusion_matrix_metric("precision", cm_all)),
        "recall": float(compute_confusion_matrix_metric("sensitivity", cm_all)),
        "specificity": float(compute_confusion_matrix_metric("specificity", cm_all)),
        "accuracy": float(compute_confusion_matrix_metric("accuracy", cm_all)),
    }
    if task == "multiclass":  # micro accuracy over one-hot cells counts true negatives; report top-1
        out["accuracy"] = float((probs.argmax(1) == labels.argmax(1)).float().mean())
    for metric in computed():
        out[metric.name] = float(metric.compute(probs if calibrated is None else calibrated.float().cpu(), labels,
                                                decided))
    for name, auc, fb in zip(names, per_label_auc, fbeta):
        out[f"auc/{name}"] = auc
        out[f"fbeta/{name}"] = fb
    return out
