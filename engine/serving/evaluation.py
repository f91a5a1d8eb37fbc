"""`evaluate`: a checkpoint's every validation metric on a datalist (or the run's split) at its thresholds and
calibration, with patient-level BCa intervals; with two checkpoints, their paired comparison on the same
volumes."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.config.schema import Config
from engine.data.cache import build_dataset
from engine.data.datalist import label_frequencies
from engine.data.loaders import make_loader
from engine.data.prepare import load_splits
from engine.data.run_split import evaluation_split_note
from engine.data.split import patient_of
from engine.serving.inference import (
    checkpoint_preprocessing,
    decision_settings,
    load_trained_model,
    output_folder,
    with_tta,
)
from engine.training.build import make_evaluator, make_inferer, make_loss, resolve_amp, resolve_device
from engine.utils.errors import CT3DError
from engine.utils.io import write_json


def _evaluate_one(cfg: Config, checkpoint: str) -> tuple[dict, torch.Tensor, torch.Tensor, list[str]]:
    """One checkpoint's evaluation.json content on the config's validation volumes, with its probabilities,
    labels and each volume's patient (for a paired comparison)."""
    from engine.results.statistics import run_statistics

    device = resolve_device(cfg.train.device)
    model, state = load_trained_model(checkpoint, device)
    train_items, val_items, labels = load_splits(cfg.data)
    if labels != state["labels"]:
        raise CT3DError(f"datalist labels {labels} differ from the checkpoint's {state['labels']}")
    on = evaluation_split_note(Path(checkpoint), val_items, cfg.data.patient_pattern,
                               cfg.infer.allow_trained_patients)
    thresholds, calibration = decision_settings(state)
    tta = str(cfg.infer.tta)
    dataset = build_dataset(val_items, checkpoint_preprocessing(state), cfg.cache.dir if cfg.cache.disk else None,
                            cfg.cache.memory_rate, cfg.cache.workers)
    amp = resolve_amp(cfg.train.amp, device)
    evaluator, validation = make_evaluator(
        model, make_loader(dataset, cfg.loader, device), device, amp, cfg.metrics, labels, state["task"],
        make_loss(cfg.train, state["task"], label_frequencies(train_items)), thresholds=thresholds,
        calibration=None if tta != "none" else calibration,  # with TTA each view is calibrated inside the inferer
        inferer=with_tta(make_inferer(device, amp), state["task"], tta, calibration))
    evaluator.run()
    metrics = dict(evaluator.state.metrics)
    patients = [patient_of(it, cfg.data.patient_pattern) for it in val_items]
    result = {"checkpoint": str(checkpoint), "epoch": state["trainer"]["epoch"], "volumes": len(val_items),
              "data": on, "labels": labels, "tta": tta, "metrics": metrics,
              **run_statistics(validation.last_probs, validation.last_labels, patients, labels, state["task"],
                               thresholds, calibration, cfg.metrics)}
    return result, validation.last_probs, validation.last_labels, patients


def evaluate(cfg: Config) -> dict:
    """Every validation metric of a checkpoint on the config's validation datalist (or split), at the
    checkpoint's thresholds and calibration, with patient-level bootstrap intervals. With two checkpoints,
    both on the same volumes and their paired comparison: the difference in macro AUC (second - first) with
    its BCa interval over the same patient resamples ("intervals overlap" is not a test)."""
    from engine.results.statistics import paired_comparison

    folder = output_folder(cfg, "evaluate")
    if len(cfg.checkpoints) == 2:
        (first, probs_a, labels, patients), (second, probs_b, _, _) = (_evaluate_one(cfg, c) for c in cfg.checkpoints)
        comparison = paired_comparison(probs_a, probs_b, labels, patients, first["labels"],
                                       cfg.metrics.bootstrap or 1000, cfg.metrics.bootstrap_seed)
        write_json(folder / "evaluation.json", {"first": first, "second": second, "comparison": comparison})
        macro = comparison["auc_macro"]
        print(f"\nct3d evaluate: {cfg.checkpoints[1]} vs {cfg.checkpoints[0]} on {first['volumes']} volumes "
              f"({comparison['patients']} patients) -> {folder}\n"
              f"macro AUC {macro['second']:.4f} vs {macro['first']:.4f}: difference {macro['difference']:+.4f}, "
              f"95% BCa interval [{macro['interval'][0]:+.4f}, {macro['interval'][1]:+.4f}]")
        return {"first": first["metrics"], "second": second["metrics"], "comparison": comparison}
    result, *_ = _evaluate_one(cfg, cfg.checkpoint)
    write_json(folder / "evaluation.json", result)
    metrics = result["metrics"]
    width = max(len(k) for k in metrics)
    print(f"\nct3d evaluate {cfg.checkpoint} on {result['volumes']} volumes ({result['data']}) -> {folder}")
    print("\n".join(f"{k:<{width}}  {v:.4f}" + _interval_text(result, k) for k, v in metrics.items()))
    return metrics


def _interval_text(result: dict, key: str) -> str:
    low, high = result.get("bootstrap", {}).get("intervals", {}).get(key, (None, None))
    return f"  [{low:.4f}, {high:.4f}]" if low is not None else ""
