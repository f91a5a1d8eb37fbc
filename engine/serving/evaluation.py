"""`evaluate`: a checkpoint's every validation metric on a datalist (or the run's split) at its thresholds and
calibration, with patient-level BCa intervals; with two checkpoints, their paired comparison on the same
volumes."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.config.schema import MetricsConfig
from engine.results.metrics import probabilities
from engine.results.statistics import paired_comparison, run_statistics
from engine.serving.inference import decision_settings, with_tta
from engine.training.build import make_evaluator, make_inferer
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
        inferer=with_tta(make_inferer(device, amp), state["task"], tta, calibration))
    evaluator.run()
    ranked = probabilities(validation.last_logits, state["task"])  # AUC and paired differences rank raw outputs
    return {"checkpoint": str(checkpoint), "epoch": state["trainer"]["epoch"], "volumes": len(val_items),
            "data": note, "labels": labels, "tta": tta, "metrics": dict(evaluator.state.metrics),
            **run_statistics(validation.last_probs, validation.last_labels, patients, labels, state["task"],
                             thresholds, calibration, metrics, ranked=ranked),
            "probs": ranked, "targets": validation.last_labels}


def report_comparison(first: dict, second: dict, patients: list[str], resamples: int, seed: int,
                      folder: Path) -> dict:
    """Two checkpoints on the same volumes: both evaluations and their paired comparison (the difference in
    macro AUC, second - first, with its BCa interval over the same patient resamples; "intervals overlap" is
    not a test) in evaluation.json, and the printed line."""
    comparison = paired_comparison(first.pop("probs"), second.pop("probs"), first.pop("targets"), patients,
                                   first["labels"], resamples, seed)
    second.pop("targets")
    write_json(folder / "evaluation.json", {"first": first, "second": second, "comparison": comparison})
    macro = comparison["auc_macro"]
    print(f"\nct3d evaluate: {second['checkpoint']} vs {first['checkpoint']} on {first['volumes']} volumes "
          f"({comparison['patients']} patients) -> {folder}\n"
          f"macro AUC {macro['second']:.4f} vs {macro['first']:.4f}: difference {macro['difference']:+.4f}, "
          f"95% BCa interval [{macro['interval'][0]:+.4f}, {macro['interval'][1]:+.4f}]")
    return {"first": first["metrics"], "second": second["metrics"], "comparison": comparison}


def report_evaluation(result: dict, folder: Path) -> dict:
    """One checkpoint's evaluation.json and its printed table; returns its metrics."""
    result.pop("probs"), result.pop("targets")
    write_json(folder / "evaluation.json", result)
    metrics = result["metrics"]
    width = max(len(k) for k in metrics)
    print(f"\nct3d evaluate {result['checkpoint']} on {result['volumes']} volumes ({result['data']}) -> {folder}")
    print("\n".join(f"{k:<{width}}  {v:.4f}" + _interval_text(result, k) for k, v in metrics.items()))
    return metrics


def _interval_text(result: dict, key: str) -> str:
    low, high = result.get("bootstrap", {}).get("intervals", {}).get(key, (None, None))
    return f"  [{low:.4f}, {high:.4f}]" if low is not None else ""
