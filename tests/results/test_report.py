"""The end-of-run report."""

import json

import torch

from engine.config.loading import load_config
from engine.training.workflow import train
from helpers import tiny_overrides


def test_report_has_every_panel_filled(tmp_path, tiny_demo):
    folder = train(load_config(None, tiny_overrides(tmp_path, tiny_demo, "train.epochs=2", "metrics.calibrate=true",
                                                    "report.panels=true")))
    page = (folder / "report.html").read_text()
    assert page.count('alt="panel ') == 7  # the seventh: reliability diagrams
    assert "<h2>Inputs as the model saw them</h2>" in page
    looked = page.count("<h2>Where the model looked: ")  # a label with a true or false positive gets a panel
    assert looked >= 1 and page.count('src="data:image/png;base64,') == 7 + looked + 1
    assert "Best and final validation" in page and "auc_macro" in page and "spatial_size" in page
    assert (folder / "report.png").stat().st_size > 20_000

    summary = json.loads((folder / "summary.json").read_text())
    low, high = summary["bootstrap"]["intervals"]["auc_macro"]
    assert low <= summary["best"]["auc_macro"] <= high
    assert f"{low:.4f} to {high:.4f}" in page and "Best epoch with 95% intervals" in page
    defined = [n for n in summary["labels"] if summary["best"][f"auc/{n}"] is not None]  # NaN is null in JSON
    assert summary["auc_macro_labels"] == len(defined) == summary["best"]["auc_labels"]
    assert f"Macro figures average {len(defined)} of 4 labels (both classes and at least 1 positive patients" in page
    assert set(summary["auc_left_out"]) == set(summary["labels"]) - set(defined)
    fitted = summary["calibration"]
    assert set(fitted["scale"]) == set(fitted["intercept"]) == set(summary["labels"]) and "ECE" in page
    assert "intercept" in page and "Platt scaling" in page
    phases = summary["phases"]  # each phase timed, the closing's parts too, and they add up
    assert {"statistics", "report panels", "checkpoints", "saliency", "report"} <= set(phases["closing_parts"])
    start, training, closing, end = phases["clock"]
    assert start < training < closing < end and abs(phases["closing"] - (end - closing)) < 0.01
    assert sum(phases["closing_parts"].values()) <= phases["closing"] + 0.01

    # report.panels=false (the tests' tiny runs): the run resumed for a third epoch writes the tables and the
    # saliency sections without the panels, and the earlier report.png (not this run's) is gone
    again = train(load_config(None, tiny_overrides(tmp_path, tiny_demo, "train.epochs=3", "metrics.calibrate=true",
                                                   "train.resume=auto")))
    page = (again / "report.html").read_text()
    assert again == folder and json.loads((folder / "summary.json").read_text())["final"]["epoch"] == 3
    assert 'alt="panel ' not in page and "Best epoch with 95% intervals" in page and "Platt scaling" in page
    assert page.count("<h2>Where the model looked: ") >= 1 and not (folder / "report.png").exists()
    assert "report panels" not in json.loads((folder / "summary.json").read_text())["phases"]["closing_parts"]


def test_saliency_panels_follow_the_report_settings():
    from engine.config.schema import ModelConfig
    from engine.results.saliency import report_panels
    from engine.training.models import create_model

    config = ModelConfig(name="resnet3d", variant="10", widen_factor=0.25)
    net = create_model(config, 2, [16, 16, 16])
    dataset = [{"image": torch.randn(1, 16, 16, 16)} for _ in range(4)]
    probs, labels = torch.tensor([[0.9, 0.8], [0.7, 0.6], [0.6, 0.9], [0.2, 0.1]]), torch.tensor(
        [[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    titles = [t for t, _ in report_panels(net, config, dataset, ["a", "b"], probs, labels, [0.5, 0.5])]
    assert titles == ["Where the model looked: a", "Where the model looked: b", "Inputs as the model saw them"]
    off = report_panels(net, config, dataset, ["a", "b"], probs, labels, [0.5, 0.5], positives=0, negatives=0)
    assert [t for t, _ in off] == ["Inputs as the model saw them"]


def test_roc_curve_known_points():
    from engine.results.report import roc_curve

    fpr, tpr = roc_curve(torch.tensor([0.9, 0.8, 0.8, 0.1]), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert fpr == [0.0, 0.0, 0.5, 1.0] and tpr == [0.0, 0.5, 1.0, 1.0]
