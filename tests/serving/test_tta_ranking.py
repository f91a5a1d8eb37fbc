"""Test-time flips in evaluate: AUC ranks the mean of the uncalibrated views, decisions the mean of the calibrated
ones (each view calibrated first, as predict does). A calibration that flattens a label to its base rate must not
change that label's AUC; expected values by hand and from sklearn."""

from types import SimpleNamespace

import pytest
import torch
from sklearn.metrics import roc_auc_score

from engine.serving.inference import with_tta
from engine.training.handlers import ValidationMetrics


class Sum(torch.nn.Module):
    """Two outputs of a (B, 1, x, y, z) batch that its flips change: weighted sums over the voxels."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3)))

    def forward(self, x):
        return torch.einsum("bcxyz,kxyz->bk", x, self.w)


def test_flips_give_the_raw_mean_to_rank_and_the_calibrated_mean_to_decide():
    net, x = Sum(), torch.randn(6, 1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    calibration = {"scale": [0.0, 2.0], "bias": [-1.0, 0.5]}  # the first label flattened to its base rate
    with torch.no_grad():
        out = with_tta(lambda v, n: n(v), "multilabel", "flips", calibration, ranked=True)(x, net)
        plain = with_tta(lambda v, n: n(v), "multilabel", "flips", calibration)(x, net)  # predict: decided ones
        views = [x, x.flip(2), x.flip(3), x.flip(4)]
        raw = torch.stack([torch.sigmoid(net(v)) for v in views]).mean(0)
        calibrated = torch.stack([torch.sigmoid(net(v) * torch.tensor([0.0, 2.0]) + torch.tensor([-1.0, 0.5]))
                                  for v in views]).mean(0)
    assert torch.allclose(torch.sigmoid(out[:, :2]), raw, atol=1e-5)
    assert torch.allclose(torch.sigmoid(out[:, 2:]), calibrated, atol=1e-5)
    assert torch.allclose(torch.sigmoid(plain), calibrated, atol=1e-5)


def test_validation_ranks_the_first_half_and_decides_on_the_second():
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(40, 2, generator=g) < 0.4).float()
    labels[0], labels[1] = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0])
    raw = torch.randn(40, 2, generator=g) + 1.5 * labels
    decided = torch.logit(torch.full((40, 2), 0.3))  # a flattened calibration: one probability for every volume
    decided[:, 1] = raw[:, 1] * 0.5
    metrics = ValidationMetrics(["a", "b"], "multilabel", torch.nn.BCEWithLogitsLoss(), 0.5, 1.0, fit=False,
                                thresholds=[0.25, 0.5], paired=True)
    engine = SimpleNamespace(state=SimpleNamespace(output={"pred": torch.cat([raw, decided], 1), "label": labels},
                                                   metrics={}))
    metrics.reset()
    metrics.update(engine)
    metrics.compute(engine)
    for j, name in enumerate("ab"):
        assert engine.state.metrics[f"auc/{name}"] == pytest.approx(roc_auc_score(labels[:, j], raw[:, j]), abs=1e-6)
    # decisions from the second half: 0.3 >= 0.25 for every volume of "a": recall 1, precision its positive rate
    assert torch.allclose(metrics.last_probs[:, 0], torch.full((40,), 0.3), atol=1e-6)
    assert torch.equal(metrics.last_logits, raw)
    precision_a = float(labels[:, 0].mean())
    tp_b = float(((torch.sigmoid(decided[:, 1]) >= 0.5) & (labels[:, 1] == 1)).sum())
    fp_b = float(((torch.sigmoid(decided[:, 1]) >= 0.5) & (labels[:, 1] == 0)).sum())
    fn_b = float(((torch.sigmoid(decided[:, 1]) < 0.5) & (labels[:, 1] == 1)).sum())
    f1_a = 2 * precision_a / (precision_a + 1)
    f1_b = 2 * tp_b / (2 * tp_b + fp_b + fn_b)
    assert engine.state.metrics["fbeta/a"] == pytest.approx(f1_a, abs=1e-6)
    assert engine.state.metrics["fbeta/b"] == pytest.approx(f1_b, abs=1e-6)
