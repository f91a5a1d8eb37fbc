"""Using a trained model: load it from a checkpoint, `evaluate` it on a validation datalist, `predict`
probabilities for new volumes."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime
from pathlib import Path

import torch

from engine.build import (
    make_evaluator,
    make_inferer,
    make_loader,
    make_loss,
    prepare_batch,
    resolve_amp,
    resolve_device,
)
from engine.checkpoint import load_checkpoint
from engine.config import restore
from engine.data import build_dataset
from engine.datalist import IMAGE, LABEL, label_frequencies, resolve_image
from engine.errors import CT3DError
from engine.io import write_json, write_text
from engine.models import create_model
from engine.prepare import load_splits
from engine.schema import Config, ModelConfig, PreprocessConfig

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


def load_trained_model(path: str, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The network of a ct3d checkpoint, in eval mode, and the checkpoint's dict."""
    if not path:
        raise CT3DError("config error: checkpoint: give the checkpoint to load, "
                        "e.g. checkpoint=runs/x/checkpoints/best.pt")
    state = load_checkpoint(path)
    model = create_model(restore(ModelConfig, state["model_config"]), len(state["labels"]),
                         state["preprocessing"]["spatial_size"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def checkpoint_preprocessing(state: dict) -> PreprocessConfig:
    return restore(PreprocessConfig, state["preprocessing"])


def _output_folder(cfg: Config, command: str) -> Path:
    return Path(cfg.output.dir) / (cfg.output.name or f"{command}-{datetime.now():%Y%m%d-%H%M%S}")


def evaluate(cfg: Config) -> dict:
    """Every validation metric of a checkpoint on the config's validation datalist (or split)."""
    device = resolve_device(cfg.train.device)
    model, state = load_trained_model(cfg.checkpoint, device)
    train_items, val_items, labels = load_splits(cfg.data)
    if labels != state["labels"]:
        raise CT3DError(f"datalist labels {labels} differ from the checkpoint's {state['labels']}")
    dataset = build_dataset(val_items, checkpoint_preprocessing(state), cfg.cache.dir if cfg.cache.disk else None,
                            cfg.cache.memory_rate, cfg.cache.workers)
    evaluator, _ = make_evaluator(model, make_loader(dataset, cfg.loader, device), device,
                                  resolve_amp(cfg.train.amp, device), cfg.metrics, labels, state["task"],
                                  make_loss(cfg.train, state["task"], label_frequencies(train_items)))
    evaluator.run()
    metrics = dict(evaluator.state.metrics)
    folder = _output_folder(cfg, "evaluate")
    result = {"checkpoint": str(cfg.checkpoint), "epoch": state["trainer"]["epoch"], "volumes": len(val_items),
              "labels": labels, "metrics": metrics}
    write_json(folder / "evaluation.json", result)
    width = max(len(k) for k in metrics)
    print(f"\nct3d evaluate {cfg.checkpoint} on {len(val_items)} volumes -> {folder}")
    print("\n".join(f"{k:<{width}}  {v:.4f}" for k, v in metrics.items()))
    return metrics


def _datalist_volumes(path: Path, cfg: Config) -> list[dict]:
    if path.suffix.lower() == ".json":
        names = [str(e["image"]) for e in json.loads(path.read_text()).get(cfg.data.json_train_key, [])]
    else:
        with open(path, newline="") as f:
            names = [row[cfg.data.image_column] for row in csv.DictReader(f)]
    root = Path(cfg.data.image_root) if cfg.data.image_root else path.parent
    items = [{IMAGE: str(resolve_image(n, root, cfg.data.layout)), "name": n} for n in names]
    missing = [it[IMAGE] for it in items if not Path(it[IMAGE]).exists()]
    if missing:
        raise CT3DError(f"datalist {path}: {len(missing)} volume(s) missing, e.g. {missing[0]}")
    return items


def list_volumes(source: str, cfg: Config) -> list[dict]:
    """Items {"image", "name"} from a datalist, one volume, or a folder of volumes and DICOM series folders."""
    path = Path(source)
    if not source or not path.exists():
        raise CT3DError(f"config error: input: {source!r} does not exist (a datalist, a volume or a folder)")
    if path.is_file() and path.suffix.lower() in (".csv", ".json"):
        return _datalist_volumes(path, cfg)
    if path.is_file() or any(p.suffix.lower() == ".dcm" for p in path.iterdir()):
        return [{IMAGE: str(path), "name": path.name}]
    items = []
    for entry in sorted(path.iterdir()):
        is_volume = entry.is_file() and entry.name.lower().endswith(VOLUME_SUFFIXES) and entry.suffix != ".dcm"
        is_series = entry.is_dir() and any(p.suffix.lower() == ".dcm" for p in entry.iterdir())
        if is_volume or is_series:
            items.append({IMAGE: str(entry), "name": entry.name})
    if not items:
        raise CT3DError(f"input {path}: no volumes (NIfTI, NRRD, MHA files or DICOM series folders) found")
    return items


def predict(cfg: Config) -> Path:
    """predictions.csv: one row per volume, one probability column per label of the checkpoint."""
    from engine.metrics import probabilities

    device = resolve_device(cfg.train.device)
    model, state = load_trained_model(cfg.checkpoint, device)
    items = list_volumes(cfg.input, cfg)
    for it in items:
        it[LABEL] = [0.0]  # Labelled wants a label; predictions ignore it
    dataset = build_dataset(items, checkpoint_preprocessing(state), None, 0.0, cfg.cache.workers)
    inferer = make_inferer(device, resolve_amp(cfg.train.amp, device))
    rows = []
    with torch.no_grad():
        for batch in make_loader(dataset, cfg.loader, device):
            image, _ = prepare_batch(batch, device)
            rows.extend(probabilities(inferer(image, model), state["task"]).cpu().tolist())
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["VolumeName", *state["labels"]])
    for it, probs in zip(items, rows):
        writer.writerow([it["name"], *(f"{p:.6f}" for p in probs)])
    path = _output_folder(cfg, "predict") / "predictions.csv"
    write_text(path, buf.getvalue())
    print(f"ct3d predict: {len(items)} volume(s) -> {path}")
    return path
