import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from engine.config import load_config
from engine.workflow import evaluate


@pytest.mark.slow
def test_demo_under_torchrun_two_processes_gloo_cpu(tmp_path):
    """The demo training (configs/default.yaml, fewer epochs) on two ranks."""
    overrides = [f"data.demo.dir={tmp_path / 'demo'}", f"cache.dir={tmp_path / 'cache'}",
                 f"output.dir={tmp_path / 'runs'}", "output.name=ddp", "train.epochs=2", "train.threads=1",
                 "data.val_fraction=0.205"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "engine.run", "train", *overrides], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("ct3d run ") == 1  # the closing summary: rank 0 only
    folder = tmp_path / "runs" / "ddp"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoints", "config.yaml", "metrics.csv", "report.html",
                                                        "report.png", "summary.json", "wandb"]
    assert len(list((folder / "wandb").glob("offline-run-*"))) == 1
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["best.pt", "final.pt", "last.pt"]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["val_volumes"] == 41  # an odd count: the ranks hold unequal shares

    cfg = load_config(ROOT / "configs" / "default.yaml", [*overrides, f"checkpoint={folder / 'checkpoints' / 'best.pt'}",
                                                          "output.name=eval", "tracking.wandb.mode=disabled"],
                      command="evaluate")
    metrics = evaluate(cfg)
    for key in ("auc_macro", "auc_micro", "fbeta_macro", "accuracy"):
        assert metrics[key] == pytest.approx(summary["best"][key], abs=1e-6), key
