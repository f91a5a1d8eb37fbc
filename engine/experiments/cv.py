"""`cv`: K-fold cross-validation. Each fold is a normal run folder (output.dir/<name>/fold<k>, with its
split.csv); the folds run one after another, a finished fold is skipped and an interrupted one resumes
from its checkpoint. At the end, cv_summary.json and cv_report.html: per-fold metrics, their mean and
spread, and the pooled out-of-fold predictions (every patient validated once) with bootstrap intervals."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from engine.config.loading import to_yaml
from engine.config.schema import Config
from engine.data.prepare import load_splits
from engine.data.run_split import SPLIT_FILE, read_split
from engine.data.sharing import gathered_order
from engine.experiments.cv_report import cv_report, headline_text
from engine.experiments.cv_summary import pool, summarize
from engine.results.metrics import decisions
from engine.training.checkpoint import load_checkpoint
from engine.training.outputs import macro_keep, ranked_outputs
from engine.training.workflow import train
from engine.utils.errors import CT3DError
from engine.utils.io import write_json, write_text

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
    for k in range(cfg.data.folds):  # each fold's validation must carry the macro figures, before any fold trains
        fold = fold_config(cfg, k)
        _, val, labels = load_splits(fold.data)
        macro_keep(val, labels, fold.data.patient_pattern, fold.metrics, side=f"fold {k} validation")
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
    print(f"\nct3d cv {folder}: {cfg.data.folds} folds; {headline_text(summary)}\n-> {folder / 'cv_summary.json'}, "
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
    """Reads each fold's summary.json and best validation outputs, writes cv_summary.json and cv_report.html."""
    import json

    folds, outputs = [], []
    for k in range(cfg.data.folds):
        run = folder / f"fold{k}"
        summary = json.loads((run / "summary.json").read_text())
        outputs.append(fold_outputs(run))
        folds.append({"fold": k, "run": str(run), "best_epoch": summary["best_epoch"],
                      "val_volumes": summary["val_volumes"], "auc_macro": summary["best"]["auc_macro"],
                      "fbeta_macro": summary["best"]["fbeta_macro"],
                      "intervals": {key: summary.get("bootstrap", {}).get("intervals", {}).get(key)
                                    for key in ("auc_macro", "fbeta_macro")}})
    pooled = pool(outputs, str(folder))
    summary = summarize(folds, pooled, cfg.metrics)
    write_json(folder / "cv_summary.json", summary)
    write_text(folder / "cv_report.html", cv_report(folder, summary, pooled["probs"], pooled["labels"]))
    return summary
