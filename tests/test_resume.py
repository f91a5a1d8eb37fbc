import csv

import pytest
import torch

from conftest import tiny_overrides
from engine.checkpoint import find_latest_checkpoint, load_checkpoint, save_checkpoint
from engine.config import load_config
from engine.handlers import Checkpoints
from engine.workflow import train

DETERMINISTIC = ("train.deterministic=true", "train.epochs=3", "augment.affine_prob=0.5", "augment.noise_prob=0.5")


def final_weights(folder):
    return load_checkpoint(folder / "checkpoints" / "final.pt")["model"]


def test_resumed_run_ends_with_identical_weights(tmp_path, tiny_demo, monkeypatch):
    whole = train(load_config(None, tiny_overrides(tmp_path, tiny_demo, *DETERMINISTIC, "output.name=whole")))

    original = Checkpoints.save

    def killed_after_epoch_1(self, *names, **kwargs):
        paths = original(self, *names, **kwargs)
        if "last" in names and self.make_state()["trainer"]["epoch"] == 1:
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


def test_early_stopping_still_writes_last_and_final(tmp_path, tiny_demo):
    # min_delta=1 counts no AUC change as an improvement: patience 1 stops at epoch 2
    folder = train(load_config(None, tiny_overrides(tmp_path, tiny_demo, "train.epochs=6",
                                                    "train.early_stopping_patience=1",
                                                    "train.early_stopping_min_delta=1")))
    last = load_checkpoint(folder / "checkpoints" / "last.pt")
    final = load_checkpoint(folder / "checkpoints" / "final.pt")
    assert last["trainer"]["epoch"] == 2 and final["trainer"]["epoch"] == 2
    assert final["stopped_early"] and final["early_stopping"]["counter"] == 1
    # resuming a run that stopped early trains no further
    train(load_config(None, tiny_overrides(tmp_path, tiny_demo, "train.epochs=6", "train.early_stopping_patience=1",
                                           "train.early_stopping_min_delta=1")))
    assert load_checkpoint(folder / "checkpoints" / "final.pt")["trainer"]["epoch"] == 2


def test_find_latest_checkpoint_skips_unreadable_and_temp_files(tmp_path):
    assert find_latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path / "best.pt", {"model": {}, "trainer": {"epoch": 2, "iteration": 20}})
    save_checkpoint(tmp_path / "last.pt", {"model": {}, "trainer": {"epoch": 3, "iteration": 30}})
    (tmp_path / ".tmp-1-abcd-last.pt").write_bytes(b"half a checkpoint")
    assert find_latest_checkpoint(tmp_path) == tmp_path / "last.pt"
    (tmp_path / "last.pt").write_bytes(b"corrupt")
    assert find_latest_checkpoint(tmp_path) == tmp_path / "best.pt"


def test_failed_checkpoint_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "trainer": {"epoch": 1, "iteration": 1}})

    def broken_save(obj, f, *args, **kwargs):
        open(f, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(path, {"model": {"w": torch.zeros(2)}})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
