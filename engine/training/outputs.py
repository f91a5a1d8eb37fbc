"""The closing's parts, each from plain arguments (workflow.close_run wires them): the best validation's
statistics (intervals, calibration, thresholds), the held-out test set's block (the figures to publish), the
Grad-CAM panels' volumes and the printed table."""

from __future__ import annotations

import logging
import time

import torch

from engine.config.metric_registry import METRICS, table_names
from engine.config.schema import MetricsConfig
from engine.data.items import IMAGE, LABEL
from engine.data.sharing import gathered_order
from engine.data.split import patient_of
from engine.results.calibration import apply_calibration, calibration_from
from engine.results.metrics import (
    classification_metrics,
    decisions,
    macro_labels,
    positive_patients,
    probabilities,
)
from engine.results.statistics import run_statistics
from engine.results.tables import left_out_text, macro_labels_of
from engine.training.build import make_inferer
from engine.utils.errors import CT3DError

log = logging.getLogger("ct3d")


def best_thresholds(best: dict, labels: list[str], threshold: float) -> list[float]:
    """The best validation's per-label thresholds; the fixed `threshold` for each label where none were fitted."""
    return list(best.get("thresholds") or [threshold] * len(labels))


def best_statistics(best: dict, val_items: list[dict], labels: list[str], task: str, patient_pattern: str,
                    metrics: MetricsConfig) -> dict:
    """The best validation's thresholds, calibration, labels in macro AUC and bootstrap intervals (patients
    in the order the outputs were gathered); {} before any validation."""
    if not best:
        return {}
    order = gathered_order(len(val_items), best["ranks"])
    patients = [patient_of(val_items[i], patient_pattern) for i in order]
    return {"threshold_rule": str(metrics.threshold_rule),
            **run_statistics(best["probs"], best["labels"], patients, labels, task,
                             best_thresholds(best, labels, metrics.threshold), calibration_from(best), metrics,
                             ranked=ranked_outputs(best, task))}


def item_labels(items: list[dict], count: int) -> torch.Tensor:
    """(N, count) 0/1 labels of datalist `items` (what their outputs will be scored against)."""
    return torch.tensor([list(it[LABEL]) for it in items], dtype=torch.float32).reshape(len(items), count)


def macro_keep(items: list[dict], labels: list[str], patient_pattern: str, metrics: MetricsConfig,
               side: str = "validation") -> torch.Tensor:
    """(C,) bool: the labels the macro figures of `items` average (macro_labels: both classes and at least
    metrics.min_positive_patients positive patients). Stops when the rule leaves none where a label has both
    classes and metrics.key is a macro figure: every epoch would score NaN and best.pt would pick nothing."""
    y, patients = item_labels(items, len(labels)), [patient_of(it, patient_pattern) for it in items]
    keep = macro_labels(y, patients, metrics.min_positive_patients)
    both = macro_labels(y)
    if metrics.key.endswith("_macro") and bool(both.any()) and not bool(keep.any()):
        counts = positive_patients(y, patients)
        most = max((j for j in range(len(labels)) if both[j]), key=lambda j: int(counts[j]))
        raise CT3DError(f"metrics.min_positive_patients={metrics.min_positive_patients}: no label has that many "
                        f"positive patients in the {side} split (most: {labels[most]!r}, {int(counts[most])}), so "
                        f"{metrics.key} would be undefined; lower it (e.g. metrics.min_positive_patients="
                        f"{int(counts[most])}: macro figures then rest on few patients) or validate on more patients")
    return keep


def ranked_outputs(best: dict, task: str) -> torch.Tensor | None:
    """The best validation's uncalibrated probabilities, which AUC and ROC rank; None for a checkpoint from before
    the logits were kept (its calibrated probabilities stand in)."""
    return probabilities(best["logits"], task) if "logits" in best else None


def in_gathered_order(items: list[dict], best: dict, world: int) -> list[dict]:
    """`items` in the order the best validation gathered its outputs (its own rank count, not this start's)."""
    return [items[i] for i in gathered_order(len(items), best.get("ranks", world))]


def test_block(net: torch.nn.Module, dataset, items: list[dict], labels: list[str], task: str, best: dict,
               batch_size: int, amp_dtype: torch.dtype | None, patient_pattern: str, metrics: MetricsConfig) -> dict:
    """{"volumes", "patients", "metrics", thresholds, calibration, ECE and "bootstrap" intervals} of `net` (holding
    the best epoch's weights) on the held-out test `items` (`dataset`: them preprocessed), with the thresholds and
    calibration chosen on validation; {} without a test set or a validation."""
    if not items or not best:
        return {}
    device = next(net.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    inferer, logits, targets = make_inferer(device, amp_dtype), [], []
    training = net.training
    net.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                logits.append(inferer(batch[IMAGE].to(device).float(), net).float().cpu())
                targets.append(batch[LABEL].float())
    finally:
        net.train(training)
    thresholds = best_thresholds(best, labels, metrics.threshold)
    calibration = calibration_from(best)
    probs = probabilities(apply_calibration(torch.cat(logits), calibration), task)
    raw, target = probabilities(torch.cat(logits), task), torch.cat(targets)  # raw: AUC's ranking
    patients = [patient_of(it, patient_pattern) for it in items]
    return {"volumes": len(items), "patients": len(set(patients)),
            "metrics": classification_metrics(raw, target, labels, task, thresholds, metrics.beta,
                                              decided=decisions(probs, task, thresholds), calibrated=probs,
                                              keep=macro_labels(target, patients, metrics.min_positive_patients)),
            **run_statistics(probs, target, patients, labels, task, thresholds, calibration, metrics, ranked=raw)}


def summary_table(summary: dict, labels: list[str]) -> str:
    """The closing table: validation's best and final epochs (the selection set) and, with a held-out test set,
    the best epoch's figures on it (the ones to publish)."""
    best, final = summary["best"], summary["final"]
    test = (summary.get("test") or {}).get("metrics")
    rows = [("", "best", "final", *(["test"] if test else [])),
            ("epoch", str(best["epoch"]), str(final["epoch"]), *([str(best["epoch"])] if test else []))]
    keys = table_names() + [f"auc/{n}" for n in labels]

    def cell(key: str, value) -> str:
        return (METRICS[key].text(value) if key in METRICS else "n/a" if value is None else f"{value:.4f}")

    rows += [(k, cell(k, best[k]), cell(k, final[k]), *([cell(k, test[k]) if k in test else ""] if test else []))
             for k in keys if k in best]
    width = max(len(r[0]) for r in rows)
    return "\n".join([f"{r[0]:<{width}}" + "".join(f"  {cell:>8}" for cell in r[1:]) for r in rows]
                     + macro_notes(summary, labels))


def macro_notes(summary: dict, labels: list[str]) -> list[str]:
    """The lines under the closing table: the labels validation's and the test set's macro figures left out (one
    class; too few positive patients), and a warning when the two averaged different labels."""
    blocks = [("validation", summary)] + ([("test", summary["test"])] if summary.get("test") else [])
    lines, averaged = [], {}
    for side, block in blocks:
        if "auc_left_out" not in block:
            continue
        averaged[side] = macro_labels_of(block, labels)
        left_out = left_out_text(block.get("auc_left_out") or [], block.get("below_min_positive") or {},
                                 block.get("min_positive_patients"))
        if left_out:
            lines.append(f"{side}: macro figures leave out {left_out}")
    if len(averaged) == 2 and averaged["validation"] != averaged["test"]:
        lines.append(f"note: validation and test average different labels ({', '.join(averaged['validation'])} vs "
                     f"{', '.join(averaged['test'])}): their macro figures are not the same quantity")
    return lines


def timed_call(parts: dict, name: str, fn, *args, **kwargs):
    """fn(*args, **kwargs), its wall time in seconds in parts[name]."""
    start = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        parts[name] = round(time.perf_counter() - start, 3)
