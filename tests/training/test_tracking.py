import pytest
import torch

from engine.config.loading import load_config
from engine.training.checkpoint import load_checkpoint
from engine.training.workflow import train
from engine.utils.errors import CT3DError
from helpers import ENV, cli, tiny_overrides


def test_offline_wandb_run_folder_and_resume_continues_it(tmp_path, tiny_demo, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    folder = train(load_config(None, tiny_overrides(tmp_path, tiny_demo, "tracking.wandb.mode=offline")))
    run_id = load_checkpoint(folder / "checkpoints" / "final.pt")["tracking"]["run_id"]
    runs = sorted((folder / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(run_id)
    assert list(runs[0].glob("*.wandb")) and (runs[0] / "files").is_dir()
    train(load_config(None, tiny_overrides(tmp_path, tiny_demo, "tracking.wandb.mode=offline", "train.epochs=2")))
    assert load_checkpoint(folder / "checkpoints" / "final.pt")["tracking"]["run_id"] == run_id
    assert all(r.name.endswith(run_id) for r in (folder / "wandb").glob("offline-run-*"))


def test_uploaded_checkpoint_is_weights_only_and_only_when_asked(tmp_path, tiny_demo, monkeypatch):
    """best.pt carries every validation volume's labels and probabilities (for the report): the artifact
    W&B gets must not. Offline, W&B stages the artifact in the run folder for a later `wandb sync`."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    folder = train(load_config(None, tiny_overrides(tmp_path, tiny_demo, "tracking.wandb.mode=offline")))
    assert not (folder / "checkpoints" / "best-weights.pt").exists()  # not asked: nothing leaves
    train(load_config(None, tiny_overrides(tmp_path, tiny_demo, "tracking.wandb.mode=offline", "train.epochs=2",
                                           "tracking.wandb.upload_checkpoint=true")))
    best = load_checkpoint(folder / "checkpoints" / "best.pt")
    assert best["metrics_table"]["best_outputs"]["probs"].shape[0] > 0  # what must not be uploaded
    weights = load_checkpoint(folder / "checkpoints" / "best-weights.pt")
    assert set(weights) == {"model", "labels", "task", "model_config", "preprocessing", "threshold", "calibration",
                            "format", "trainer"}
    assert weights["trainer"] == {"epoch": best["trainer"]["epoch"], "iteration": best["trainer"]["iteration"]}
    tensors = [v for v in weights["model"].values()] + [v for v in weights.values() if hasattr(v, "shape")]
    assert all(torch.equal(weights["model"][k], best["model"][k]) for k in best["model"])
    assert len(tensors) == len(best["model"])  # no tensor beside the weights
    staged = b"".join(p.read_bytes() for p in (folder / "wandb").rglob("*.wandb"))
    assert b"best-weights.pt" in staged and b"best.pt" not in staged


def test_online_without_key_is_a_clear_error(tmp_path, tiny_demo, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(CT3DError, match="WANDB_API_KEY"):
        train(load_config(None, tiny_overrides(tmp_path, tiny_demo, "tracking.wandb.mode=online")))


# ------------------------------------------------------------------ security
@pytest.mark.slow
def test_wandb_key_appears_in_no_file_and_no_output(tmp_path, tiny_demo):
    secret = "ct3d-test-secret-4f2a9c1e0b7d"
    env = {**ENV, "WANDB_API_KEY": secret}
    overrides = [*tiny_overrides(tmp_path, tiny_demo), "tracking.wandb.mode=offline"]
    trained = cli("train", *overrides, env=env)
    assert trained.returncode == 0, trained.stderr[-2000:]
    predicted = cli("predict", f"checkpoint={tmp_path / 'runs' / 'run' / 'checkpoints' / 'best.pt'}",
                    f"input={tiny_demo.parent}", f"output.dir={tmp_path / 'runs'}", "output.name=pred", env=env)
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    for proc in (trained, predicted):
        assert secret not in proc.stdout and secret not in proc.stderr
    files = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert len(files) > 10
    for path in files:
        assert secret.encode() not in path.read_bytes(), path
