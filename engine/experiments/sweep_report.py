"""A sweep's sweep_summary.json and sweep_report.html: the best trial, parameter importances (Optuna's
PED-ANOVA evaluator, from 20 finished trials on) and every trial with its state, value, parameters, run folder
and, for failed or pruned trials, why."""

from __future__ import annotations

import html
import math
from collections import Counter
from pathlib import Path

from engine.config.schema import Config
from engine.config.space import metric_and_direction
from engine.results.report import img_tag, png_bytes
from engine.utils.io import write_json, write_text


def trial_rows(study) -> list[dict]:
    return [{"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
             "run": t.user_attrs.get("run", ""),
             "note": t.user_attrs.get("failure") or t.user_attrs.get("pruned") or
             (f"retry of trial {t.user_attrs['retry_of']}" if "retry_of" in t.user_attrs else "")}
            for t in study.get_trials(deepcopy=False)]


# Optuna's only evaluator that runs without scikit-learn (fANOVA and mean decrease impurity need its forests).
IMPORTANCE_METHOD = "PED-ANOVA"
MIN_TRIALS_FOR_IMPORTANCES = 20  # below, a parameter that does not matter gets weights as large as one that does
FEW_TRIALS = f"fewer than {MIN_TRIALS_FOR_IMPORTANCES} finished trials: importances would be noise"


def importances(study) -> dict[str, float] | str:
    """Parameter importances by PED-ANOVA (Optuna's PedAnovaImportanceEvaluator, named explicitly), or why there
    are none (fewer than MIN_TRIALS_FOR_IMPORTANCES finished trials, one parameter...)."""
    import optuna

    finished = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    if finished < MIN_TRIALS_FOR_IMPORTANCES:
        return f"not computed: {FEW_TRIALS} ({finished} finished)"
    try:
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study, evaluator=evaluator).items()}
    except (RuntimeError, ValueError) as exc:
        return f"not computed: {exc}"


def write_sweep_summary(study, cfg: Config, folder: Path) -> dict:
    """sweep_summary.json and sweep_report.html in the study's `folder`; the summary."""
    metric, direction = metric_and_direction(cfg)
    rows = trial_rows(study)
    done = [r for r in rows if r["state"] == "complete"]
    best = (max if direction == "maximize" else min)(done, key=lambda r: r["value"]) if done else None
    summary = {"study": folder.name, "metric": metric, "direction": direction, "trials_asked": cfg.sweep.trials,
               "counts": dict(Counter(r["state"] for r in rows)), "best": best, "importances": importances(study),
               "importance_method": IMPORTANCE_METHOD, "trials": rows,
               "selection": "the best value is selected twice: each trial's best epoch on its validation set, then "
                            "the best trial on the same set; it overstates what the winner scores on new data"}
    write_json(folder / "sweep_summary.json", summary)
    write_text(folder / "sweep_report.html", _html(summary, _plot(rows, metric)))
    return summary


def _plot(rows: list[dict], metric: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    done = [r for r in rows if r["value"] is not None]
    ax.plot([r["number"] for r in done], [r["value"] for r in done], "o")
    ax.set(title=f"{metric} per trial (finished trials)", xlabel="trial", ylabel=metric)
    png = png_bytes(fig)
    plt.close(fig)
    return png


def _html(summary: dict, plot: bytes) -> str:
    def fmt(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

    best = summary["best"]
    head = (f"<p>Best: trial {best['number']}, {summary['metric']} {fmt(best['value'])}, "
            f"{html.escape(', '.join(f'{k}={v}' for k, v in best['params'].items()))} "
            f"(run folder {html.escape(best['run'])}). This value is selected twice (each trial's best epoch on its "
            f"validation set, then the best trial on the same set): it overstates what the winner scores on new "
            f"data; evaluate it on a held-out test set.</p>" if best else "<p>No trial finished yet.</p>")
    imp = summary["importances"]
    importance = ("".join(f"<tr><td>{html.escape(k)}</td><td>{v:.3f}</td></tr>" for k, v in imp.items())
                  if isinstance(imp, dict) else f"<tr><td colspan=2>{html.escape(imp)}</td></tr>")
    caution = ("<p>Shares summing to 1, a hint rather than a ranking: at 30 trials of an objective that one "
               "parameter alone sets, PED-ANOVA gives that parameter under 0.85 in 1 study in 20.</p>"
               if isinstance(imp, dict) else "")
    params = sorted({k for r in summary["trials"] for k in r["params"]})
    trials = "".join(f"<tr><td>{r['number']}</td><td>{r['state']}</td><td>{fmt(r['value'])}</td>"
                     + "".join(f"<td>{fmt(r['params'].get(k))}</td>" for k in params)
                     + f"<td>{html.escape(r['run'])}</td><td>{html.escape(r['note'])}</td></tr>"
                     for r in summary["trials"])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ct3d sweep {html.escape(summary['study'])}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px}}</style></head>
<body><h1>ct3d sweep {html.escape(summary['study'])}</h1>
<p>{summary['direction'].capitalize()} {html.escape(summary['metric'])} (best validation of each trial);
trials: {html.escape(', '.join(f'{v} {k}' for k, v in summary['counts'].items()))}.</p>{head}
{img_tag(plot, "metric per trial")}
<h2>Parameter importances ({html.escape(summary['importance_method'])})</h2>
<table><tr><th>parameter</th><th>importance</th></tr>{importance}</table>{caution}
<h2>Trials</h2><table><tr><th>trial</th><th>state</th><th>value</th>{''.join(f'<th>{html.escape(k)}</th>'
                                                                             for k in params)}
<th>run folder</th><th>note</th></tr>{trials}</table></body></html>
"""
