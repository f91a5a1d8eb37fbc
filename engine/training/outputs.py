"""The closing work of a run, on rank 0 after the last epoch's checkpoint is written and the other ranks left:
the best validation's statistics (intervals, calibration, thresholds), summary.json, the report with its Grad-CAM
panels, the W&B run's end and the printed table."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from engine.config.loading import to_yaml
from engine.config.schema import Config
from engine.data.cache import build_dataset
from engine.data.prepare import Splits
from engine.training.checkpoint import load_checkpoint
from engine.training.handlers import History, MetricsTable
from engine.utils.io import write_json

log = logging.getLogger("ct3d")


def best_statistics(cfg: Config, table: MetricsTable, data: Splits, task: str) -> dict:
    """The best validation's thresholds, calibration, labels in macro AUC and bootstrap intervals (patients
    in the order the outputs were gathered)."""
    from engine.data.sharing import gathered_order
    from engine.data.split import patient_of
    from engine.results.statistics import run_statistics

    best = table.best_outputs
    if not best:
        return {}
    thresholds = best.get("thresholds", [cfg.metrics.threshold] * len(data.labels))
    order = gathered_order(len(data.val), best["ranks"])
    patients = [patient_of(data.val[i], cfg.data.patient_pattern) for i in order]
    from engine.results.calibration import calibration_from

    return {"threshold_rule": str(cfg.metrics.threshold_rule),
            **run_statistics(best["probs"], best["labels"], patients, data.labels, task,
                             thresholds, calibration_from(best), cfg.metrics)}


def summary_table(summary: dict, labels: list[str]) -> str:
    """The closing table: validation's best and final epochs (the selection set) and, with a held-out test set,
    the best epoch's figures on it (the ones to publish)."""
    best, final = summary["best"], summary["final"]
    test = (summary.get("test") or {}).get("metrics")
    rows = [("", "best", "final", *(["test"] if test else [])),
            ("epoch", str(best["epoch"]), str(final["epoch"]), *([str(best["epoch"])] if test else []))]
    keys = ["val_loss", "auc_macro", "auc_micro", "fbeta_macro", "fbeta_micro", "precision", "recall",
            "specificity", "accuracy"] + [f"auc/{n}" for n in labels]
    def cell(value) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    rows += [(k, cell(best[k]), cell(final[k]), *([cell(test[k]) if k in test else ""] if test else []))
             for k in keys if k in best]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{r[0]:<{width}}" + "".join(f"  {cell:>8}" for cell in r[1:]) for r in rows)


def inspection_panels(cfg: Config, folder: Path, net: torch.nn.Module, val_items: list[dict], table: MetricsTable,
                      labels: list[str], current: bool = False) -> list:
    """The report's Grad-CAM panels for the best epoch's model and its input views, on the training device,
    with the training network itself (its training is over): as it is when it holds the best epoch's
    weights (`current`), else with best.pt's weights (memory-mapped: its optimizer state is never read).
    The chosen volumes come from the disk cache (rank 0 holds only its share in RAM), read once each."""
    import ignite.distributed as idist

    from engine.data.sharing import gathered_order
    from engine.results.saliency import report_panels

    if not table.best_outputs:
        return []
    if not current:
        net.load_state_dict(load_checkpoint(folder / "checkpoints" / "best.pt", mmap=True)["model"])
    ranks = table.best_outputs.get("ranks", idist.get_world_size())  # the best validation's, not this start's
    in_gathered_order = build_dataset([val_items[i] for i in gathered_order(len(val_items), ranks)],
                                      cfg.preprocess, cfg.cache.dir if cfg.cache.disk else None, 0.0, cfg.cache.workers)
    outputs = table.best_outputs
    return report_panels(net, cfg.model, in_gathered_order, labels, outputs["probs"], outputs["labels"],
                         outputs.get("thresholds", [cfg.metrics.threshold] * len(labels)),
                         cfg.report.saliency_positives, cfg.report.saliency_negatives,
                         volumes_per_pass=cfg.loader.batch_size)


def timed_call(parts: dict, name: str, fn, *args):
    """fn(*args), its wall time in seconds in parts[name]."""
    start = time.perf_counter()
    try:
        return fn(*args)
    finally:
        parts[name] = round(time.perf_counter() - start, 3)


def write_outputs(folder: Path, summary: dict, table: MetricsTable, history: History, cfg: Config, tracker,
                  net: torch.nn.Module, data: Splits, clock: list[float], parts: dict[str, float],
                  finish_checkpoints=None) -> None:
    """Rank 0's closing work (under torchrun after the last checkpoint is written and the other ranks left): the
    best validation's statistics and the report's panels (with one process, while the last epoch's checkpoint is
    written: `finish_checkpoints` then waits for it and writes final.pt), the Grad-CAM panels of the best epoch's
    model, its scores on the held-out test set (if any), the report, the W&B run's end, summary.json (with the time
    of each phase: `clock` holds the run's start, training's start and the last validation's end; `parts` the
    closing's parts so far) and the printed table."""
    from engine.results.report import draw_panels, report_title, write_report

    outputs, sections, panels, page = table.best_outputs, [], [], b""
    try:
        summary.update(timed_call(parts, "statistics", best_statistics, cfg, table, data, summary["task"]))
        summary["wall_seconds"] = round(time.time() - clock[0], 1)  # so far, for the report; summary.json: all
        if outputs and cfg.report.panels:
            panels, page = timed_call(parts, "report panels", draw_panels, table.rows, history.lr_history,
                                      outputs["probs"], outputs["labels"], summary["labels"], summary["task"],
                                      list(summary["thresholds"].values()), cfg.metrics.beta, summary["best"],
                                      summary["calibration"]["bins"], report_title(summary))
    finally:
        if finish_checkpoints is not None:
            timed_call(parts, "checkpoints", finish_checkpoints)
    report_png = None
    if outputs:
        # The network holds the best weights when the last epoch was the best: best.pt need not be read.
        # (Before the panels, beside the checkpoint write, both took longer: two cores, measured.)
        current = summary["best_epoch"] == summary["final"]["epoch"]
        sections = timed_call(parts, "saliency", inspection_panels, cfg, folder, net, data.val, table,
                              summary["labels"], current)
        if data.test:  # the net holds the best epoch's weights now (inspection_panels loaded them if needed)
            from engine.training.held_out import test_block

            summary["test"] = timed_call(parts, "test set", test_block, cfg, net, data.test, summary["labels"],
                                         summary["task"], outputs)
        report_png, _ = timed_call(parts, "report", write_report, folder, panels, page, summary, to_yaml(cfg),
                                    sections)
    if tracker is not None:
        timed_call(parts, "tracking", tracker.finish, report_png, folder / "checkpoints" / "best.pt", summary)
    end = time.time()
    summary["phases"] = {"start_up": round(clock[1] - clock[0], 2), "training": round(clock[2] - clock[1], 2),
                         "closing": round(end - clock[2], 2), "closing_parts": parts,
                         "clock": [clock[0], clock[1], clock[2], end]}
    summary["wall_seconds"] = round(end - clock[0], 1)
    write_json(folder / "summary.json", summary)
    log.info("closing took %.1f s (%s)", end - clock[2], ", ".join(f"{k} {v:.1f} s" for k, v in parts.items()))
    print(f"\nct3d run {folder} finished in {summary['wall_seconds']:.0f} s\n"
          f"{summary_table(summary, summary['labels'])}")
