"""The cross-validation summary from the folds' figures and best validation outputs, without training (cv.py reads
them from the fold folders). The headline is the mean of the folds' own macro AUCs, each fold's model scored on
its own validation, with its spread over folds. The pooled out-of-fold figures stay beside it, flagged: they rank
the outputs of K different models together, and a fold whose logits sit higher (another calibration, another
scale) interleaves its negatives with another fold's positives, pulling pooled AUC below every fold's own."""

from __future__ import annotations

import html
import math
from pathlib import Path

import torch

from engine.config.schema import MetricsConfig
from engine.results.metrics import classification_metrics, macro_labels, positive_patients
from engine.results.report import format_value as fmt
from engine.results.report import img_tag, png_bytes, roc_curve
from engine.results.statistics import bootstrap_intervals
from engine.utils.errors import CT3DError
from engine.utils.io import atomic_write

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
    auc = over_folds([f["auc_macro"] for f in folds])
    headline = {"figure": "auc_macro", "what": "the mean of the folds' macro AUCs, each fold's model on its own "
                "validation", "auc_macro": auc, "fbeta_macro": over_folds([f["fbeta_macro"] for f in folds])}
    return {"headline": headline, "folds": folds, "labels": names, "task": task, "auc_macro_mean": auc["mean"],
            "auc_macro_sd": auc["sd"], "pooled": out}


def _interval(iv) -> str:
    """"low to high"; n/a without one (None, or NaN: null once through JSON)."""
    return "n/a" if not iv or any(v is None or math.isnan(v) for v in iv) else f"{fmt(iv[0])} to {fmt(iv[1])}"


def _spread(figure: dict) -> str:
    """"sd S; 95% t interval over folds L to H" of an over_folds figure."""
    interval = f"; {figure['level']:.0%} t interval over folds {_interval(figure['interval'])}" \
        if figure["interval"] else ""
    return f"sd {fmt(figure['sd'])}{interval}"


def headline_text(summary: dict) -> str:
    """The printed line: the per-fold mean first, then each fold's, then the pooled figure, labelled."""
    auc, pooled = summary["headline"]["auc_macro"], summary["pooled"]
    boot = pooled.get("bootstrap", {}).get("intervals", {}).get("auc_macro")
    return (f"macro AUC, mean of the folds' own {fmt(auc['mean'])} ({_spread(auc)}); per fold "
            f"{', '.join(fmt(f['auc_macro']) for f in summary['folds'])}; pooled out-of-fold "
            f"{fmt(pooled['metrics']['auc_macro'])}{f' [{_interval(boot)}]' if boot else ''} ({POOLED_NOTE})")


def _left_out(pooled: dict) -> str:
    few = pooled["left_out"]["few_positive_patients"]
    parts = [f"one class only: {', '.join(map(html.escape, pooled['left_out']['one_class']))}"] \
        if pooled["left_out"]["one_class"] else []
    if few:
        parts.append(f"under {pooled['min_positive_patients']} positive patients: "
                     + ", ".join(f"{html.escape(n)} ({count})" for n, count in few.items()))
    return "; ".join(parts) or "none"


def _roc_png(folder: Path, names: list[str], probs: torch.Tensor, labels: torch.Tensor) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for j, name in enumerate(names):
        if labels[:, j].min() != labels[:, j].max():
            ax.plot(*roc_curve(probs[:, j].float(), labels[:, j].float()), label=name)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set(title="Pooled out-of-fold ROC curves (several models)", xlabel="false positive rate",
           ylabel="true positive rate")
    ax.legend(fontsize="small")
    roc = png_bytes(fig)
    plt.close(fig)
    with atomic_write(folder / "cv_roc.png") as tmp:
        tmp.write_bytes(roc)
    return roc


def cv_report(folder: Path, summary: dict, probs: torch.Tensor, labels: torch.Tensor) -> str:
    """One page: the headline (the folds' mean and spread), the folds' table, the pooled figures with intervals,
    flagged, the labels left out of the pooled macro, and pooled ROC curves."""
    roc = _roc_png(folder, summary["labels"], probs, labels)
    auc, fbeta = summary["headline"]["auc_macro"], summary["headline"]["fbeta_macro"]
    rows = "".join(f"<tr><td>fold {f['fold']}</td><td>{f['val_volumes']}</td><td>{f['best_epoch']}</td>"
                   f"<td>{fmt(f['auc_macro'])}</td><td>{_interval(f['intervals']['auc_macro'])}</td>"
                   f"<td>{fmt(f['fbeta_macro'])}</td><td>{_interval(f['intervals']['fbeta_macro'])}</td></tr>"
                   for f in summary["folds"])
    rows += (f"<tr><th>mean over folds (sd)</th><td></td><td></td><th>{fmt(auc['mean'])} ({fmt(auc['sd'])})</th>"
             f"<td>{_interval(auc['interval'])} (t, folds)</td><td>{fmt(fbeta['mean'])} ({fmt(fbeta['sd'])})</td>"
             f"<td>{_interval(fbeta['interval'])} (t, folds)</td></tr>")
    pooled = summary["pooled"]
    boot = pooled.get("bootstrap", {}).get("intervals", {})
    rows += (f"<tr><td>pooled across fold models*</td><td>{pooled['volumes']}</td><td></td>"
             f"<td>{fmt(pooled['metrics']['auc_macro'])}</td><td>{_interval(boot.get('auc_macro'))}</td>"
             f"<td>{fmt(pooled['metrics']['fbeta_macro'])}</td><td>{_interval(boot.get('fbeta_macro'))}</td></tr>")

    def flag(name: str) -> str:
        if name in pooled["left_out"]["one_class"]:
            return "one class only: no AUC"
        if f"auc/{name}" in pooled["unreliable"]:
            return f"unreliable: {pooled['positive_patients'][name]} positive patients"
        return ""

    per_label = "".join(f"<tr><td>{html.escape(n)}</td><td>{pooled['positive_patients'][n]}</td>"
                        f"<td>{fmt(pooled['metrics'][f'auc/{n}'])}</td><td>{_interval(boot.get(f'auc/{n}'))}</td>"
                        f"<td>{flag(n)}</td></tr>" for n in summary["labels"])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ct3d cross-validation {html.escape(folder.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}</style></head>
<body><h1>ct3d cross-validation {html.escape(folder.name)}: {len(summary['folds'])} folds</h1>
<p><b>Macro AUC, mean of the folds' own: {fmt(auc['mean'])}</b> ({_spread(auc)}; {auc['folds']} folds). Each fold's
model is scored on its own validation (disjoint patients); the interval is a {INTERVAL_METHOD}. Macro F-beta, mean
of the folds' own: {fmt(fbeta['mean'])} ({_spread(fbeta)}).</p>
<p>These are selection-set figures: each fold's best epoch was chosen on the validation it is scored on, so every
figure here is optimistic; F-beta is also decided at each fold's thresholds, tuned (with metrics.threshold_rule
other than fixed) on that fold's validation. Intervals per fold and pooled: 95% patient-level BCa bootstrap.</p>
<table><tr><th></th><th>validation volumes</th><th>best epoch</th><th>macro AUC</th><th>95% interval</th>
<th>macro F-beta</th><th>95% interval</th></tr>{rows}</table>
<p>* {POOLED_NOTE}. The pooled rows put every fold's best-epoch validation outputs together (each of the
{pooled['patients']} patients scored once, by the model that did not train on it), ranked as one set from the raw
(uncalibrated) outputs: a fold whose outputs sit higher than another's mixes its negatives among the other's
positives, so pooled AUC falls below the folds' own.</p>
<h2>Pooled per label</h2><p>The pooled macro figures average {len(pooled['macro_labels'])} of
{len(summary['labels'])} labels (at least {pooled['min_positive_patients']} positive patients:
metrics.min_positive_patients). Left out: {_left_out(pooled)}.</p>
<table><tr><th>label</th><th>positive patients</th><th>AUC</th><th>95% interval</th><th></th></tr>{per_label}</table>
{img_tag(roc, "pooled ROC curves")}</body></html>
"""
