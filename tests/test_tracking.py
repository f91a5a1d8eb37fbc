import pytest

from conftest import tiny_overrides
from engine.checkpoint import load_checkpoint
from engine.config import load_config
from engine.errors import CT3DError
from engine.workflow import train


def test_offline_wandb_run_folder_and_resume_continues_it(tmp_path, tiny_demo, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    folder = train(load_config(None, tiny_overrides(tmp_path, tiny_demo, "tracking.wandb.mode=offline")))
    run_id = load_checkpoint(folder / "checkpoints" / "final.pt")["wandb_id"]
    runs = sorted((folder / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(run_id)
    assert list(runs[0].glob("*.wandb")) and (runs[0] / "files").is_dir()
    train(load_config(None, tiny_overrides(tmp_path, tiny_demo, "tracking.wandb.mode=offline", "train.epochs=2")))
    assert load_checkpoint(folder / "checkpoints" / "final.pt")["wandb_id"] == run_id
    assert all(r.name.endswith(run_id) for r in (folder / "wandb").glob("offline-run-*"))


def test_online_without_key_is_a_clear_error(tmp_path, tiny_demo, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(CT3DError, match="WANDB_API_KEY"):
        train(load_config(None, tiny_overrides(tmp_path, tiny_demo, "tracking.wandb.mode=online")))
