import csv
import json

import pytest
import torch

from conftest import tiny_overrides
from engine.checkpoint import load_checkpoint
from engine.config import load_config
from engine.demo import LABELS
from engine.errors import CT3DError
from engine.workflow import train


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
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["labels"] == list(LABELS) and summary["best_epoch"] == 1
    assert summary["train_volumes"] + summary["val_volumes"] == 24
    state = load_checkpoint(folder / "checkpoints" / "final.pt")
    assert state["labels"] == list(LABELS) and state["trainer"]["epoch"] == 1
    assert set(state) >= {"model", "optimizer", "scheduler", "model_spec", "preprocessing"}


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
    multiclass.write_text("\n".join(["VolumeName,grade"] + [f"{l.split(',')[0]},{i % 3}" for i, l in enumerate(lines[1:])]))
    for name in [l.split(",")[0] for l in lines[1:]]:
        (tmp_path / name).symlink_to(tiny_demo.parent / name)
    folder = train(load_config(None, tiny_overrides(tmp_path, multiclass, "data.task=multiclass", "data.num_classes=3")))
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


def test_report_has_every_panel_filled(tmp_path, tiny_demo):
    folder = train(load_config(None, tiny_overrides(tmp_path, tiny_demo, "train.epochs=2")))
    page = (folder / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 6
    assert "Best and final validation" in page and "auc_macro" in page and "spatial_size" in page
    assert (folder / "report.png").stat().st_size > 20_000


def test_roc_curve_known_points():
    from engine.report import roc_curve

    fpr, tpr = roc_curve(torch.tensor([0.9, 0.8, 0.8, 0.1]), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert fpr == [0.0, 0.0, 0.5, 1.0] and tpr == [0.0, 0.5, 1.0, 1.0]
