"""Platt scaling cannot reverse a ranking (issue 40): a label the model ranks backwards keeps its AUC through the
validation handler with calibration on, and its fitted slope is 0 with the base rate's intercept."""

import math

import torch
from ignite.engine import Engine
from sklearn.metrics import roc_auc_score

from engine.results.calibration import fit_platt
from engine.training.handlers import ValidationMetrics


def backwards(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two labels: the first ranked well, the second backwards (positives get lower logits)."""
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, 2, generator=generator) < 0.3).float()
    noise = torch.randn(n, 2, generator=generator)
    logits = torch.stack([2 * labels[:, 0] + noise[:, 0], -2 * labels[:, 1] + noise[:, 1]], 1)
    return logits, labels


def test_a_backwards_label_keeps_its_auc_with_calibration_on_through_the_validation_handler():
    logits, labels = backwards()
    expected = [roc_auc_score(labels[:, j].numpy(), logits[:, j].numpy()) for j in range(2)]
    assert expected[1] < 0.2  # the model ranks the second label backwards
    for calibrate in (False, True):
        handler = ValidationMetrics(["good", "reversed"], "multilabel", torch.nn.BCEWithLogitsLoss(), 0.5, 1.0,
                                    "fixed", calibrate, 10)
        engine = Engine(lambda e, b: {"pred": b[0], "label": b[1]})
        handler.attach(engine)
        engine.run([(logits[i:i + 50], labels[i:i + 50]) for i in range(0, 200, 50)], max_epochs=1)
        got = engine.state.metrics
        assert abs(got["auc/good"] - expected[0]) < 1e-6 and abs(got["auc/reversed"] - expected[1]) < 1e-6
        assert abs(got["auc_macro"] - sum(expected) / 2) < 1e-6


def test_the_slope_is_never_negative_and_a_backwards_label_gets_its_base_rate():
    logits, labels = backwards()
    scale, bias = fit_platt(logits, labels)
    assert scale[0] > 0 and scale[1] == 0.0
    pos, n = float(labels[:, 1].sum()), labels.shape[0]
    mean = (pos * (pos + 1) / (pos + 2) + (n - pos) / (n - pos + 2)) / n  # Platt's targets' mean: the a = 0 optimum
    assert abs(bias[1] - math.log(mean / (1 - mean))) < 1e-9


def test_ece_macro_averages_only_labels_with_both_classes():
    """A label with one class has nothing to calibrate against: its ECE would pull the macro figure (issue 40).
    The expected value is the mean of the two-class labels' ECE, each written out here over equal-width bins."""
    probs = torch.tensor([[0.85, 0.22, 0.65], [0.75, 0.33, 0.55], [0.25, 0.12, 0.95], [0.15, 0.44, 0.85]])
    labels = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])  # third: one class

    def ece(p, y, bins=10):
        total = 0.0
        for b in range(bins):
            inside = [(pi, yi) for pi, yi in zip(p, y) if b / bins <= pi < (b + 1) / bins]  # no value on an edge
            if inside:
                total += len(inside) * abs(sum(pi for pi, _ in inside) / len(inside) - sum(yi for _, yi in inside)
                                           / len(inside))
        return total / len(p)

    expected = (ece(probs[:, 0].tolist(), labels[:, 0].tolist()) + ece(probs[:, 1].tolist(), labels[:, 1].tolist())) / 2
    handler = ValidationMetrics(["a", "b", "c"], "multilabel", torch.nn.BCEWithLogitsLoss(), 0.5, 1.0, "fixed",
                                False, 10)
    engine = Engine(lambda e, b: {"pred": torch.logit(b[0]), "label": b[1]})
    handler.attach(engine)
    engine.run([(probs, labels)], max_epochs=1)
    assert abs(engine.state.metrics["ece_macro"] - expected) < 1e-6
