"""Using a trained model: load it from a checkpoint (its decisions and calibration, ensembles, TTA), list the
volumes to predict, predict their probabilities and decisions, write predictions.csv and saliency maps.
commands.py wires these into `predict`; `evaluate` is evaluation.py."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import torch
from monai.inferers import Inferer

from engine.config.loading import restore
from engine.config.schema import DataConfig, ModelConfig, PreprocessConfig
from engine.data.datalist import could_be_series, resolve_image
from engine.data.items import IMAGE, NAME, VOLUME_SUFFIXES, Problem
from engine.data.metadata import attach_metadata
from engine.data.prepare import write_skipped
from engine.data.preprocess import LEGACY_PREPROCESSING, preprocessing_transform
from engine.data.run_split import SPLIT_FILE, read_split
from engine.data.sharing import gathered_order
from engine.data.sources import find_volumes
from engine.results.averaging import ensemble_thresholds, flipped_views, mean_probability
from engine.results.calibration import apply_calibration, calibration_from
from engine.results.metrics import decisions, probabilities
from engine.results.saliency import input_space_maps, supports, write_maps
from engine.training.build import to_device
from engine.training.checkpoint import load_checkpoint, progress_of
from engine.training.encoders import restore_encoder
from engine.training.models import create_model
from engine.utils.errors import CT3DError
from engine.utils.io import write_text
from engine.utils.progress import tracked

log = logging.getLogger("ct3d")


def load_trained_model(path: str, device: torch.device, weights: str = "") -> tuple[torch.nn.Module, dict]:
    """The network of a ct3d checkpoint, in eval mode, and the checkpoint's dict. A head trained on a frozen
    encoder has the encoder's weights loaded again from `weights` (model.weights), else from where the checkpoint
    says they were, and checked against its SHA-256."""
    if not path:
        raise CT3DError("config error: checkpoint: give the checkpoint to load, "
                        "e.g. checkpoint=runs/x/checkpoints/best.pt")
    state = load_checkpoint(path)
    model_config = restore(ModelConfig, state["model_config"])
    model = create_model(model_config, len(state["labels"]), state["preprocessing"]["spatial_size"],
                         state.get("encoder"))
    if state.get("encoder") and not any(k.startswith("encoder.") for k in state["model"]):
        restore_encoder(model, model_config, state["encoder"], weights)
    model.load_state_dict(state["model"])
    return to_device(model, device).eval(), state


def checkpoint_preprocessing(state: dict) -> PreprocessConfig:
    """The preprocessing a checkpoint was trained with (settings newer than it: as they were before)."""
    return restore(PreprocessConfig, {**LEGACY_PREPROCESSING, **state["preprocessing"]})


def decision_settings(state: dict) -> tuple[list[float], dict | None]:
    """The checkpoint's per-label thresholds and calibration ({"scale", "bias"}; None: uncalibrated; a
    temperature from before Platt scaling as its scale), fitted on the validation before it was written; a
    checkpoint from before any validation has its fixed threshold only."""
    fitted = state.get("calibration") or {}
    return (list(fitted.get("thresholds") or [state["threshold"]] * len(state["labels"])),
            calibration_from(fitted))


class Ensemble(torch.nn.Module):
    """Several trained models as one: the mean of their probabilities (each with its own calibration),
    returned as logits whose probabilities are that mean."""

    def __init__(self, models: list[torch.nn.Module], calibrations: list[dict | None], task: str):
        super().__init__()
        self.members, self.calibrations, self.task = torch.nn.ModuleList(models), calibrations, task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mean_probability([m(x) for m in self.members], self.calibrations, self.task)


def member_validation(path: str, state: dict) -> dict:
    """What an ensemble refits its thresholds from (averaging.ensemble_thresholds): the member's thresholds, the
    rule and beta its run tuned them with (the run's config.yaml, beside checkpoints/), and its best validation's
    logits, labels and volumes (split.csv's, in the order the outputs were gathered), where the checkpoint's own
    weights gave those outputs (best.pt; final.pt when the last epoch was the best)."""
    import yaml

    run = Path(path).parent.parent
    member = {"name": path, "thresholds": decision_settings(state)[0], "fixed": float(state["threshold"]),
              "rule": None, "beta": None, "logits": None, "why": ""}
    if not (run / "config.yaml").is_file():
        member["why"] = f"no config.yaml of its run in {run} (the threshold rule it was tuned with is unknown)"
        return member
    metrics = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("metrics") or {}
    member.update(rule=str(metrics.get("threshold_rule", "fixed")), beta=float(metrics.get("beta", 1.0)))
    table = state.get("metrics_table") or {}
    best = table.get("best_outputs") or {}
    if "logits" not in best:
        member["why"] = "it holds no validation outputs (a weights-only copy, or from an older ct3d)"
    elif progress_of(state)[1] != (table.get("best") or {}).get("iteration"):
        member["why"] = "its weights are not those of its best validation (use best.pt)"
    elif not (run / SPLIT_FILE).is_file():
        member["why"] = f"no {SPLIT_FILE} in {run} to name its validation volumes"
    else:
        val = [row for row in read_split(run / SPLIT_FILE).values() if row["split"] == "validation"]
        if len(val) != best["logits"].shape[0]:
            member["why"] = f"{run / SPLIT_FILE} lists {len(val)} validation volumes, its outputs {len(best['logits'])}"
        else:
            member.update(logits=best["logits"], labels=best["labels"],
                          volumes=[val[i]["volume"] for i in gathered_order(len(val), best["ranks"])])
    return member


def load_ensemble(paths: list[str], device: torch.device,
                  weights: str = "") -> tuple[torch.nn.Module, dict, list[float], dict]:
    """The models of `paths` as one Ensemble, the first checkpoint's dict, its thresholds per label and how they
    were chosen (averaging.ensemble_thresholds: refit on the members' shared validation where they have one).
    They must share labels, task and preprocessing: any difference is an error naming it."""
    models, states = zip(*(load_trained_model(path, device, weights) for path in paths))
    first = states[0]
    for path, state in zip(paths[1:], states[1:]):
        for key in ("labels", "task", "preprocessing"):
            if state[key] != first[key]:
                raise CT3DError(f"ensemble: {path} has other {key} than {paths[0]}: {state[key]} vs {first[key]}; "
                                f"the members must be trained on the same labels with the same preprocessing")
    calibrations = [decision_settings(state)[1] for state in states]
    thresholds, record = ensemble_thresholds([member_validation(p, s) for p, s in zip(paths, states)], calibrations,
                                             first["task"])
    if record["method"] == "mean":
        log.warning("ensemble: decisions at the members' mean thresholds, not refit for the ensemble: %s; the "
                    "mean probability of several members is not on any one member's scale, so expect other "
                    "sensitivity and specificity than the members'", record["reason"])
    return Ensemble(list(models), calibrations, first["task"]).eval(), first, thresholds, record


def with_tta(inferer, task: str, tta: str, calibration: dict | None = None, ranked: bool = False):
    """infer.tta=flips: the mean probability over the volume and its flips along each spatial axis (4
    passes), each view calibrated first (`calibration`, fitted on single views, as an ensemble calibrates each
    member), returned as logits whose probabilities are that mean: the caller applies no calibration after
    it. `ranked` (evaluate): the mean of the uncalibrated views' probabilities first, as logits, then that
    calibrated mean, side by side ((B, 2C)): AUC ranks the former, decisions use the latter. MONAI's
    TestTimeAugmentation targets segmentation (it inverts spatial outputs)."""
    if tta == "none":
        return inferer

    class FlipAverage(Inferer):
        def __call__(self, inputs, network, *args, **kwargs):
            views = [inferer(v, network, *args, **kwargs) for v in flipped_views(inputs)]
            decided = mean_probability(views, [calibration] * len(views), task)
            return torch.cat([mean_probability(views, [None] * len(views), task), decided], 1) if ranked else decided

    return FlipAverage()


def _datalist_volumes(path: Path, data: DataConfig) -> tuple[list[dict], list[Problem]]:
    if path.suffix.lower() == ".json":
        names = [str(e["image"]) for e in json.loads(path.read_text()).get(data.json_train_key, [])]
    else:
        with open(path, newline="") as f:
            names = [row[data.image_column] for row in csv.DictReader(f)]
    root = Path(data.image_root) if data.image_root else path.parent
    items, skipped = [], []
    for name in names:
        image = resolve_image(name, root, data.layout)
        if image.exists() or could_be_series(image):
            items.append({IMAGE: str(image), NAME: name})
        else:
            skipped.append(Problem(f"{path}: {name}", f"volume {image} does not exist", name))
    return items, skipped


def list_inputs(source: str, data: DataConfig) -> tuple[list[dict], list[Problem]]:
    """Items {"image", "name"} from a datalist, one volume, or a folder (volumes and DICOM series at any
    depth), and every entry left out with its reason."""
    path = Path(source)
    if not source or not path.exists():
        raise CT3DError(f"config error: input: {source!r} does not exist (a datalist, a volume or a folder)")
    if path.is_file() and path.suffix.lower() in (".csv", ".json"):
        items, skipped = _datalist_volumes(path, data)
    else:
        items, skipped = find_volumes(path)
    if not items:
        raise CT3DError(f"input {path}: no volumes (NIfTI, NRRD, MHA files or DICOM series) found"
                        + "".join(f"\n  {p}" for p in skipped))
    if data.metadata:  # raw scanner values: each volume's rescale and spacing (a volume without: skipped)
        (items,) = attach_metadata(data.metadata, (items,), skipped)
    return items, skipped


def write_saliency(model: torch.nn.Module, state: dict, items: list[dict], predicted: set[str], folder: Path) -> None:
    """`saliency=true`: per predicted volume a NIfTI of Grad-CAM maps (one per label, in label order) on the
    volume's own grid, named as its row in predictions.csv."""
    config = restore(ModelConfig, state["model_config"])
    if not supports(config):
        raise CT3DError(f"saliency: no Grad-CAM target layer for {config.name} (ViT has no convolutional map)")
    transform = preprocessing_transform(checkpoint_preprocessing(state), keep_meta=True)
    for item in items:
        if item[NAME] in predicted:
            maps, affine = input_space_maps(model, config, transform, item, len(state["labels"]))
            stem = item[NAME].replace("/", "__")
            for suffix in VOLUME_SUFFIXES:
                stem = stem.removesuffix(suffix)
            write_maps(folder / f"{stem}.nii.gz", maps, affine)
    log.info("saliency maps in %s (one per label, in the order of predictions.csv's columns)", folder)


def predict_rows(model: torch.nn.Module, state: dict, items: list[dict], loader, inferer, device: torch.device,
                 thresholds: list[float], calibration: dict | None) -> tuple[list[list], list[Problem]]:
    """predictions.csv's rows (volume name, one probability per label, one 0/1 decision per label at
    `thresholds`) and the volumes that could not be read, each with its reason."""
    rows, skipped = [], []
    with torch.no_grad():
        for errors, batch in tracked(loader, len(loader), "predict", loader.batch_size, len(items)):
            skipped += [Problem(items[e["index"]][IMAGE], e["error"], items[e["index"]][NAME]) for e in errors]
            if batch is not None:
                logits = apply_calibration(inferer(batch[IMAGE].to(device).float(), model), calibration)
                probs = probabilities(logits, state["task"]).cpu()
                decided = decisions(probs, state["task"], thresholds).int().tolist()
                rows += [[items[i][NAME], *(f"{p:.6f}" for p in row), *d]
                         for i, row, d in zip(batch["index"], probs.tolist(), decided)]
    return rows, skipped


def write_predictions(folder: Path, labels: list[str], rows: list[list], skipped: list[Problem]) -> Path:
    """predictions.csv (a probability column per label, then a `<label>_decision` column per label) and
    skipped.csv (every input left out, with its reason)."""
    buf = io.StringIO()
    header = ["VolumeName", *labels, *(f"{name}_decision" for name in labels)]
    csv.writer(buf).writerows([header, *rows])
    write_text(folder / "predictions.csv", buf.getvalue())
    if skipped:
        write_skipped(folder, skipped)
    return folder / "predictions.csv"
