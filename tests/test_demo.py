import csv
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from engine.demo import LABELS, generate, phantom
from helpers import ROOT, TEXT


def test_phantom_is_deterministic_and_in_hounsfield_units():
    a = phantom(np.random.default_rng(5), (32, 32, 32), (1, 1, 1, 1))
    b = phantom(np.random.default_rng(5), (32, 32, 32), (1, 1, 1, 1))
    assert np.array_equal(a, b) and a.dtype == np.int16
    assert a[0, 0, 0] < -900  # air outside the body
    assert (a > 500).any()  # spine


def test_each_finding_changes_the_image():
    normal = phantom(np.random.default_rng(0), (32, 32, 32), (0, 0, 0, 0))
    for i in range(len(LABELS)):
        findings = [0] * len(LABELS)
        findings[i] = 1
        sick = phantom(np.random.default_rng(0), (32, 32, 32), tuple(findings))
        assert np.abs(sick.astype(int) - normal).mean() > 1, LABELS[i]


def test_generated_set_prevalence_and_reuse(tmp_path):
    csv_path = generate(tmp_path, num_volumes=200, shape=(8, 8, 8), seed=0)
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 200 and list(rows[0]) == ["VolumeName", *LABELS]
    for label in LABELS:
        assert 0.2 <= sum(int(r[label]) for r in rows) / 200 <= 0.5, label
    image = nib.load(str(tmp_path / rows[0]["VolumeName"]))
    assert image.shape == (8, 8, 8) and image.header.get_zooms() == (6.0, 6.0, 5.0)
    mtime = csv_path.stat().st_mtime_ns
    assert generate(tmp_path, num_volumes=200, shape=(8, 8, 8), seed=0) == csv_path
    assert csv_path.stat().st_mtime_ns == mtime  # reused, not rewritten
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.slow
def test_demo_command_trains_to_target_auc(tmp_path):
    """The README's demo: `python -m engine.run` with no arguments, in a fresh folder."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "engine.run"], cwd=tmp_path, capture_output=True, **TEXT,
                          timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["best"]["auc_macro"] >= 0.90, summary["best"]
    for name in ("config.yaml", "metrics.csv", "checkpoints/best.pt", "checkpoints/last.pt", "checkpoints/final.pt"):
        assert (runs[0] / name).is_file()
    assert "auc_macro" in proc.stdout  # the closing summary table
    assert "nvimgcodec" not in (proc.stdout + proc.stderr).lower()  # no warning a user cannot act on
    page = (runs[0] / "report.html").read_text()
    assert page.count('alt="panel ') == 7 and "<h2>Inputs as the model saw them</h2>" in page  # 7: reliability
    low, high = summary["bootstrap"]["intervals"]["auc_macro"]
    assert low < summary["best"]["auc_macro"] < high and f"{low:.4f} to {high:.4f}" in page
    assert "Best epoch with 95% intervals" in page and "Decisions and calibration" in page
    assert all(f"<h2>Where the model looked: {label}</h2>" in page for label in LABELS)
    assert list((runs[0] / "wandb").glob("offline-run-*/*.wandb"))
    print(f"demo: {summary['wall_seconds']} s, best macro AUC {summary['best']['auc_macro']:.4f}")

    best = runs[0] / "checkpoints" / "best.pt"
    proc = subprocess.run([sys.executable, "-m", "engine.run", "evaluate", f"checkpoint={best}", "output.name=eval"],
                          cwd=tmp_path, capture_output=True, **TEXT, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads((tmp_path / "runs" / "eval" / "evaluation.json").read_text())
    assert evaluated["data"] == "the run's own validation split"
    evaluation = evaluated["metrics"]
    for key in ("auc_macro", "auc_micro", "fbeta_macro", "accuracy"):
        assert evaluation[key] == pytest.approx(summary["best"][key], abs=1e-4), key
