"""Serving's wiring: `evaluate`, `predict` and `export` from the whole config, the one serving module that holds
it. Each reads its settings here and hands plain arguments to the builders training uses (device, precision,
loader, evaluator) and to inference.py, evaluation.py and export.py."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

import torch

from engine.config.schema import Config, OutputConfig
from engine.data.cache import build_dataset, collate_readable, read_volumes
from engine.data.datalist import label_frequencies, load_datalist
from engine.data.loaders import loader_workers, make_loader
from engine.data.prepare import disk_dir, load_splits
from engine.data.run_split import (
    check_patient_column,
    evaluation_split_note,
    selection_volumes,
    trained_frequencies,
)
from engine.data.split import patient_of
from engine.results.averaging import thresholds_note
from engine.serving.evaluation import evaluate_checkpoint, report_comparison, report_evaluation
from engine.serving.export import export_model
from engine.serving.inference import (
    checkpoint_preprocessing,
    decision_settings,
    list_inputs,
    load_ensemble,
    load_trained_model,
    predict_rows,
    with_tta,
    write_predictions,
    write_saliency,
)
from engine.training.build import make_inferer, make_loss, resolve_amp, resolve_device
from engine.utils.errors import CT3DError
from engine.utils.io import write_json

log = logging.getLogger("ct3d")


def output_folder(output: OutputConfig, command: str) -> Path:
    return Path(output.dir) / (output.name or f"{command}-{datetime.now():%Y%m%d-%H%M%S}")


def evaluate(cfg: Config) -> dict:
    """Every validation metric of a checkpoint on the config's validation datalist (or split), at the
    checkpoint's thresholds and calibration, with patient-level bootstrap intervals. With two checkpoints,
    both on the same volumes and their paired comparison."""
    folder = output_folder(cfg.output, "evaluate")
    checkpoints = list(cfg.checkpoints) if len(cfg.checkpoints) == 2 else [cfg.checkpoint]
    device = resolve_device(cfg.train.device)
    amp = resolve_amp(cfg.train.amp, device)
    if cfg.data.train or cfg.data.demo.enabled:
        train_items, val_items, labels = load_splits(cfg.data)
    else:  # an outside data set in data.val: what the run trained on comes from its split.csv
        listed = load_datalist(cfg.data.val, cfg.data, cfg.data.json_val_key)
        train_items, val_items, labels = [], listed.items, listed.labels
    patients = [patient_of(it, cfg.data.patient_pattern) for it in val_items]
    selected = selection_set(checkpoints, val_items, cfg.infer.allow_selection_set, cfg.data.patient_pattern)
    results = []
    for checkpoint in checkpoints:
        model, state = load_trained_model(checkpoint, device, cfg.model.weights)
        if labels != state["labels"]:
            raise CT3DError(f"datalist labels {labels} differ from the checkpoint's {state['labels']}")
        grouping = check_patient_column(Path(checkpoint), val_items, cfg.infer.allow_missing_patient_column,
                                        cfg.data.patient_column)
        note = evaluation_split_note(Path(checkpoint), val_items, cfg.data.patient_pattern,
                                     cfg.infer.allow_trained_patients) + (f"; {grouping}" if grouping else "")
        dataset = build_dataset(val_items, checkpoint_preprocessing(state), disk_dir(cfg.cache),
                                cfg.cache.memory_rate, cfg.cache.workers)
        frequencies = label_frequencies(train_items) if train_items else trained_frequencies(Path(checkpoint))
        loss = make_loss(cfg.train, state["task"], frequencies)
        results.append(evaluate_checkpoint(checkpoint, model, state, dataset, val_items, patients, note,
                                           make_loader(dataset, cfg.loader, device), device, amp, loss, cfg.metrics,
                                           str(cfg.infer.tta)))
    if len(results) == 2:
        return report_comparison(*results, patients, cfg.metrics, folder, selected)
    return report_evaluation(results[0], folder)


def selection_set(checkpoints: list[str], items: list[dict], allow: bool, patient_pattern: str) -> dict:
    """{checkpoint: how many of `items` were in its run's validation split} for two checkpoints to compare: a
    checkpoint selected on these volumes looks better on them by construction (equally good checkpoints were
    called different 29% of the time in a simulation), so that comparison stops unless `allow`."""
    if len(checkpoints) != 2:
        return {}
    counts = {c: len(selection_volumes(Path(c), items, patient_pattern)) for c in checkpoints}
    if any(counts.values()) and not allow:
        chosen = ", ".join(f"{c} ({k} of {len(items)})" for c, k in counts.items() if k)
        raise CT3DError(f"evaluate: these volumes are the selection set of {chosen}: its best epoch, thresholds and "
                        f"calibration were chosen on them, so a comparison there favours it. Compare on a held-out "
                        f"datalist (data.val=...), or infer.allow_selection_set=true to compare anyway (recorded)")
    return {"volumes": counts, "allowed": bool(any(counts.values()))}


def predict(cfg: Config) -> Path:
    """predictions.csv: one row per volume, one probability column per label of the checkpoint, then one 0/1
    decision column per label at the checkpoint's thresholds (`<label>_decision`); with several checkpoints,
    the mean of their probabilities, decided at thresholds refit on their shared validation (else their mean
    thresholds, said loudly; ensemble.json records which). Every input left out
    (not a volume, unreadable, a localizer, a single slice) in skipped.csv with its reason."""
    device = resolve_device(cfg.train.device)
    if len(cfg.checkpoints) > 1:
        if cfg.saliency:
            raise CT3DError("config error: saliency: Grad-CAM maps are per model; predict with one checkpoint")
        model, state, thresholds, chosen = load_ensemble(list(cfg.checkpoints), device, cfg.model.weights)
        calibration = None  # each member's is applied inside the ensemble
        log.info("ensemble of %d models: %s", len(cfg.checkpoints), ", ".join(cfg.checkpoints))
    else:
        model, state = load_trained_model(cfg.checkpoint, device, cfg.model.weights)
        (thresholds, calibration), chosen = decision_settings(state), None
    items, skipped = list_inputs(cfg.input, cfg.data)
    loader = torch.utils.data.DataLoader(read_volumes(items, checkpoint_preprocessing(state)),
                                         batch_size=cfg.loader.val_batch_size or cfg.loader.batch_size,
                                         num_workers=loader_workers(cfg.loader, None), collate_fn=collate_readable)
    tta = str(cfg.infer.tta)
    inferer = with_tta(make_inferer(device, resolve_amp(cfg.train.amp, device)), state["task"], tta, calibration)
    rows, unreadable = predict_rows(model, state, items, loader, inferer, device, thresholds,
                                    None if tta != "none" else calibration)  # TTA: each view calibrated inside
    skipped += unreadable
    folder = output_folder(cfg.output, "predict")
    path = write_predictions(folder, state["labels"], rows, skipped)
    if chosen:
        write_json(folder / "ensemble.json", {"members": list(cfg.checkpoints), "thresholds": dict(zip(
            state["labels"], thresholds)), "thresholds_chosen": chosen, "note": thresholds_note(chosen)})
    if cfg.saliency:  # after predictions.csv: a map that fails loses no prediction
        write_saliency(model, state, items, {row[0] for row in rows}, folder / "saliency")
    print(f"ct3d predict: {len(rows)} volume(s) -> {path}"
          + (f"; {len(skipped)} input(s) left out, listed in {folder / 'skipped.csv'}:" if skipped else "")
          + "".join(f"\n  {p}" for p in skipped)
          + (f"\nensemble thresholds: {thresholds_note(chosen)} -> {folder / 'ensemble.json'}" if chosen else ""))
    return path


def export(cfg: Config) -> Path:
    """`export checkpoint=... format=onnx|torchscript`: output.dir/<output.name>/model.onnx (or model.pt)."""
    model, state = load_trained_model(cfg.checkpoint, resolve_device("cpu"), cfg.model.weights)
    fmt = str(cfg.format)
    path = output_folder(cfg.output, "export") / ("model.onnx" if fmt == "onnx" else "model.pt")
    try:
        export_model(model, state, path, fmt)
    except AssertionError as exc:  # MONAI's check: the file's outputs differ from PyTorch's
        raise CT3DError(f"export {path}: the {fmt} model's outputs differ from PyTorch's ({exc})") from None
    print(f"ct3d export: {cfg.checkpoint} -> {path} ({fmt}; labels, task, decision rule and preprocessing "
          f"in its metadata)")
    return path
