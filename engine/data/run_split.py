"""The run's split.csv (each volume's patient, side and labels as the run was trained), reading it back, and the
checks against it: a resume must go on with the data, labels and preprocessing it was trained with; `evaluate`
notes volumes of patients the model trained on."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import yaml

from engine.config.loading import plain
from engine.config.schema import PreprocessConfig
from engine.data.items import LABEL, NAME, PATIENT
from engine.data.prepare import Splits
from engine.data.preprocess import LEGACY_PREPROCESSING
from engine.data.split import patient_of
from engine.utils.errors import CT3DError
from engine.utils.io import write_text

SPLIT_FILE = "split.csv"


def split_rows(data: Splits, pattern: str) -> list[dict]:
    """One row per volume: its patient, side and labels (0/1 per output, as one string)."""
    return [{"volume": it[NAME], "patient": patient_of(it, pattern), "split": side,
             "labels": _label_text(it)}
            for side, items in (("train", data.train), ("validation", data.val)) for it in items]


def write_split(folder: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["volume", "patient", "split", "labels"])
    writer.writeheader()
    writer.writerows(rows)
    write_text(folder / SPLIT_FILE, buf.getvalue())


def read_split(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {row["volume"]: row for row in csv.DictReader(f)}


def _examples(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def split_differences(saved: dict[str, dict], rows: list[dict]) -> list[str]:
    """What differs between a run's split.csv and this start's split: volumes new, gone, moved between
    train and validation, or relabelled."""
    now = {row["volume"]: row for row in rows}
    found = []
    for what, names in (
        ("new since the run started", [v for v in now if v not in saved]),
        ("gone since the run started", [v for v in saved if v not in now]),
        ("moved between train and validation", [v for v in now if v in saved and saved[v]["split"] != now[v]["split"]]),
        ("with other labels than when the run started", [v for v in now if v in saved
                                                         and saved[v]["labels"] != now[v]["labels"]]),
    ):
        if names:
            found.append(f"{len(names)} volume(s) {what}: {_examples(names)}")
    return found


# model settings a resumed run may change: where weights are read from, and checks and layouts that leave the
# network as it is; any other difference is another model (its checkpoint would not load, or mean something else)
MODEL_FREE = ("pretrained", "pretrained_min_loaded", "weights", "weights_revision", "preprocess_check", "channels_last")


# training settings a resumed run may change (more epochs, other logging, checkpoint or early-stopping cadence);
# any other is restored from the checkpoint (the optimizer's learning rate, the scaler) or would mix two runs
TRAIN_FREE = ("epochs", "resume", "device", "threads", "log_every", "checkpoint_minutes", "dist_timeout_minutes",
              "val_every", "early_stopping_patience", "early_stopping_min_delta", "compile", "deterministic",
              "seed")  # the seed: the checkpoint's sampler state refuses it mid-epoch (TrainerState), not at an end


def check_same_run(state: dict, checkpoint: Path, folder: Path, data: Splits, task: str,
                   preprocess: PreprocessConfig, patient_pattern: str, model: dict | None = None,
                   train: dict | None = None, min_positive: int | None = None) -> None:
    """Resuming `checkpoint` (its loaded `state`) must go on with the data, labels, preprocessing, `model` and
    `train` settings (plain sections) it was trained with, the latter as the run's config.yaml records them: stop
    naming every difference otherwise (the run would validate on volumes it trained on, mix models, or record a
    learning rate its optimizer's restored state does not use). `min_positive`: metrics.min_positive_patients,
    which sets the labels the best-so-far macro figure averaged (a run from before it existed averaged every label
    with a positive: 1)."""
    found = []
    config = (yaml.safe_load((folder / "config.yaml").read_text()) or {}) if (folder / "config.yaml").is_file() else {}
    if train is not None and config:
        recorded = config.get("train") or {}
        found += [f"train.{k}: the run has {recorded[k]!r}, the config {v!r}" for k, v in train.items()
                  if k not in TRAIN_FREE and k in recorded and recorded[k] != v]
    then = (config.get("metrics") or {}).get("min_positive_patients", 1)
    if min_positive is not None and config and then != min_positive:
        found.append(f"metrics.min_positive_patients: the run's macro figures (best.pt, early stopping) averaged the "
                     f"labels with at least {then} positive patients, the config {min_positive}: give "
                     f"metrics.min_positive_patients={then} to go on comparing like with like")
    saved = state.get("model_config") or {}
    found += [f"model.{k}: the checkpoint has {saved.get(k)!r}, the config {v!r}" for k, v in (model or {}).items()
              if k not in MODEL_FREE and k in saved and saved[k] != v]
    if state["labels"] != data.labels:
        found.append(f"labels: the checkpoint has {state['labels']}, the data {data.labels}")
    if state["task"] != task:
        found.append(f"data.task: the checkpoint has {state['task']}, the config {task}")
    now, then = plain(preprocess), {**LEGACY_PREPROCESSING, **state["preprocessing"]}
    found += [f"preprocess.{k}: the checkpoint has {then.get(k)!r}, the config {now[k]!r}"
              for k in now if then.get(k) != now[k]]
    if (folder / SPLIT_FILE).is_file():
        found += split_differences(read_split(folder / SPLIT_FILE), split_rows(data, patient_pattern))
    if found:
        raise CT3DError(f"cannot resume {checkpoint}: this start differs from the run's:\n  " + "\n  ".join(found)
                        + "\nrestore the run's data and settings, or start a new run (another output.name, "
                        "or train.resume=off)")


def trained_frequencies(checkpoint: Path) -> list[float]:
    """The share of positives per label among the volumes the checkpoint's run trained on, from its split.csv
    (what its loss's pos_weight was made of): evaluating on an outside data set needs no data.train."""
    path = Path(checkpoint).resolve().parent.parent / SPLIT_FILE
    if not path.is_file():
        raise CT3DError(f"evaluate: no {SPLIT_FILE} beside {checkpoint} to tell what its run trained on; give "
                        f"data.train (the run's training datalist)")
    rows = [row["labels"] for row in read_split(path).values() if row["split"] == "train"]
    if not rows:
        raise CT3DError(f"evaluate: {path} lists no training volume; give data.train")
    return [sum(row[j] == "1" for row in rows) / len(rows) for j in range(len(rows[0]))]


def _label_text(item: dict) -> str:
    return "".join(str(int(v)) for v in item[LABEL])


def evaluation_split_note(checkpoint: Path, items: list[dict], patient_pattern: str = "",
                          allow_trained_patients: bool = False) -> str:
    """Says which data an evaluation is on, from the checkpoint's run split.csv (if it is beside it), and
    stops when volumes to evaluate were in the run's training split, carry other labels than there, or (unless
    `allow_trained_patients`) belong to a patient the run trained on: another reconstruction or scan of a
    training patient is not held-out data."""
    path = Path(checkpoint).resolve().parent.parent / SPLIT_FILE
    if not path.is_file():
        return "no split.csv beside the checkpoint: cannot tell whether these volumes were trained on"
    saved = read_split(path)
    trained = [it[NAME] for it in items if saved.get(it[NAME], {}).get("split") == "train"]
    if trained:
        raise CT3DError(f"evaluate: {len(trained)} of the {len(items)} volumes were in the training split of "
                        f"{checkpoint} ({path}): {_examples(trained)}. Their metrics would be inflated; evaluate on "
                        f"the run's validation side (its data settings) or on another datalist")
    training_patients = {row["patient"] for row in saved.values() if row["split"] == "train"}
    shared = sorted({patient_of(it, patient_pattern) for it in items} & training_patients)
    if shared and not allow_trained_patients:
        raise CT3DError(f"evaluate: {len(shared)} patient(s) of these volumes were trained on by {checkpoint} "
                        f"({path}): {_examples(shared)}. Other scans of a training patient are not held-out data; "
                        f"infer.allow_trained_patients=true evaluates them anyway")
    relabelled = [it[NAME] for it in items if it[NAME] in saved and saved[it[NAME]]["labels"] != _label_text(it)]
    if relabelled:
        raise CT3DError(f"evaluate: {len(relabelled)} volume(s) carry other labels than in the run's {path}: "
                        f"{_examples(relabelled)}")
    val = {v for v, row in saved.items() if row["split"] == "validation"}
    names = {it[NAME] for it in items}
    chosen = _selected(saved, items, patient_pattern)
    selected = SELECTION_NOTE.format(len(chosen), len(names)) if chosen else ""
    if names == val:
        return "the run's own validation split" + selected
    outside = len(names - val)
    return (f"another datalist: {outside} of {len(names)} volumes are not in the run's split" if outside else
            f"{len(names)} of the run's {len(val)} validation volumes") + selected


SELECTION_NOTE = ("; selection set: {} of {} volumes were in the run's validation split (or are other scans of its "
                  "patients), where its best epoch, thresholds and calibration were chosen, so figures on them are "
                  "optimistic")


def selection_volumes(checkpoint: Path, items: list[dict], patient_pattern: str = "") -> list[str]:
    """The volumes of `items` in the validation split of `checkpoint`'s run (its split.csv), or of a patient there
    (another scan or reconstruction): the set its best epoch, thresholds and calibration were selected on; []
    without a split.csv."""
    path = Path(checkpoint).resolve().parent.parent / SPLIT_FILE
    return _selected(read_split(path), items, patient_pattern) if path.is_file() else []


def _selected(saved: dict[str, dict], items: list[dict], patient_pattern: str) -> list[str]:
    """The volumes of `items` in the validation side of a run's split.csv rows (`saved`), or of a patient there."""
    rows = [row for row in saved.values() if row["split"] == "validation"]
    val, patients = {row["volume"] for row in rows}, {row["patient"] for row in rows}
    return [it[NAME] for it in items if it[NAME] in val or patient_of(it, patient_pattern) in patients]


def check_patient_column(checkpoint: Path, items: list[dict], allow: bool, column_now: str = "") -> str:
    """The run of `checkpoint` grouped volumes by a patient column (its config.yaml's data.patient_column): volumes
    to evaluate without patient ids would fall back to names, and patient-level intervals and the trained-patient
    check would count each volume as a patient. Every volume needs its id, from the same column (`column_now`:
    this config's data.patient_column). Stops unless `allow`; returns what evaluation.json records."""
    path = Path(checkpoint).resolve().parent.parent / "config.yaml"
    column = ((yaml.safe_load(path.read_text()) or {}).get("data") or {}).get("patient_column") \
        if path.is_file() else ""
    if not column or (all(it.get(PATIENT) for it in items) and column_now == column):
        return ""
    if not allow:
        missing = sum(not it.get(PATIENT) for it in items)
        raise CT3DError(f"evaluate: {checkpoint}'s run grouped volumes by the patient column {column!r} "
                        f"({path}), and {f'{missing} of these volumes have no patient id' if missing else ''}"
                        f"{'' if missing else f'these come from the column {column_now!r}'}: "
                        f"give data.patient_column={column} with a "
                        f"datalist that has it, or infer.allow_missing_patient_column=true to group by "
                        f"data.patient_pattern on the names (recorded)")
    return f"no patient column (the run used {column!r}): patients from data.patient_pattern on the names"
