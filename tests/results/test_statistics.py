"""Patient-level bootstrap intervals."""

import math

import pytest
import torch

from engine.results.metrics import classification_metrics
from engine.results.statistics import bootstrap_intervals, patient_weights

TRUE_AUC = 0.5 * (1 + math.erf(0.5))  # scores N(0, 1) for negatives, N(1, 1) for positives: Phi(1 / sqrt(2))


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, 2, generator=g) < 0.4).float()
    probs = torch.sigmoid(torch.randn(n, 2, generator=g) + labels)
    return probs, labels, [f"p{i // 2}" for i in range(n)]  # two volumes per patient


def intervals(n: int, seed: int = 0) -> tuple[dict, dict]:
    probs, labels, patients = synthetic(n, seed)
    point = classification_metrics(probs, labels, ["a", "b"], "multilabel")
    return point, bootstrap_intervals(probs, labels, (probs >= 0.5).float(), patients, ["a", "b"])["intervals"]


def test_interval_contains_the_estimate_and_narrows_as_n_grows():
    small_point, small = intervals(100)
    large_point, large = intervals(1600)
    for key in ("auc_macro", "auc/a", "auc/b", "fbeta_macro", "fbeta/a"):
        assert small[key][0] <= small_point[key] <= small[key][1], key
        assert large[key][0] <= large_point[key] <= large[key][1], key
    width = lambda iv: iv[1] - iv[0]  # noqa: E731
    assert width(large["auc_macro"]) < 0.5 * width(small["auc_macro"])  # ~1/4 expected: sqrt(100/1600)
    assert large["auc_macro"][0] <= TRUE_AUC <= large["auc_macro"][1]


def test_unit_weights_give_monais_auc_ties_included():
    from engine.results.statistics import _weighted_auc

    p = torch.tensor([0.1, 0.4, 0.4, 0.4, 0.8, 0.9], dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 0, 1, 1], dtype=torch.float64)
    monai = classification_metrics(p[:, None], y[:, None], ["x"], "binary")["auc/x"]
    assert float(_weighted_auc(p, y, torch.ones(1, 6, dtype=torch.float64))) == pytest.approx(monai)


def test_resampling_keeps_a_patients_volumes_together_and_is_seeded():
    patients = ["a", "a", "b", "c", "c", "c"]
    w = patient_weights(patients, 200, seed=5)
    assert torch.equal(w[:, 0], w[:, 1]) and torch.equal(w[:, 3], w[:, 5])
    assert torch.equal(w.sum(1), (w[:, 0] * 2 + w[:, 2] + w[:, 3] * 3))
    assert torch.equal(w[:, [0, 2, 3]].sum(1), torch.full((200,), 3.0, dtype=w.dtype))  # 3 patients drawn
    assert torch.equal(w, patient_weights(patients, 200, seed=5))
