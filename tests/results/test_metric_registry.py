"""The metric registry: a metric added with one `register` call is computed on every validation, written to
metrics.csv, shown in the report and the closing table, and can be the key metric (its direction picks the
best epoch)."""

import csv
import json

import pytest
import torch

from engine.config import metric_registry
from engine.config.loading import load_config
from engine.config.metric_registry import Metric, register, unregister
from engine.results.metrics import classification_metrics
from engine.training.outputs import summary_table
from engine.training.workflow import train
from engine.utils.errors import CT3DError
from helpers import tiny_overrides


def wrong_cells(probs, labels, decided) -> float:
    """The toy metric: the share of (volume, label) cells decided wrongly (lower is better)."""
    return float((decided != labels).float().mean())


@pytest.fixture
def toy():
    register(Metric("wrong_cells", direction="min", thresholds=True, compute=wrong_cells))
    yield
    unregister("wrong_cells")


def test_a_registered_metric_is_computed_beside_the_built_ins(toy):
    probs = torch.tensor([[0.9, 0.2], [0.4, 0.7], [0.6, 0.1]])
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    out = classification_metrics(probs, labels, ["a", "b"], "multilabel", 0.5)
    assert out["wrong_cells"] == pytest.approx(2 / 6)  # (0.4 -> 0 on a 1) and (0.6 -> 1 on a 0): 2 of 6 cells
    assert out["accuracy"] == pytest.approx(1 - 2 / 6)


def test_a_toy_metric_reaches_metrics_csv_the_report_and_can_be_the_key(tmp_path, tiny_demo, toy):
    cfg = load_config(None, tiny_overrides(tmp_path, tiny_demo, "metrics.key=wrong_cells", "train.epochs=3"))
    assert cfg.metrics.mode == "min"  # mode auto: the registered direction
    folder = train(cfg)
    with open(folder / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert "wrong_cells" in rows[0] and len(rows) == 3
    for row in rows:  # micro accuracy counts right cells: the toy is its complement
        assert float(row["wrong_cells"]) == pytest.approx(1 - float(row["accuracy"]), abs=1e-5)
    summary = json.loads((folder / "summary.json").read_text())
    lowest = min(rows, key=lambda r: (float(r["wrong_cells"]), int(r["epoch"])))
    assert summary["key_metric"] == "wrong_cells" and summary["best_epoch"] == int(lowest["epoch"])
    assert ">wrong_cells<" in (folder / "report.html").read_text()
    assert any(line.startswith("wrong_cells ") for line in summary_table(summary, summary["labels"]).splitlines())


def test_an_unregistered_key_is_refused_naming_the_key_and_a_bad_direction_at_once():
    assert "wrong_cells" not in metric_registry.METRICS
    with pytest.raises(CT3DError, match="metrics.key.*wrong_cells.*auc_macro"):
        load_config(None, ["data.demo.enabled=true", "metrics.key=wrong_cells"])
    with pytest.raises(ValueError, match="direction"):
        Metric("x", direction="up")
    with pytest.raises(CT3DError, match="metrics.key.*auc_labels"):  # a count of labels, not a figure to maximise
        load_config(None, ["data.demo.enabled=true", "metrics.key=auc_labels"])
