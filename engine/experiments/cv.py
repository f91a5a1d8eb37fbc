"""`cv`: K-fold cross-validation. Each fold is a normal run folder (output.dir/<name>/fold<k>, with its
split.csv); the folds run one after another, a finished fold is skipped and an interrupted one resumes
from its checkpoint. At the end, cv_summary.json and cv_report.html: per-fold metrics, their mean and
spread, and the pooled out-of-fold predictions (every patient validated once) with bootstrap intervals."""

from __future__ import annotations

import copy
import html
import logging
import math
from pathlib import Path

import torch

from engine.config.loading import to_yaml
from engine.config.schema import Config
from engine.data.run_split import SPLIT_FILE, read_split
from engine.data.sharing import gathered_order
from engine.results.metrics import classification_metrics, decisions
from engine.results.report import format_value as fmt
from engine.results.report import img_tag, png_bytes, roc_curve
from engine.results.statistics import bootstrap_intervals
from engine.training.checkpoint import load_checkpoint
from engine.training.outputs import ranked_outputs
from engine.training.workflow import train
from engine.utils.errors import CT3DError
from engine.utils.io import atomic_write, write_json, write_text

log = logging.getLogger("ct3d")


def cv_name(cfg: Config) -> str:
    """Fixed (no start time), so running `cv` again resumes the same folds."""
    return cfg.output.name or f"cv-{cfg.model.name}{cfg.model.variant}"


def fold_config(cfg: Config, k: int) -> Config:
    fold = copy.deepcopy(cfg)
    fold.data.fold = k
    fold.output.name = f"{cv_name(cfg)}/fold{k}"
    return fold


def same_settings(run: Path, cfg: Config) -> None:
    """A fold folder from an earlier `cv` must have been made with these settings (output and resume aside),
    or skipping or resuming it would mix models trained differently into one cross-validation."""
    import yaml

    def flat(node: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in node.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    compared = ("data.", "preprocess.", "model.", "train.", "augment.", "loader.batch_size", "metrics.key",
                "metrics.mode", "metrics.threshold", "metrics.beta", "metrics.calibrate",
                "metrics.threshold_rule")
    ignored = ("data.fold", "data.demo.dir", "train.resume", "train.threads", "train.log_every", "train.device",
               "train.checkpoint_minutes", "train.dist_timeout_minutes")
    then = flat(yaml.safe_load((run / "config.yaml").read_text()))
    now = flat(yaml.safe_load(to_yaml(cfg)))
    differ = [k for k in sorted(set(then) | set(now))
              if k.startswith(compared) and k not in ignored and then.get(k) != now.get(k)]
    if differ:
        raise CT3DError(f"cv: {run} was trained with other settings ({', '.join(differ[:8])}"
                        f"{' ...' if len(differ) > 8 else ''}); give another output.name for a new cross-validation")


def finished(run: Path) -> bool:
    return (run / "summary.json").is_file() and (run / "checkpoints" / "final.pt").is_file()


def cv(cfg: Config) -> Path:
    """Trains every fold not yet finished, then writes the cross-validation summary; returns its folder."""
    if cfg.data.folds < 2:
        raise CT3DError("config error: data.folds: cv needs data.folds >= 2 (e.g. data.folds=5)")
    folder = Path(cfg.output.dir) / cv_name(cfg)
    for k in range(cfg.data.folds):
        run = folder / f"fold{k}"
        if (run / "config.yaml").is_file():
            same_settings(run, fold_config(cfg, k))
        if finished(run):
            log.info("fold %d/%d: finished earlier (%s), skipped", k + 1, cfg.data.folds, run)
            continue
        log.info("fold %d/%d: training %s", k + 1, cfg.data.folds, run)
        train(fold_config(cfg, k))
    summary = cv_summary(folder, cfg)
    print(f"\nct3d cv {folder}: {cfg.data.folds} folds; pooled out-of-fold macro AUC "
          f"{fmt(summary['pooled']['metrics']['auc_macro'])} {_interval(summary['pooled'], 'auc_macro')}, "
          f"per fold {', '.join(fmt(f['auc_macro']) for f in summary['folds'])}\n-> {folder / 'cv_summary.json'}, "
          f"{folder / 'cv_report.html'}")
    return folder


def fold_outputs(run: Path) -> dict:
    """A finished fold's best validation: probabilities of its raw outputs (for pooled AUC: each fold's own
    calibration, fitted on the very labels it is pooled with, would shift folds against each other), labels,
    decisions at its thresholds (on its calibrated probabilities), and each row's volume and patient (from
    split.csv, in the order the outputs were gathered)."""
    state = load_checkpoint(run / "checkpoints" / "best.pt")
    best = state["metrics_table"]["best_outputs"]
    val = [row for row in read_split(run / SPLIT_FILE).values() if row["split"] == "validation"]
    rows = [val[i] for i in gathered_order(len(val), best["ranks"])]
    thresholds = best.get("thresholds") or [state["threshold"]] * len(state["labels"])
    raw = ranked_outputs(best, state["task"])
    raw = best["probs"] if raw is None else raw
    return {"probs": raw, "labels": best["labels"], "labels_names": state["labels"],
            "decisions": decisions(best["probs"], state["task"], thresholds), "task": state["task"],
            "volumes": [r["volume"] for r in rows], "patients": [r["patient"] for r in rows]}


def cv_summary(folder: Path, cfg: Config) -> dict:
    import json

    folds, outputs = [], []
    for k in range(cfg.data.folds):
        run = folder / f"fold{k}"
        summary = json.loads((run / "summary.json").read_text())
        out = fold_outputs(run)
        outputs.append(out)
        folds.append({"fold": k, "run": str(run), "best_epoch": summary["best_epoch"],
                      "val_volumes": summary["val_volumes"], "auc_macro": summary["best"]["auc_macro"],
                      "fbeta_macro": summary["best"]["fbeta_macro"],
                      "intervals": {key: summary.get("bootstrap", {}).get("intervals", {}).get(key)
                                    for key in ("auc_macro", "fbeta_macro")}})
    names, task = outputs[0]["labels_names"], outputs[0]["task"]
    probs, labels, decided = (torch.cat([o[key] for o in outputs]) for key in ("probs", "labels", "decisions"))
    patients = [p for o in outputs for p in o["patients"]]
    volumes = [v for o in outputs for v in o["volumes"]]
    if len(set(volumes)) != len(volumes):
        raise CT3DError(f"cv {folder}: a volume is in the validation side of two folds; the folds were made with "
                        f"other settings (data.folds, data.split_seed): start a new cv (another output.name)")
    metrics = classification_metrics(probs, labels, names, task, beta=cfg.metrics.beta, decided=decided)
    pooled = {"volumes": len(volumes), "patients": len(set(patients)), "metrics": metrics}
    if cfg.metrics.bootstrap:
        pooled["bootstrap"] = bootstrap_intervals(probs, labels, decided, patients, names, cfg.metrics.beta,
                                                  cfg.metrics.bootstrap, cfg.metrics.bootstrap_seed)
    per_fold = [f["auc_macro"] for f in folds if f["auc_macro"] is not None and not math.isnan(f["auc_macro"])]
    mean = sum(per_fold) / len(per_fold) if per_fold else math.nan
    spread = math.sqrt(sum((v - mean) ** 2 for v in per_fold) / (len(per_fold) - 1)) if len(per_fold) > 1 else math.nan
    summary = {"folds": folds, "labels": names, "task": task, "auc_macro_mean": mean, "auc_macro_sd": spread,
               "pooled": pooled}
    write_json(folder / "cv_summary.json", summary)
    write_text(folder / "cv_report.html", cv_report(folder, summary, probs, labels))
    return summary


def _interval(pooled: dict, key: str) -> str:
    low, high = pooled.get("bootstrap", {}).get("intervals", {}).get(key) or (None, None)
    return f"[{fmt(low)}, {fmt(high)}]" if low is not None else ""


def cv_report(folder: Path, summary: dict, probs: torch.Tensor, labels: torch.Tensor) -> str:
    """One page: the folds' table, the pooled figures with intervals, pooled ROC curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for j, name in enumerate(summary["labels"]):
        if labels[:, j].min() != labels[:, j].max():
            ax.plot(*roc_curve(probs[:, j].float(), labels[:, j].float()), label=name)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set(title="Pooled out-of-fold ROC curves", xlabel="false positive rate", ylabel="true positive rate")
    ax.legend(fontsize="small")
    roc = png_bytes(fig)
    plt.close(fig)
    with atomic_write(folder / "cv_roc.png") as tmp:
        tmp.write_bytes(roc)

    def interval(iv) -> str:
        return f"{fmt(iv[0])} to {fmt(iv[1])}" if iv else "n/a"

    rows = "".join(f"<tr><td>fold {f['fold']}</td><td>{f['val_volumes']}</td><td>{f['best_epoch']}</td>"
                   f"<td>{fmt(f['auc_macro'])}</td><td>{interval(f['intervals']['auc_macro'])}</td>"
                   f"<td>{fmt(f['fbeta_macro'])}</td><td>{interval(f['intervals']['fbeta_macro'])}</td></tr>"
                   for f in summary["folds"])
    pooled = summary["pooled"]
    boot = pooled.get("bootstrap", {}).get("intervals", {})
    rows += (f"<tr><th>pooled</th><td>{pooled['volumes']}</td><td></td><td>{fmt(pooled['metrics']['auc_macro'])}</td>"
             f"<td>{interval(boot.get('auc_macro'))}</td><td>{fmt(pooled['metrics']['fbeta_macro'])}</td>"
             f"<td>{interval(boot.get('fbeta_macro'))}</td></tr>")
    per_label = "".join(f"<tr><td>{html.escape(n)}</td><td>{fmt(pooled['metrics'][f'auc/{n}'])}</td>"
                        f"<td>{interval(boot.get(f'auc/{n}'))}</td></tr>" for n in summary["labels"])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ct3d cross-validation {html.escape(folder.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}</style></head>
<body><h1>ct3d cross-validation {html.escape(folder.name)}: {len(summary['folds'])} folds</h1>
<p>Each fold validates a disjoint set of patients; pooled rows put every fold's best-epoch validation outputs
together (out-of-fold: each of the {pooled['patients']} patients scored once, by the model that did not train on
it). Intervals: 95% patient-level BCa bootstrap. Pooled AUC is computed from the raw (uncalibrated) outputs.
These are selection-set figures: each fold's best epoch was chosen on the validation it is scored on, so every
figure here is optimistic; pooled F-beta is also decided at each fold's thresholds, tuned (with
metrics.threshold_rule other than fixed) on that fold's validation.
Macro AUC across folds: mean {fmt(summary['auc_macro_mean'])},
standard deviation {fmt(summary['auc_macro_sd'])}. Each fold's report is in its folder.</p>
<table><tr><th></th><th>validation volumes</th><th>best epoch</th><th>macro AUC</th><th>95% interval</th>
<th>macro F-beta</th><th>95% interval</th></tr>{rows}</table>
<h2>Pooled per label</h2><table><tr><th>label</th><th>AUC</th><th>95% interval</th></tr>{per_label}</table>
{img_tag(roc, "pooled ROC curves")}</body></html>
"""
