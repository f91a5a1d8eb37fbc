"""Temperature scaling, expected calibration error and tuned thresholds."""

import pytest
import torch

from engine.results.calibration import expected_calibration_error, fit_temperature, reliability, tune_thresholds
from engine.results.metrics import classification_metrics


def over_confident(n: int = 4000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from sigmoid(z); the model says 3z: right ranking, far too sure."""
    g = torch.Generator().manual_seed(seed)
    z = 1.5 * torch.randn(n, 3, generator=g)
    labels = (torch.rand(n, 3, generator=g) < torch.sigmoid(z)).float()
    return 3 * z, labels


def test_temperature_scaling_lowers_ece_on_an_over_confident_model():
    logits, labels = over_confident()
    temperature = fit_temperature(logits, labels, "multilabel")
    assert temperature == pytest.approx([3.0] * 3, rel=0.15)
    before = expected_calibration_error(torch.sigmoid(logits), labels)
    after = expected_calibration_error(torch.sigmoid(logits / torch.tensor(temperature)), labels)
    assert all(a < 0.5 * b for a, b in zip(after, before)), (before, after)


def test_one_class_label_keeps_temperature_one_and_multiclass_shares_one():
    logits, labels = over_confident(500)
    labels[:, 1] = 0
    assert fit_temperature(logits, labels, "multilabel")[1] == 1.0
    one_hot = torch.nn.functional.one_hot(labels[:, 0].long(), 3).float()
    assert len(fit_temperature(logits, one_hot, "multiclass")) == 1


def test_reliability_bins_known_values():
    probs = torch.tensor([[0.05], [0.15], [0.15], [0.95]])
    labels = torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    table = reliability(probs, labels, bins=10)
    assert table[0, 1].tolist() == pytest.approx([0.15, 0.5, 2.0])
    assert table[0, 5, 2] == 0
    # |0.05 - 0| * 1 + |0.15 - 0.5| * 2 + |0.95 - 1| * 1, over 4 volumes
    assert expected_calibration_error(probs, labels, 10)[0] == pytest.approx((0.05 + 0.7 + 0.05) / 4)


@pytest.mark.parametrize("rule", ["fbeta", "youden"])
def test_tuned_thresholds_reach_at_least_the_fixed_thresholds_score(rule):
    logits, labels = over_confident(800, seed=1)
    probs = torch.sigmoid(logits / 3 - 1.0)  # shifted: 0.5 is a poor threshold
    tuned = tune_thresholds(probs, labels, rule, beta=2.0)
    names = ["a", "b", "c"]
    fixed_scores = classification_metrics(probs, labels, names, "multilabel", 0.5, beta=2.0)
    tuned_scores = classification_metrics(probs, labels, names, "multilabel", tuned, beta=2.0)
    for name in names:
        assert tuned_scores[f"fbeta/{name}"] >= fixed_scores[f"fbeta/{name}"] - 1e-9 or rule == "youden"
    if rule == "fbeta":
        assert tuned_scores["fbeta_macro"] > fixed_scores["fbeta_macro"] + 0.05
    else:  # Youden's J: sensitivity + specificity - 1 at the tuned threshold beats the fixed one
        def j(t):
            d = (probs >= torch.as_tensor(t)).float()
            tpr = (d * labels).sum(0) / labels.sum(0)
            tnr = ((1 - d) * (1 - labels)).sum(0) / (1 - labels).sum(0)
            return tpr + tnr - 1
        assert (j(tuned) >= j(0.5) - 1e-9).all()
    assert tune_thresholds(probs, labels, "fixed", fixed=0.3) == [0.3] * 3


def test_perfectly_separated_label_keeps_temperature_one():
    """With no overlap the likelihood grows without bound as T falls: no temperature is fitted there."""
    logits = torch.tensor([[2.0, 2.0], [1.0, -1.0], [-1.0, 1.0], [-3.0, -2.0]])
    labels = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])  # label 0 separable, label 1 not
    temperature = fit_temperature(logits, labels, "multilabel")
    assert temperature[0] == 1.0 and temperature[1] != 1.0


@pytest.mark.parametrize("rule", ["fbeta", "youden"])
def test_tuned_threshold_is_the_best_candidate_by_brute_force(rule):
    """Every distinct probability tried as a threshold, scored by sklearn (F-beta at beta 2; Youden's J as
    recall + specificity - 1): the tuned threshold is a candidate and scores the best any candidate does."""
    from sklearn.metrics import fbeta_score, recall_score

    logits, labels = over_confident(300, seed=4)
    probs = torch.sigmoid(logits / 3 - 0.7)
    probs[:, 1] = 1 - probs[:, 1]  # one label ranked backwards: its best threshold sits low
    labels[:, 2] = (torch.rand(300, generator=torch.Generator().manual_seed(5)) < 0.1).float()  # rare label

    def score(p, y, t):
        d = (p >= t).astype(int)
        if rule == "fbeta":
            return fbeta_score(y, d, beta=2.0, zero_division=0)
        return recall_score(y, d, zero_division=0) + recall_score(1 - y, 1 - d, zero_division=0) - 1

    tuned = tune_thresholds(probs, labels, rule, beta=2.0)
    for c in range(3):
        p, y = probs[:, c].numpy(), labels[:, c].numpy().astype(int)
        best = max(score(p, y, t) for t in set(p.tolist()))
        assert float(tuned[c]) in set(p.tolist())
        assert score(p, y, tuned[c]) == pytest.approx(best, abs=1e-12), (c, tuned[c])
