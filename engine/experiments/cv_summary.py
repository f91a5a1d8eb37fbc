"""The cross-validation summary from the folds' figures and best validation outputs, without training (cv.py reads
them from the fold folders). The headline is the mean of the folds' own macro AUCs, each fold's model scored on
its own validation, with its spread over folds. The pooled out-of-fold figures stay beside it, flagged: they rank
the outputs of K different models together, and a fold whose logits sit higher (another calibration, another
scale) interleaves its negatives with another fold's positives, pulling pooled AUC below every fold's own."""

from __future__ import annotations

import math

import torch

from engine.config.schema import MetricsConfig
from engine.results.metrics import classification_metrics, macro_labels, positive_patients
from engine.results.statistics import bootstrap_intervals
from engine.utils.errors import CT3DError

HEADLINE = "the mean of the folds' macro AUCs, each fold's model on its own validation, every fold over the same labels"
POOLED_NOTE = "pooled across fold models: mixes models whose outputs are not on one scale; not the headline"
INTERVAL_METHOD = ("t interval over folds: mean +- t(0.975, folds - 1) * sd / sqrt(folds); the folds share training "
                   "patients, so they are not independent repeats and it is, if anything, too narrow")


def _t_central(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer `df` degrees of freedom: the finite sums of Abramowitz and Stegun
    26.7.3 (odd df) and 26.7.4 (even df) in theta = atan(t / sqrt(df))."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:
        term, total = math.cos(theta), 0.0
        for k in range(1, (df - 1) // 2 + 1):  # cos, 2/3 cos^3, 2*4/(3*5) cos^5, ... up to cos^(df-2)
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + math.sin(theta) * total)
    term, total = 1.0, 0.0
    for k in range(1, df // 2 + 1):  # 1, 1/2 cos^2, 1*3/(2*4) cos^4, ... up to cos^(df-2)
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return math.sin(theta) * total


def t_quantile(probability: float, df: int) -> float:
    """The `probability` quantile (above one half) of Student's t with `df` degrees of freedom, by bisection."""
    central = 2 * probability - 1
    low, high = 0.0, 1.0
    while _t_central(high, df) < central:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if _t_central(middle, df) < central else (low, middle)
    return (low + high) / 2


def over_folds(values: list[float | None], level: float = 0.95) -> dict:
    """Mean, sample standard deviation and (with two folds or more) the t interval over the folds' figures, the
    folds without one (NaN: no label with both classes) left out and counted."""
    kept = [v for v in values if v is not None and not math.isnan(v)]
    n = len(kept)
    mean = sum(kept) / n if n else math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in kept) / (n - 1)) if n > 1 else math.nan
    half = t_quantile(1 - (1 - level) / 2, n - 1) * sd / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "sd": sd, "folds": n, "level": level,
            "interval": [mean - half, mean + half] if n > 1 else None, "interval_method": INTERVAL_METHOD}


def pool(outputs: list[dict], where: str) -> dict:
    """The folds' best validation outputs (cv.fold_outputs) as one out-of-fold set; a volume in two folds'
    validations is an error (`where`: the cross-validation's folder)."""
    pooled = {key: torch.cat([o[key] for o in outputs]) for key in ("probs", "labels", "decisions")}
    pooled.update({key: [x for o in outputs for x in o[key]] for key in ("patients", "volumes")})
    pooled["fold"] = torch.cat([torch.full((len(o["volumes"]),), k) for k, o in enumerate(outputs)])
    if len(set(pooled["volumes"])) != len(pooled["volumes"]):
        raise CT3DError(f"cv {where}: a volume is in the validation side of two folds; the folds were made with "
                        f"other settings (data.folds, data.split_seed): start a new cv (another output.name)")
    return {**pooled, "names": outputs[0]["labels_names"], "task": outputs[0]["task"]}


def label_rule(labels: torch.Tensor, patients: list[str], names: list[str], min_positive: int) -> dict:
    """Which labels the pooled macro figures average (both classes, at least `min_positive` positive patients),
    the labels left out (one class only; too few positive patients, with their counts) and the per-label interval
    keys flagged unreliable (under `min_positive` positive patients: one more or less swings them by tenths)."""
    keep, both = macro_labels(labels, patients, min_positive), macro_labels(labels, patients, 1)
    counts = dict(zip(names, positive_patients(labels, patients).tolist()))
    return {"min_positive_patients": min_positive, "macro_labels": [n for n, k in zip(names, keep) if k],
            "positive_patients": counts,
            "left_out": {"one_class": [n for n, b in zip(names, both) if not b],
                         "few_positive_patients": {n: counts[n] for n, b, k in zip(names, both, keep) if b and not k}},
            "unreliable": [f"{kind}/{n}" for n in names for kind in ("auc", "fbeta") if counts[n] < min_positive]}


def summarize(folds: list[dict], pooled: dict, metrics: MetricsConfig) -> dict:
    """cv_summary.json: the folds' rows (each with its "auc_macro" and "fbeta_macro" from its summary.json), the
    headline (the mean of their macro AUCs, its sd and interval over folds; F-beta alike) and the pooled
    out-of-fold figures (`pool`), macro over the labels with metrics.min_positive_patients positive patients."""
    names, task, labels, patients = pooled["names"], pooled["task"], pooled["labels"], pooled["patients"]
    rule = label_rule(labels, patients, names, metrics.min_positive_patients)
    keep = torch.tensor([n in rule["macro_labels"] for n in names])
    figures = classification_metrics(pooled["probs"], labels, names, task, beta=metrics.beta,
                                     decided=pooled["decisions"], keep=keep)
    out = {"note": POOLED_NOTE, "volumes": len(pooled["volumes"]), "patients": len(set(patients)),
           "metrics": figures, **rule}
    if metrics.bootstrap:
        out["bootstrap"] = bootstrap_intervals(pooled["probs"], labels, pooled["decisions"], patients, names,
                                               metrics.beta, metrics.bootstrap, metrics.bootstrap_seed,
                                               min_positive=metrics.min_positive_patients)
    headline = {"figure": "auc_macro", "what": HEADLINE, **per_fold_headline(folds, pooled, metrics)}
    auc = headline["auc_macro"]
    return {"headline": headline, "folds": folds, "labels": names, "task": task, "auc_macro_mean": auc["mean"],
            "auc_macro_sd": auc["sd"], "pooled": out}


def per_fold_headline(folds: list[dict], pooled: dict, metrics: MetricsConfig) -> dict:
    """Each fold's macro AUC and F-beta re-scored from its outputs over one label set, those every fold can carry
    (both classes and metrics.min_positive_patients positive patients in each fold's validation), into the folds'
    rows ("headline_auc_macro", "headline_fbeta_macro"), and their over_folds figures. A fold's own summary.json
    averaged its own labels: a mean over folds that averaged different labels would mix quantities."""
    names, labels, patients = pooled["names"], pooled["labels"], pooled["patients"]
    rows = [pooled["fold"] == k for k in range(len(folds))]
    own = [macro_labels(labels[r], [patients[i] for i in r.nonzero().flatten().tolist()],
                        metrics.min_positive_patients) for r in rows]
    common = torch.stack(own).all(0)
    for fold, r in zip(folds, rows):
        figures = classification_metrics(pooled["probs"][r], labels[r], names, pooled["task"], beta=metrics.beta,
                                         decided=pooled["decisions"][r], keep=common)
        fold["headline_auc_macro"], fold["headline_fbeta_macro"] = figures["auc_macro"], figures["fbeta_macro"]
    differ = [f"fold {f['fold']}: {', '.join(n for n, k in zip(names, keep) if k) or 'none'}"
              for f, keep in zip(folds, own) if not torch.equal(keep, common)]
    return {"auc_macro": over_folds([f["headline_auc_macro"] for f in folds]),
            "fbeta_macro": over_folds([f["headline_fbeta_macro"] for f in folds]),
            "macro_labels": [n for n, k in zip(names, common) if k],
            "note": (f"the folds' own macro figures average different labels ({'; '.join(differ)}); the headline "
                     f"re-scores every fold over the labels all folds carry" if differ else "")}
