"""Training end to end: every model family and task, the run folder, resume, early stopping, kills."""

import csv
import json
import logging
import random
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from engine.config.loading import load_config
from engine.data.demo import LABELS
from engine.training.checkpoint import CHECKPOINT_NAMES, Checkpoints, find_latest_checkpoint, load_checkpoint
from engine.training.workflow import train
from engine.utils.errors import CT3DError
from forked import Forked
from helpers import start, tiny_overrides


@pytest.mark.parametrize("model", [["model.name=resnet3d"], ["model.name=densenet3d"],
                                   ["model.name=vit3d", "model.patch_size=16"]])
def test_each_model_family_trains_one_epoch(tmp_path, tiny_demo, model):
    folder = train(load_config(None, tiny_overrides(tmp_path, tiny_demo, *model)))
    assert folder == tmp_path / "runs" / "run"
    for name in ("config.yaml", "metrics.csv", "summary.json", "checkpoints/best.pt", "checkpoints/last.pt",
                 "checkpoints/final.pt"):
        assert (folder / name).is_file(), name
    rows = list(csv.DictReader(open(folder / "metrics.csv")))
    assert len(rows) == 1 and rows[0]["epoch"] == "1" and rows[0]["auc/Emphysema"] != ""
    assert float(rows[0]["train_loss"]) > 0 and float(rows[0]["seconds"]) > 0
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["labels"] == list(LABELS) and summary["best_epoch"] == 1
    assert summary["train_volumes"] + summary["val_volumes"] == 24
    state = load_checkpoint(folder / "checkpoints" / "final.pt")
    assert state["labels"] == list(LABELS) and state["trainer"]["epoch"] == 1
    assert set(state) >= {"model", "optimizer", "scheduler", "model_config", "preprocessing", "history", "rng"}


def test_run_writes_resolved_config_and_validates_every_n_epochs(tmp_path, tiny_demo):
    folder = train(load_config(None, tiny_overrides(tmp_path, tiny_demo, "train.epochs=3", "train.val_every=2",
                                                    "train.accumulation_steps=2", "train.loss=focal")))
    saved = load_config(folder / "config.yaml")
    assert saved.train.epochs == 3 and saved.train.loss == "focal"
    epochs = [row["epoch"] for row in csv.DictReader(open(folder / "metrics.csv"))]
    assert epochs == ["2", "3"]  # every 2nd epoch, and always the last


def test_best_checkpoint_matches_best_row(tmp_path, tiny_demo):
    folder = train(load_config(None, tiny_overrides(tmp_path, tiny_demo, "train.epochs=3")))
    rows = list(csv.DictReader(open(folder / "metrics.csv")))
    best_row = max(rows, key=lambda r: float(r["auc_macro"]))
    best = load_checkpoint(folder / "checkpoints" / "best.pt")
    assert best["trainer"]["epoch"] == int(best_row["epoch"])
    final = load_checkpoint(folder / "checkpoints" / "final.pt")
    assert final["trainer"]["epoch"] == 3


def test_multiclass_and_binary_tasks_train(tmp_path, tiny_demo):
    lines = tiny_demo.read_text().splitlines()
    multiclass = tmp_path / "grades.csv"
    names = [line.split(",")[0] for line in lines[1:]]
    multiclass.write_text("\n".join(["VolumeName,grade"] + [f"{name},{i % 3}" for i, name in enumerate(names)]))
    for name in names:
        (tmp_path / name).symlink_to(tiny_demo.parent / name)
    folder = train(load_config(None, tiny_overrides(tmp_path, multiclass, "data.task=multiclass",
                                                    "data.num_classes=3")))
    assert json.loads((folder / "summary.json").read_text())["labels"] == ["class_0", "class_1", "class_2"]
    folder = train(load_config(None, tiny_overrides(tmp_path, tiny_demo, "data.task=binary",
                                                    "data.label_columns=[Emphysema]", "output.name=binary")))
    state = load_checkpoint(folder / "checkpoints" / "final.pt")
    assert state["labels"] == ["Emphysema"] and state["model"]["fc.weight"].shape[0] == 1


def test_truncated_volume_stops_before_training(tmp_path, tiny_demo):
    lines = tiny_demo.read_text().splitlines()
    for line in lines[1:]:
        name = line.split(",")[0]
        (tmp_path / name).write_bytes((tiny_demo.parent / name).read_bytes())
    victim = tmp_path / lines[5].split(",")[0]
    victim.write_bytes(victim.read_bytes()[:300])
    (tmp_path / "list.csv").write_text(tiny_demo.read_text())
    with pytest.raises(CT3DError, match=victim.name):
        train(load_config(None, tiny_overrides(tmp_path, tmp_path / "list.csv")))
    assert not (tmp_path / "runs" / "run" / "checkpoints" / "last.pt").exists()

DETERMINISTIC = ("train.deterministic=true", "train.epochs=3", "augment.affine_prob=0.5", "augment.noise_prob=0.5")


def final_weights(folder):
    return load_checkpoint(folder / "checkpoints" / "final.pt")["model"]


def test_resumed_run_ends_with_identical_weights(tmp_path, tiny_demo, monkeypatch):
    whole = train(load_config(None, tiny_overrides(tmp_path, tiny_demo, *DETERMINISTIC, "output.name=whole")))

    original = Checkpoints.save

    def killed_after_epoch_1(self, *names, **kwargs):
        paths = original(self, *names, **kwargs)
        if "last" in names and self.state()["trainer"]["epoch"] == 1:
            self.wait()
            raise KeyboardInterrupt("simulated kill")
        return paths

    monkeypatch.setattr(Checkpoints, "save", killed_after_epoch_1)
    overrides = tiny_overrides(tmp_path, tiny_demo, *DETERMINISTIC, "output.name=split")
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, overrides))
    monkeypatch.setattr(Checkpoints, "save", original)
    assert not (tmp_path / "runs" / "split" / "checkpoints" / "final.pt").exists()
    resumed = train(load_config(None, overrides))

    a, b = final_weights(whole), final_weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    rows = list(csv.DictReader(open(resumed / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    whole_rows = list(csv.DictReader(open(whole / "metrics.csv")))
    assert [r["auc_macro"] for r in rows] == [r["auc_macro"] for r in whole_rows]


def test_raising_epochs_on_resume_extends_training(tmp_path, tiny_demo):
    folder = train(load_config(None, tiny_overrides(tmp_path, tiny_demo, "train.epochs=1")))
    assert load_checkpoint(folder / "checkpoints" / "final.pt")["trainer"]["epoch"] == 1
    train(load_config(None, tiny_overrides(tmp_path, tiny_demo, "train.epochs=2")))
    state = load_checkpoint(folder / "checkpoints" / "final.pt")
    assert state["trainer"]["epoch"] == 2 and len(state["metrics_table"]["rows"]) == 2


def test_resume_with_other_labels_preprocessing_or_split_stops_naming_the_difference(tmp_path, tiny_demo):
    folder = train(load_config(None, tiny_overrides(tmp_path, tiny_demo)))
    rows = list(csv.DictReader(open(folder / "split.csv")))
    assert len(rows) == 24 and {r["split"] for r in rows} == {"train", "validation"}
    assert rows[0]["patient"] == rows[0]["volume"].split("_a_")[0] and set(rows[0]["labels"]) <= {"0", "1"}
    for change, expected in (("preprocess.hu_window=[-900,900]", r"preprocess.hu_window: the checkpoint has "
                                                                  r"\[-1000.0, 1000.0\], the config \[-900.0, 900.0\]"),
                             ("data.label_columns=[Emphysema,Cardiomegaly]", r"labels: the checkpoint has \['Lung"),
                             ("data.split_seed=5", r"volume\(s\) moved between train and validation: train_"),
                             ("metrics.min_positive_patients=2",
                              r"metrics.min_positive_patients: the run's macro figures .* at least 1 positive "
                              r"patients, the config 2")):
        with pytest.raises(CT3DError, match=r"(?s)cannot resume .*final.pt.*" + expected):
            train(load_config(None, tiny_overrides(tmp_path, tiny_demo, "train.epochs=2", change)))
    assert load_checkpoint(folder / "checkpoints" / "final.pt")["trainer"]["epoch"] == 1  # nothing was touched


def test_best_checkpoint_exists_when_the_key_metric_was_nan_every_time(tmp_path, tiny_demo):
    lines = tiny_demo.read_text().splitlines()
    header, rows = lines[0], lines[1:]
    (tmp_path / "train.csv").write_text("\n".join([header, *rows[:20]]) + "\n")
    negatives = [row.split(",")[0] + ",0,0,0,0" for row in rows[20:]]  # one class only: AUC is NaN
    (tmp_path / "val.csv").write_text("\n".join([header, *negatives]) + "\n")
    folder = train(load_config(None, tiny_overrides(tmp_path, tmp_path / "train.csv", "train.epochs=2",
                                                    f"data.val={tmp_path / 'val.csv'}",
                                                    f"data.image_root={tiny_demo.parent}")))
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["best"]["auc_macro"] is None and summary["auc_macro_labels"] == 0
    assert summary["auc_left_out"] == list(LABELS)
    assert load_checkpoint(folder / "checkpoints" / "best.pt")["trainer"]["epoch"] == 1


def test_early_stopping_still_writes_last_and_final(tmp_path, tiny_demo):
    # min_delta=1 counts no AUC change as an improvement: patience 1 stops at epoch 2
    folder = train(load_config(None, tiny_overrides(tmp_path, tiny_demo, "train.epochs=6",
                                                    "train.early_stopping_patience=1",
                                                    "train.early_stopping_min_delta=1")))
    last = load_checkpoint(folder / "checkpoints" / "last.pt")
    final = load_checkpoint(folder / "checkpoints" / "final.pt")
    assert last["trainer"]["epoch"] == 2 and final["trainer"]["epoch"] == 2
    assert final["trainer"]["stopped_early"] and final["early_stopping"]["counter"] == 1
    # resuming a run that stopped early trains no further and leaves its final.pt alone
    written = (folder / "checkpoints" / "final.pt").stat().st_mtime_ns
    train(load_config(None, tiny_overrides(tmp_path, tiny_demo, "train.epochs=6", "train.early_stopping_patience=1",
                                           "train.early_stopping_min_delta=1")))
    assert load_checkpoint(folder / "checkpoints" / "final.pt")["trainer"]["epoch"] == 2
    assert (folder / "checkpoints" / "final.pt").stat().st_mtime_ns == written

# ------------------------------------------------------------------ killed and resumed
KILL_RUN = ("train.deterministic=true", "train.epochs=3", "train.log_every=1", "model.widen_factor=0.5",
            "augment.affine_prob=0.5")


@pytest.fixture(scope="module")
def whole(tmp_path_factory, tiny_demo) -> Path:
    """The uninterrupted KILL_RUN every killed-and-resumed run must end equal to."""
    tmp = tmp_path_factory.mktemp("whole")
    return train(load_config(None, tiny_overrides(tmp, tiny_demo, *KILL_RUN, "output.name=whole")))


def start_and_kill(overrides: list[str], folder: Path, phase: str, seed: int) -> str:
    """Starts training in a subprocess and SIGKILLs it in `phase` of epoch 2 (a seeded random iteration or
    moment), when epoch 1's checkpoint is on disk: the restart must resume from it, not start afresh."""
    rng = random.Random(seed)
    epoch = 2
    proc = start("train", *overrides)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    iteration = rng.randint(1, 4)
    deadline = time.time() + 300
    killed_in = ""
    text, seen = "", 0
    while proc.poll() is None and time.time() < deadline and not killed_in:
        new = lines[seen:]  # only the new lines (joining them all every millisecond cost seconds of CPU)
        text, seen = text + "".join(new), seen + len(new)
        if phase == "iteration" and f"epoch {epoch}/3 iteration {iteration}/" in text:
            time.sleep(rng.uniform(0, 0.05))
            killed_in = "iteration"
        elif phase == "validation" and f"validating epoch {epoch}" in text:
            time.sleep(rng.uniform(0, 0.02))
            killed_in = "validation"
        elif phase == "checkpoint" and f"validating epoch {epoch}" in text:
            checkpoints = folder / "checkpoints"
            while proc.poll() is None and not killed_in:
                if any(p.name.startswith(".tmp-") for p in checkpoints.iterdir()):
                    killed_in = "checkpoint"
                time.sleep(0.0002)  # a write's temporary file lives for milliseconds (fsynced): spinning stole a core
            break
        time.sleep(0.002)
    if killed_in:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return killed_in


@pytest.mark.slow
def test_sigkill_then_resume_finishes_with_identical_weights(tmp_path, tiny_demo, whole, caplog):
    expected = load_checkpoint(whole / "checkpoints" / "final.pt")["model"]
    for seed, phase in enumerate(("iteration", "validation", "checkpoint")):
        name = f"killed-{phase}"
        overrides = tiny_overrides(tmp_path, tiny_demo, *KILL_RUN, f"output.name={name}")
        folder = tmp_path / "runs" / name
        assert start_and_kill(overrides, folder, phase, seed) == phase, f"never reached {phase}"
        for ckpt in (folder / "checkpoints").glob("*.pt"):
            if not ckpt.name.startswith(".tmp-"):
                load_checkpoint(ckpt)  # every real checkpoint stays readable
        survivor = find_latest_checkpoint(folder / "checkpoints")
        assert survivor is not None and load_checkpoint(survivor)["trainer"]["epoch"] >= 1, (phase, survivor)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ct3d"):  # the resume: here (the kill needed a process)
            train(load_config(None, overrides))
        assert f"resumed from {survivor}" in caplog.text, phase
        for ckpt in CHECKPOINT_NAMES:
            load_checkpoint(folder / "checkpoints" / ckpt)
        assert not list((folder / "checkpoints").glob(".tmp-*"))  # the restarted run cleared the dead writer's
        got = load_checkpoint(folder / "checkpoints" / "final.pt")["model"]
        assert all(torch.equal(expected[k], got[k]) for k in expected), phase


class NanAfter(torch.nn.BCEWithLogitsLoss):
    """BCE that turns NaN from its `calls`-th call on, as a diverging run does."""

    def __init__(self, calls: int):
        super().__init__()
        self.calls, self.seen = calls, 0

    def forward(self, logits, labels):
        self.seen += 1
        loss = super().forward(logits, labels)
        return loss * float("nan") if self.seen >= self.calls else loss


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, tiny_demo, monkeypatch):
    from engine.training import workflow

    monkeypatch.setattr(workflow, "make_loss", lambda *args: NanAfter(calls=7))  # iteration 7: in epoch 2
    # the step log reduces every 2 iterations: the NaN of iteration 7 is seen, on every rank, at iteration 8
    with pytest.raises(CT3DError, match=r"epoch 2, iteration 8: the loss became NaN or infinite.*last.pt"):
        train(load_config(None, tiny_overrides(tmp_path, tiny_demo, "train.epochs=3", "train.log_every=2")))
    checkpoints = tmp_path / "runs" / "run" / "checkpoints"
    assert not (checkpoints / "final.pt").exists()
    last = load_checkpoint(checkpoints / "last.pt")
    assert last["trainer"]["epoch"] == 1
    assert all(torch.isfinite(w).all() for w in last["model"].values() if w.is_floating_point())


def wait_for(proc: Forked, lines: list[str], text: str, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while text not in "".join(lines):
        assert proc.poll() is None and time.time() < deadline, f"never saw {text!r}: {''.join(lines)[-2000:]}"
        time.sleep(0.01)


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_at_once_and_resumes_at_the_next_batch(tmp_path, tiny_demo, whole, caplog):
    overrides = tiny_overrides(tmp_path, tiny_demo, *KILL_RUN, "output.name=term")
    proc = start("train", *overrides)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    wait_for(proc, lines, "epoch 2/3 iteration 2/")
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143 and time.time() - signalled < 30
    checkpoints = tmp_path / "runs" / "term" / "checkpoints"
    last = load_checkpoint(checkpoints / "last.pt")["trainer"]
    assert last["epoch"] == 2 and 0 < last["iteration"] - last["epoch_length"] < last["epoch_length"]
    assert not (checkpoints / "final.pt").exists()
    with caplog.at_level(logging.INFO, logger="ct3d"):
        train(load_config(None, overrides))
    assert f"resumed from {checkpoints / 'last.pt'} at iteration {last['iteration']}" in caplog.text
    assert all(torch.equal(final_weights(whole)[k], v) for k, v in final_weights(checkpoints.parent).items())
    assert train_losses(checkpoints.parent) == train_losses(whole)  # the interrupted epoch's too: the sums resumed


def train_losses(folder: Path) -> list[float]:
    """Each epoch's mean training loss, as the run recorded it (exact floats, not metrics.csv's digits)."""
    return [row["train_loss"] for row in load_checkpoint(folder / "checkpoints" / "final.pt")["metrics_table"]["rows"]]


@pytest.mark.slow
def test_clock_checkpoints_make_a_killed_run_lose_minutes_not_an_epoch(tmp_path, tiny_demo, whole):
    overrides = tiny_overrides(tmp_path, tiny_demo, *KILL_RUN, "output.name=clock", "train.checkpoint_minutes=0.0001")
    proc = start("train", *overrides)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    wait_for(proc, lines, "epoch 2/3 iteration 3/")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    survivor = load_checkpoint(find_latest_checkpoint(tmp_path / "runs" / "clock" / "checkpoints"))["trainer"]
    assert survivor["epoch"] == 2 and survivor["iteration"] > survivor["epoch_length"]  # inside epoch 2
    train(load_config(None, overrides))
    assert all(torch.equal(final_weights(whole)[k], v) for k, v in final_weights(tmp_path / "runs" / "clock").items())
    assert train_losses(tmp_path / "runs" / "clock") == train_losses(whole)


def test_a_finished_run_started_again_rewrites_a_final_pt_older_than_its_last_state(tmp_path, tiny_demo):
    """An extension (train.epochs raised) stopped in its last validation leaves the previous final.pt; the next
    start finds training finished and must not keep it: final.pt, summary.json and the report describe one model."""
    import shutil

    import torch

    from engine.config.loading import load_config
    from engine.training.workflow import train

    def run(epochs: int):
        return train(load_config(None, tiny_overrides(tmp_path, tiny_demo, f"train.epochs={epochs}",
                                                      "metrics.bootstrap=0")))

    final = run(1) / "checkpoints" / "final.pt"
    shutil.copyfile(final, tmp_path / "epoch1.pt")
    run(2)
    final.unlink()
    shutil.copyfile(tmp_path / "epoch1.pt", final)  # what the interrupted extension left behind
    run(2)  # finished already: nothing to train
    assert torch.load(final, weights_only=True)["trainer"]["epoch"] == 2


def test_resuming_a_run_with_another_model_is_refused_naming_it_and_leaves_its_config(tmp_path, tiny_demo):
    from engine.config.loading import load_config
    from engine.training.workflow import train
    from engine.utils.errors import CT3DError

    folder = train(load_config(None, tiny_overrides(tmp_path, tiny_demo, "metrics.bootstrap=0")))
    saved = (folder / "config.yaml").read_text()
    with pytest.raises(CT3DError, match=r"model.variant: the checkpoint has '10', the config '18'"):
        train(load_config(None, tiny_overrides(tmp_path, tiny_demo, "metrics.bootstrap=0", "model.variant=18",
                                               "train.epochs=2")))
    assert (folder / "config.yaml").read_text() == saved  # the run's record is not rewritten by a refused start


def test_an_unwritable_output_folder_stops_training_before_any_volume_is_read(tmp_path, tiny_demo, monkeypatch):
    from engine.config.loading import load_config
    from engine.training.workflow import train
    from engine.utils.errors import CT3DError

    def unread(*_):
        raise AssertionError("a volume was read")

    monkeypatch.setattr("engine.data.cache.preprocess", unread)
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(CT3DError, match="output.dir: .*a-file/runs is not writable"):
        train(load_config(None, tiny_overrides(tmp_path, tiny_demo, f"output.dir={tmp_path / 'a-file' / 'runs'}")))


def test_a_nan_loss_in_the_first_epoch_names_no_checkpoint_that_does_not_exist(tmp_path, tiny_demo, monkeypatch):
    from engine.training import workflow

    monkeypatch.setattr(workflow, "make_loss", lambda *args: NanAfter(calls=1))
    with pytest.raises(CT3DError, match=r"No checkpoint was written before it") as raised:
        train(load_config(None, tiny_overrides(tmp_path, tiny_demo, "train.epochs=2", "train.log_every=2")))
    assert "last.pt" not in str(raised.value)


def test_resuming_with_another_learning_rate_is_refused_and_more_epochs_are_not(tmp_path, tiny_demo):
    """The optimizer's restored state keeps the run's learning rate: a new train.lr would be recorded in
    config.yaml and not used."""
    from engine.config.loading import load_config
    from engine.training.workflow import train
    from engine.utils.errors import CT3DError

    def run(*extra: str):
        return train(load_config(None, tiny_overrides(tmp_path, tiny_demo, "metrics.bootstrap=0", *extra)))

    folder = run("train.lr=0.001")
    with pytest.raises(CT3DError, match=r"train.lr: the run has 0.001, the config 0.01"):
        run("train.lr=0.01", "train.epochs=2")
    run("train.lr=0.001", "train.epochs=2", "train.log_every=5")  # an extension, logged more often: allowed
    assert torch.load(folder / "checkpoints" / "final.pt", weights_only=True)["trainer"]["epoch"] == 2


def test_too_little_room_for_a_checkpoint_stops_before_any_volume_is_read(tmp_path, tiny_demo, monkeypatch):
    import shutil
    from collections import namedtuple

    from engine.config.loading import load_config
    from engine.training.workflow import train
    from engine.utils.errors import CT3DError

    def unread(*_):
        raise AssertionError("a volume was read")

    monkeypatch.setattr("engine.data.cache.preprocess", unread)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**6, 10**6 - 10**4, 10**4))  # 10 kB free
    with pytest.raises(CT3DError, match=r"output.dir: .* has 0.00 GiB free; a checkpoint of this resnet3d"):
        train(load_config(None, tiny_overrides(tmp_path, tiny_demo)))
