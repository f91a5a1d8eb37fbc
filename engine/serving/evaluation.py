"""`evaluate`: a checkpoint's every validation metric on a datalist (or the run's split) at its thresholds and
calibration, with patient-level BCa intervals; with two checkpoints, their paired comparison on the same
volumes."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from engine.config.schema import MetricsConfig
from engine.results.metrics import macro_labels, probabilities
from engine.results.statistics import paired_comparison, run_statistics
from engine.results.tables import format_value, left_out_text
from engine.serving.inference import decision_settings, with_tta
from engine.training.build import make_evaluator, make_inferer
from engine.training.outputs import item_labels
from engine.utils.io import write_json


def evaluate_checkpoint(checkpoint: str, model: torch.nn.Module, state: dict, dataset, val_items: list[dict],
                        patients: list[str], note: str, loader, device: torch.device, amp: torch.dtype | None,
                        loss: torch.nn.Module, metrics: MetricsConfig, tta: str) -> dict:
    """One checkpoint's evaluation.json content on `val_items` (`dataset`, through `loader`: them preprocessed
    as the checkpoint was trained), at its thresholds and calibration, with patient-level intervals; the
    probabilities and labels under "probs" and "targets" (for a paired comparison)."""
    labels = state["labels"]
    thresholds, calibration = decision_settings(state)
    evaluator, validation = make_evaluator(
        model, loader, device, amp, metrics, labels, state["task"], loss, thresholds=thresholds,
        calibration=None if tta != "none" else calibration,  # with TTA each view is calibrated inside the inferer
        inferer=with_tta(make_inferer(device, amp), state["task"], tta, calibration, ranked=True),
        keep=macro_labels(item_labels(val_items, len(labels)), patients, metrics.min_positive_patients),
        paired=tta != "none")  # TTA: AUC ranks the mean of the uncalibrated views, decisions the calibrated one
    evaluator.run()
    ranked = probabilities(validation.last_logits, state["task"])  # AUC and paired differences rank raw outputs
    return {"checkpoint": str(checkpoint), "epoch": state["trainer"]["epoch"], "volumes": len(val_items),
            "data": note, "labels": labels, "tta": tta, "metrics": dict(evaluator.state.metrics),
            **run_statistics(validation.last_probs, validation.last_labels, patients, labels, state["task"],
                             thresholds, calibration, metrics, ranked=ranked),
            "probs": ranked, "targets": validation.last_labels}


def report_comparison(first: dict, second: dict, patients: list[str], metrics: MetricsConfig, folder: Path,
                      selected: dict) -> dict:
    """Two checkpoints on the same volumes: both evaluations and their paired comparison (the difference in
    macro AUC, second - first, by DeLong's test, patients clustered, and with its BCa interval over the same
    patient resamples; "intervals overlap" is not a test) in evaluation.json, and the printed lines. `selected`:
    how many volumes were either run's selection set, when the comparison was allowed there anyway."""
    comparison = paired_comparison(first.pop("probs"), second.pop("probs"), first.pop("targets"), patients,
                                   first["labels"], metrics.bootstrap or 1000, metrics.bootstrap_seed,
                                   min_positive=metrics.min_positive_patients)
    second.pop("targets")
    if selected.get("allowed"):
        comparison["selection_set"] = selected
    write_json(folder / "evaluation.json", {"first": first, "second": second, "comparison": comparison})
    macro, delong = comparison["auc_macro"], comparison["auc_macro"].get("delong") or {}
    warning = ("\nSELECTION SET: " + ", ".join(f"{c}: {k} volumes" for c, k in selected["volumes"].items() if k)
               + " of its validation split; the comparison favours the checkpoint selected there"
               if selected.get("allowed") else "")
    left_out = comparison.get("few_positive_patients") or {}
    print(f"\nct3d evaluate: {second['checkpoint']} vs {first['checkpoint']} on {first['volumes']} volumes "
          f"({comparison['patients']} patients) -> {folder}\n"
          f"macro AUC {macro['second']:.4f} vs {macro['first']:.4f} over {len(comparison['macro_labels'])} labels: "
          f"difference {macro['difference']:+.4f}; DeLong (patients clustered) p = {delong.get('p', math.nan):.4f}, "
          f"95% interval [{_signed(delong.get('interval'), 0)}, {_signed(delong.get('interval'), 1)}]; "
          f"95% BCa bootstrap interval [{macro['interval'][0]:+.4f}, {macro['interval'][1]:+.4f}]"
          + (f"\nleft out of the macro (under {metrics.min_positive_patients} positive patients): "
             + ", ".join(f"{n} ({k})" for n, k in left_out.items()) if left_out else "") + warning)
    return {"first": first["metrics"], "second": second["metrics"], "comparison": comparison}


def _signed(interval, end: int) -> str:
    return "n/a" if not interval or interval[end] is None or math.isnan(interval[end]) else f"{interval[end]:+.4f}"


def report_evaluation(result: dict, folder: Path) -> dict:
    """One checkpoint's evaluation.json and its printed table (undefined figures n/a, labels out of the macro
    figures named, unreliable intervals flagged); returns its metrics."""
    result.pop("probs"), result.pop("targets")
    write_json(folder / "evaluation.json", result)
    metrics = result["metrics"]
    width = max(len(k) for k in metrics)
    print(f"\nct3d evaluate {result['checkpoint']} on {result['volumes']} volumes ({result['data']}) -> {folder}")
    print("\n".join(f"{k:<{width}}  {format_value(v):>6}" + _interval_text(result, k) for k, v in metrics.items()))
    left_out = left_out_text(result.get("auc_left_out") or [], result.get("below_min_positive") or {},
                             result.get("min_positive_patients"), " (intervals unreliable)")
    if left_out:
        print(f"macro figures leave out {left_out}")
    return metrics


def _interval_text(result: dict, key: str) -> str:
    boot = result.get("bootstrap", {})
    low, high = boot.get("intervals", {}).get(key, (None, None))
    if low is None or math.isnan(low) or math.isnan(high):
        return ""
    return f"  [{low:.4f}, {high:.4f}]" + ("  unreliable: few positive patients" if key in boot.get("unreliable", [])
                                           else "")
