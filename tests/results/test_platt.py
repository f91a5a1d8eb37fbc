"""Platt scaling (scale and intercept per label) against scipy's optimiser, the pos_weight simulation it must
undo, a multiclass temperature against scipy, and calibrations read from older checkpoints."""

import numpy as np
import pytest
import torch
from scipy.optimize import minimize, minimize_scalar

from engine.results.calibration import (
    apply_calibration,
    calibration_from,
    expected_calibration_error,
    fit_calibration,
    fit_platt,
    fit_temperature,
)


def shifted(n: int, prevalence: float, weight: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A model trained with pos_weight `weight`: labels ~ sigmoid(z) with z set for `prevalence`, logits
    z + log(weight) (the shift pos_weight gives every logit), ranking intact."""
    g = torch.Generator().manual_seed(seed)
    z = 1.2 * torch.randn(n, 1, generator=g) + float(np.log(prevalence / (1 - prevalence))) - 0.5
    labels = (torch.rand(n, 1, generator=g) < torch.sigmoid(z)).float()
    return z + float(np.log(weight)), labels


def platt_by_scipy(z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Platt's fit from its definition: smoothed targets, NLL of sigmoid(a z + b), minimised by BFGS."""
    pos, neg = y.sum(), (1 - y).sum()
    t = np.where(y > 0.5, (pos + 1) / (pos + 2), 1 / (neg + 2))

    def nll(ab):
        s = ab[0] * z + ab[1]
        return float(np.sum(np.logaddexp(0, s) - t * s))

    result = minimize(nll, x0=[1.0, 0.0], method="BFGS", options={"gtol": 1e-10})
    return float(result.x[0]), float(result.x[1])


def test_platt_matches_scipy_on_each_label():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(600, 3, generator=g) * torch.tensor([1.0, 3.0, 0.5]) + torch.tensor([0.0, 2.0, -1.0])
    labels = (torch.rand(600, 3, generator=g) < torch.sigmoid(0.7 * logits - 1.0)).float()
    scale, bias = fit_platt(logits, labels)
    for c in range(3):
        a, b = platt_by_scipy(logits[:, c].double().numpy(), labels[:, c].double().numpy())
        assert scale[c] == pytest.approx(a, abs=1e-5) and bias[c] == pytest.approx(b, abs=1e-5)


@pytest.mark.parametrize("prevalence, weight", [(0.066, 10.0), (0.18, 6.0)])
def test_platt_undoes_pos_weight_where_a_temperature_cannot(prevalence, weight):
    """Fitted on 4,000 validation volumes, measured on 20,000 fresh ones (so the ECE estimate's own noise stays
    well below the target): ECE <= 0.02 with Platt; a temperature alone (no intercept) leaves the shift in."""
    logits, labels = shifted(4000, prevalence, weight, seed=0)
    fresh_logits, fresh_labels = shifted(20000, prevalence, weight, seed=1)
    platt = fit_calibration(logits, labels, "multilabel")
    after = expected_calibration_error(torch.sigmoid(apply_calibration(fresh_logits, platt)), fresh_labels)[0]
    temperature = fit_temperature(logits, labels, "multilabel")
    with_t = expected_calibration_error(torch.sigmoid(fresh_logits / torch.tensor(temperature)), fresh_labels)[0]
    assert after <= 0.02 and with_t > 0.1, (after, with_t)


def test_one_class_label_is_left_as_it_is_and_separated_classes_stay_finite():
    logits = torch.tensor([[-2.0, 1.0], [-1.0, 2.0], [1.0, 3.0], [2.0, 4.0]])
    labels = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    scale, bias = fit_platt(logits, labels)
    assert (scale[1], bias[1]) == (1.0, 0.0)  # one class: nothing to fit
    a, b = platt_by_scipy(logits[:, 0].double().numpy(), labels[:, 0].double().numpy())
    assert np.isfinite(scale[0]) and scale[0] == pytest.approx(a, abs=1e-5) and bias[0] == pytest.approx(b, abs=1e-5)


def test_multiclass_temperature_is_the_cross_entropy_minimum():
    g = torch.Generator().manual_seed(5)
    logits = 3 * torch.randn(800, 4, generator=g)
    target = torch.multinomial(torch.softmax(logits / 3, dim=1), 1, generator=g)[:, 0]  # the truth is logits / 3
    one_hot = torch.nn.functional.one_hot(target, 4).float()
    (t,) = fit_temperature(logits, one_hot, "multiclass")
    x, k = logits.double().numpy(), target.numpy()

    def nll(temp):
        s = x / temp
        return float(np.mean(np.log(np.exp(s - s.max(1, keepdims=True)).sum(1)) + s.max(1) - s[np.arange(len(k)), k]))

    best = minimize_scalar(nll, bounds=(0.05, 20), method="bounded", options={"xatol": 1e-6}).x
    assert t == pytest.approx(best, rel=0.02) and t == pytest.approx(3.0, rel=0.15)
    assert fit_calibration(logits, one_hot, "multiclass") == {"scale": [1 / t], "bias": None}


def test_calibration_read_from_a_checkpoint_old_or_new():
    logits = torch.tensor([[2.0, -1.0]])
    old = calibration_from({"thresholds": [0.5, 0.5], "temperature": [2.0, 4.0]})
    assert apply_calibration(logits, old).tolist() == [[1.0, -0.25]]
    new = calibration_from({"thresholds": [0.5, 0.5], "scale": [0.5, 2.0], "bias": [1.0, -1.0]})
    assert apply_calibration(logits, new).tolist() == [[2.0, -3.0]]
    assert calibration_from({"thresholds": [0.5]}) is None and apply_calibration(logits, None) is logits
