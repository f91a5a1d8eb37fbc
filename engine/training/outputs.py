"""The closing work of a run, on rank 0 after the last epoch: the best validation's statistics (intervals,
calibration, thresholds), summary.json, the report with its Grad-CAM panels, the W&B run's end and the
printed table."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.config.loading import to_yaml
from engine.config.schema import Config
from engine.data.cache import build_dataset
from engine.data.prepare import Splits
from engine.training.checkpoint import load_checkpoint
from engine.training.handlers import History, MetricsTable
from engine.utils.io import write_json


def best_statistics(cfg: Config, table: MetricsTable, data: Splits, task: str) -> dict:
    """The best validation's thresholds, calibration, labels in macro AUC and bootstrap intervals (patients
    in the order the outputs were gathered)."""
    from engine.data.loaders import gathered_order
    from engine.data.split import patient_of
    from engine.results.statistics import run_statistics

    best = table.best_outputs
    if not best:
        return {}
    thresholds = best.get("thresholds", [cfg.metrics.threshold] * len(data.labels))
    order = gathered_order(len(data.val), best["ranks"])
    patients = [patient_of(data.val[i], cfg.data.patient_pattern) for i in order]
    return {"threshold_rule": str(cfg.metrics.threshold_rule),
            **run_statistics(best["probs"], best["labels"], patients, data.labels, task,
                             thresholds, best.get("temperature"), cfg.metrics)}


def summary_table(summary: dict, labels: list[str]) -> str:
    best, final = summary["best"], summary["final"]
    rows = [("", "best", "final"), ("epoch", str(best["epoch"]), str(final["epoch"]))]
    keys = ["val_loss", "auc_macro", "auc_micro", "fbeta_macro", "fbeta_micro", "precision", "recall",
            "specificity", "accuracy"] + [f"auc/{n}" for n in labels]
    rows += [(k, f"{best[k]:.4f}", f"{final[k]:.4f}") for k in keys if k in best]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b:>8}  {c:>8}" for a, b, c in rows)


def inspection_panels(cfg: Config, folder: Path, net: torch.nn.Module, val_items: list[dict], table: MetricsTable,
                      labels: list[str]) -> list:
    """The report's Grad-CAM panels for the best epoch's model (from best.pt) and its input views; the
    volumes come from the disk cache (rank 0 holds only its share in RAM)."""
    import copy

    import ignite.distributed as idist

    from engine.data.loaders import gathered_order
    from engine.results.saliency import report_panels

    if not table.best_outputs:
        return []
    best = copy.deepcopy(net).cpu()
    best.load_state_dict(load_checkpoint(folder / "checkpoints" / "best.pt")["model"])
    ranks = table.best_outputs.get("ranks", idist.get_world_size())  # the best validation's, not this start's
    in_gathered_order = build_dataset([val_items[i] for i in gathered_order(len(val_items), ranks)],
                                      cfg.preprocess, cfg.cache.dir if cfg.cache.disk else None, 0.0, cfg.cache.workers)
    outputs = table.best_outputs
    return report_panels(best, cfg.model, in_gathered_order, labels, outputs["probs"], outputs["labels"],
                         outputs.get("thresholds", [cfg.metrics.threshold] * len(labels)))


def write_outputs(folder: Path, summary: dict, table: MetricsTable, history: History, cfg: Config, tracker,
                  net: torch.nn.Module, val_items: list[dict]) -> None:
    """Rank 0's closing files: summary.json, the report (with Grad-CAM panels of the best epoch's model),
    the W&B run's end, the printed table."""
    write_json(folder / "summary.json", summary)
    report_png = None
    if table.best_outputs:
        from engine.results.report import write_report

        outputs = table.best_outputs
        report_png, _ = write_report(folder, table.rows, history.lr_history, outputs["probs"], outputs["labels"],
                                     summary["labels"], summary["task"], list(summary["thresholds"].values()),
                                     cfg.metrics.beta, summary, to_yaml(cfg),
                                     inspection_panels(cfg, folder, net, val_items, table, summary["labels"]))
    if tracker is not None:
        tracker.finish(report_png, folder / "checkpoints" / "best.pt", summary)
    print(f"\nct3d run {folder} finished in {summary['wall_seconds']:.0f} s\n"
          f"{summary_table(summary, summary['labels'])}")
