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
