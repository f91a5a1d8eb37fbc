"""Checkpoint files and the Checkpoints / Resume handlers, on bare Ignite engines."""

import pytest
import torch
from ignite.engine import Engine, Events

from engine.training.checkpoint import (
    CHECKPOINT_FORMAT,
    Checkpoints,
    Resume,
    find_latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from engine.training.state import RandomState, ScalerState, TrainerState


def test_find_latest_checkpoint_skips_unreadable_and_temp_files(tmp_path):
    assert find_latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path / "best.pt", {"model": {}, "trainer": {"epoch": 2, "iteration": 20}})
    save_checkpoint(tmp_path / "last.pt", {"model": {}, "trainer": {"epoch": 3, "iteration": 30}})
    (tmp_path / ".tmp-1-abcd-last.pt").write_bytes(b"half a checkpoint")
    assert find_latest_checkpoint(tmp_path) == tmp_path / "last.pt"
    (tmp_path / "last.pt").write_bytes(b"corrupt")
    assert find_latest_checkpoint(tmp_path) == tmp_path / "best.pt"


def test_a_run_folder_whose_checkpoints_are_all_unreadable_is_not_started_over_in_silence(tmp_path):
    """Starting from scratch would replace the run's metrics.csv, summary.json and report with a new run's."""
    from engine.training.checkpoint import resume_checkpoint
    from engine.utils.errors import CT3DError

    assert resume_checkpoint("auto", tmp_path) is None  # a new run: nothing to resume, nothing to say
    (tmp_path / "last.pt").write_bytes(b"corrupt")
    (tmp_path / "best.pt").write_bytes(b"")
    with pytest.raises(CT3DError, match=r"holds last.pt, best.pt but none is readable.*train.resume=off"):
        resume_checkpoint("auto", tmp_path)
    assert resume_checkpoint("off", tmp_path) is None


def test_failed_checkpoint_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "trainer": {"epoch": 1, "iteration": 1},
                           "format": CHECKPOINT_FORMAT})

    def broken_save(obj, f, *args, **kwargs):
        open(f, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(path, {"model": {"w": torch.zeros(2)}})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]

class Weights:
    """A stateful part, as the model and optimizer are to Checkpoints."""

    def __init__(self, value):
        self.w = torch.full((1000,), float(value))

    def state_dict(self):
        return {"w": self.w}

    def load_state_dict(self, state):
        self.w = state["w"].clone()


def test_checkpoints_snapshot_state_before_background_write(tmp_path):
    weights = Weights(0)
    checkpoints = Checkpoints(tmp_path, {"model": weights}, {"labels": ["x"]})
    paths = checkpoints.save("best", "last")
    weights.w += 1  # training goes on while the writer runs
    checkpoints.wait()
    for path in paths:
        state = load_checkpoint(path)
        assert torch.equal(state["model"]["w"], torch.zeros(1000)) and state["labels"] == ["x"]


def test_checkpoint_write_error_surfaces_in_training_thread(tmp_path, monkeypatch):
    from engine.training import checkpoint

    def broken(path, state):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_checkpoint", broken)
    checkpoints = Checkpoints(tmp_path, {"model": Weights(0)}, {})
    checkpoints.save("last")
    with pytest.raises(OSError, match="disk full"):
        checkpoints.wait()


def counting_trainer(epochs: int) -> Engine:
    trainer = Engine(lambda engine, batch: None)
    trainer.state.max_epochs = epochs
    return trainer


class NeverImproves:
    def improved_at(self, epoch: int) -> bool:
        return False


class NoReduces:
    """A step log that never reduces: only the epoch-end saves happen."""

    def __init__(self):
        self.reduced_now, self.keep_reducing, self.flags = False, False, []

    def request(self, flag) -> int:
        self.flags.append(False)
        return len(self.flags) - 1


def run_saving(trainer: Engine, folder, parts: dict, epochs: int) -> None:
    checkpoints = Checkpoints(folder, parts, {})
    checkpoints.attach(trainer, NeverImproves(), NoReduces())
    trainer.run([0, 1], max_epochs=epochs)
    checkpoints.wait()


def test_one_mapping_saves_and_restores_every_part_at_started(tmp_path):
    """What Checkpoints writes from `to_save` is what Resume puts back into the same mapping."""
    trainer = counting_trainer(2)
    parts = {"model": Weights(3), "trainer": TrainerState(trainer), "rng": RandomState()}
    torch.manual_seed(5)
    run_saving(trainer, tmp_path, parts, 2)
    expected_draw = torch.rand(3)  # the generator as the last checkpoint saw it
    torch.manual_seed(123)

    fresh = counting_trainer(4)
    restored = {"model": Weights(0), "trainer": TrainerState(fresh), "rng": RandomState(),
                "early_stopping": Weights(9)}  # a part new since the checkpoint starts fresh
    epochs_run = []
    Resume(tmp_path / "last.pt", restored).attach(fresh)
    fresh.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs_run.append(e.state.epoch))
    fresh.run([0, 1], max_epochs=4)
    assert torch.equal(restored["model"].w, torch.full((1000,), 3.0))
    assert epochs_run == [3, 4]  # continues after the saved epoch 2, up to the configured 4
    assert torch.equal(restored["early_stopping"].w, torch.full((1000,), 9.0))
    assert torch.equal(torch.rand(3), expected_draw)


def test_resume_keeps_a_lowered_epoch_count_finished(tmp_path):
    trainer = counting_trainer(3)
    run_saving(trainer, tmp_path, {"model": Weights(1), "trainer": TrainerState(trainer)}, 3)
    fresh, epochs_run = counting_trainer(2), []
    Resume(tmp_path / "last.pt", {"model": Weights(0), "trainer": TrainerState(fresh)}).attach(fresh)
    fresh.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs_run.append(e.state.epoch))
    fresh.run([0], max_epochs=2)
    assert epochs_run == [] and fresh.state.epoch == 3


def test_older_checkpoint_formats_are_refused_by_name(tmp_path):
    from engine.utils.errors import CT3DError

    save_checkpoint(tmp_path / "last.pt", {"model": {}, "trainer": {"epoch": 1, "iteration": 5}})
    with pytest.raises(CT3DError, match="another ct3d version"):
        Resume(tmp_path / "last.pt", {"model": Weights(0)})(counting_trainer(2))


def test_scaler_state_round_trips_once_the_trainer_made_its_scaler():
    """MONAI makes the fp16 GradScaler inside run(): ScalerState reads and writes whatever is there then."""
    trainer = counting_trainer(1)
    trainer.scaler = None
    assert ScalerState(trainer).state_dict() is None
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    saved = ScalerState(trainer).state_dict()
    trainer.scaler = torch.amp.GradScaler("cpu")  # what run() makes afresh
    ScalerState(trainer).load_state_dict(saved)
    assert trainer.scaler.get_scale() == 1024.0


def test_one_epochs_best_and_last_are_written_once_and_final_links_to_them_until_training_moves(tmp_path,
                                                                                               monkeypatch):
    import os

    from engine.training import checkpoint

    trainer = Engine(lambda engine, batch: None)
    trainer.run([0, 1], max_epochs=1)  # epoch 1, iteration 2
    weights = Weights(1)
    checkpoints = Checkpoints(tmp_path, {"model": weights, "trainer": TrainerState(trainer)}, {"labels": ["x"]})
    writes = []
    original = checkpoint.save_checkpoint
    monkeypatch.setattr(checkpoint, "save_checkpoint", lambda path, state: (writes.append(path.name),
                                                                            original(path, state)))
    checkpoints.save("best", "last")
    checkpoints.wait()
    assert writes == ["best.pt"]
    best, last = load_checkpoint(tmp_path / "best.pt"), load_checkpoint(tmp_path / "last.pt")
    assert torch.equal(best["model"]["w"], last["model"]["w"]) and best["trainer"] == last["trainer"]
    assert os.stat(tmp_path / "best.pt").st_ino == os.stat(tmp_path / "last.pt").st_ino  # a link, not a copy
    checkpoints.save_final()
    assert writes == ["best.pt"] and load_checkpoint(tmp_path / "final.pt")["trainer"]["iteration"] == 2
    checkpoints.save("last")  # a new last.pt replaces the name: best.pt and final.pt keep what they held
    checkpoints.wait()
    assert os.stat(tmp_path / "best.pt").st_ino != os.stat(tmp_path / "last.pt").st_ino
    weights.w += 1
    trainer.run([0, 1, 2], max_epochs=2)  # training moved on: final.pt is written, not linked
    checkpoints.save_final()
    assert writes[-1] == "final.pt"
    final = load_checkpoint(tmp_path / "final.pt")
    assert final["trainer"]["epoch"] == 2 and torch.equal(final["model"]["w"], torch.full((1000,), 2.0))
    assert torch.equal(load_checkpoint(tmp_path / "best.pt")["model"]["w"], torch.ones(1000))
