"""cv's printed line and cv_report.html from cv_summary's dictionary: the per-fold headline first, each fold, the
pooled out-of-fold figures labelled as mixing models, the labels left out of the macro, the pooled ROC curves.
Presentation only (cv_summary.py computes; mutation testing covers it, not this page's wording)."""

from __future__ import annotations

import html
import math
from pathlib import Path

import torch

from engine.experiments.cv_summary import INTERVAL_METHOD, POOLED_NOTE
from engine.results.report import format_value as fmt
from engine.results.report import img_tag, png_bytes, roc_curve
from engine.results.tables import left_out_text
from engine.utils.io import atomic_write


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
            f"{', '.join(fmt(f.get('headline_auc_macro', f['auc_macro'])) for f in summary['folds'])}; "
            f"pooled out-of-fold "
            f"{fmt(pooled['metrics']['auc_macro'])}{f' [{_interval(boot)}]' if boot else ''} ({POOLED_NOTE})")


def _left_out(pooled: dict) -> str:
    left_out = pooled["left_out"]
    return html.escape(left_out_text(left_out["one_class"], left_out["few_positive_patients"],
                                     pooled["min_positive_patients"])) or "none"


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
                   f"<td>{fmt(f.get('headline_auc_macro', f['auc_macro']))}</td>"
                   f"<td>{_interval(f['intervals']['auc_macro'])}</td>"
                   f"<td>{fmt(f.get('headline_fbeta_macro', f['fbeta_macro']))}</td>"
                   f"<td>{_interval(f['intervals']['fbeta_macro'])}</td></tr>"
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
of the folds' own: {fmt(fbeta['mean'])} ({_spread(fbeta)}). Every fold is scored over the same labels, those each
fold's validation can carry: {html.escape(', '.join(summary['headline'].get('macro_labels', [])) or 'none')}{
    '; ' + html.escape(summary['headline']['note']) if summary['headline'].get('note') else ''}. A fold's interval
is its own run's (over its own macro labels).</p>
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
