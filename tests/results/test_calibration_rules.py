"""Calibration, thresholds and decisions at their edges, against sklearn and the definitions: every candidate
threshold's score, ECE per output and bin count, the calibration a checkpoint holds, dtypes kept, temperatures
below 1 and ties, one positive, the decision rule p >= threshold."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import fbeta_score, recall_score

from engine.results.calibration import (
    _candidate_scores,
    apply_calibration,
    calibration_from,
    expected_calibration_error,
    fit_platt,
    fit_temperature,
    reliability,
    tune_thresholds,
)
from engine.results.metrics import classification_metrics, decisions, macro_labels


@pytest.mark.parametrize("n, positives", [(40, 12), (2, 1), (3, 1)])
def test_every_candidate_scores_what_sklearn_gives_its_decisions(n, positives):
    rng = np.random.default_rng(n)
    y = np.zeros(n)
    y[:positives] = 1
    p = np.round(rng.random(n), 1)  # ties: one candidate per distinct probability
    for rule in ("fbeta", "youden"):
        thresholds, scores = _candidate_scores(torch.tensor(p), torch.tensor(y), rule, 2.0)
        assert sorted(thresholds.tolist(), reverse=True) == thresholds.tolist() == sorted(set(p), reverse=True)
        for t, score in zip(thresholds.tolist(), scores.tolist()):
            d = (p >= t).astype(int)
            expected = fbeta_score(y, d, beta=2.0, zero_division=0) if rule == "fbeta" else \
                recall_score(y, d, zero_division=0) + recall_score(1 - y, 1 - d, zero_division=0) - 1
            assert score == pytest.approx(expected, abs=1e-12), (rule, t)


def test_one_class_labels_keep_the_fixed_threshold_and_the_rest_are_tuned():
    probs = torch.tensor([[0.2, 0.9, 0.3], [0.4, 0.8, 0.6], [0.7, 0.1, 0.8]])
    labels = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    assert tune_thresholds(probs, labels, "fbeta") == [0.5, 0.5, pytest.approx(0.6)]
    assert tune_thresholds(probs, labels, "fixed") == [0.5] * 3


def test_ece_per_output_with_its_own_bins():
    probs = torch.tensor([[0.05, 0.9], [0.3, 0.9], [0.35, 0.1], [0.99, 0.5]])
    labels = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    # 5 bins of 0.2: output 0 has bins {0: [0.05], 1: [0.3, 0.35], 4: [0.99]}; output 1 {0: [0.1], 2: [0.5], 4: two}
    expected = [(0.05 + 2 * abs(0.325 - 0.5) + 0.01) / 4, (0.1 + 0.5 + 2 * abs(0.9 - 0.5)) / 4]
    assert expected_calibration_error(probs, labels, bins=5) == pytest.approx(expected)
    assert expected_calibration_error(probs[:1], labels[:1], bins=5) == pytest.approx([0.05, 0.1])
    table = reliability(torch.tensor([[1.0], [0.0], [0.95]]), torch.tensor([[1.0], [0.0], [1.0]]), bins=10)
    assert table[0, 9, 2] == 2 and table[0, 0, 2] == 1  # 1.0 falls in the last bin, 0 in the first


def test_a_calibration_as_a_checkpoint_holds_it_and_applied_in_the_logits_dtype():
    assert calibration_from(None) is None and calibration_from({}) is None
    assert calibration_from({"scale": [2.0], "bias": None}) == {"scale": [2.0], "bias": None}
    assert calibration_from({"scale": [2.0, 1.0], "bias": [0.5, 0.0]}) == {"scale": [2.0, 1.0], "bias": [0.5, 0.0]}
    assert calibration_from({"temperature": [2.0, 4.0]}) == {"scale": [0.5, 0.25], "bias": None}
    logits = torch.tensor([[1.0, -2.0]], dtype=torch.float16)
    out = apply_calibration(logits, {"scale": [2.0, 0.5], "bias": [0.25, 1.0]})
    assert out.dtype == torch.float16 and out.tolist() == [[2.25, 0.0]]
    assert apply_calibration(logits, None) is logits


def test_an_under_confident_model_gets_a_temperature_below_one_and_a_tie_is_not_separation():
    g = torch.Generator().manual_seed(0)
    z = 2 * torch.randn(4000, 1, generator=g)
    labels = (torch.rand(4000, 1, generator=g) < torch.sigmoid(z)).float()
    (t,) = fit_temperature(z / 2.5, labels, "multilabel")  # the model says z / 2.5: T = 0.4 undoes it
    assert t == pytest.approx(0.4, rel=0.1)
    tied = torch.tensor([[0.0], [1.0], [1.0], [2.0]])  # highest negative == lowest positive: classes overlap
    assert fit_temperature(tied, torch.tensor([[0.0], [0.0], [1.0], [1.0]]), "multilabel") != [1.0]
    right = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    assert fit_temperature(right, torch.eye(3), "multiclass") == [1.0]  # every arg-max right: separated
    wrong = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 1.0, 0.0]])
    assert fit_temperature(wrong, torch.eye(3), "multiclass") != [1.0]


def test_a_label_with_one_positive_or_one_negative_is_fitted():
    from test_platt import platt_by_scipy

    logits = torch.tensor([[-2.0, 2.0], [-1.0, 1.5], [0.5, -0.5], [1.0, 1.0], [-0.3, 0.2]])
    labels = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # one positive, one negative
    scale, bias = fit_platt(logits, labels)
    for c in range(2):
        a, b = platt_by_scipy(logits[:, c].double().numpy(), labels[:, c].double().numpy())
        assert (scale[c], bias[c]) == (pytest.approx(a, abs=1e-5), pytest.approx(b, abs=1e-5))
    assert fit_platt(logits, torch.zeros_like(labels)) == ([1.0, 1.0], [0.0, 0.0])  # no positive: nothing to fit


def test_decisions_at_the_threshold_multiclass_arg_max_and_the_macro_set():
    probs = torch.tensor([[0.5, 0.2], [0.49, 0.7]])
    assert decisions(probs, "multilabel", [0.5, 0.7]).tolist() == [[1.0, 0.0], [0.0, 1.0]]  # p >= t decides
    three = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    assert decisions(three, "multiclass", 0.5).tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    assert macro_labels(torch.zeros(0, 3)).tolist() == [False] * 3 and macro_labels(torch.zeros(0, 3)).dtype == \
        torch.bool
    from engine.results.metrics import as_logits

    assert torch.isfinite(as_logits(torch.tensor([[0.0, 1.0]]), "multilabel")).all()  # a certain member stays finite
    assert macro_labels(torch.tensor([[0.0, 1.0], [1.0, 1.0]])).dtype == torch.bool


def test_given_decisions_are_scored_as_given_and_multiclass_accuracy_is_top1():
    from sklearn.metrics import f1_score, precision_score

    rng = np.random.default_rng(3)
    labels = (rng.random((30, 2)) < 0.4).astype(float)
    probs = rng.random((30, 2))
    decided = (rng.random((30, 2)) < 0.5).astype(float)  # not a threshold of probs
    out = classification_metrics(torch.tensor(probs), torch.tensor(labels), ["a", "b"], "multilabel",
                                 decided=torch.tensor(decided))
    for c, name in enumerate("ab"):
        assert out[f"fbeta/{name}"] == pytest.approx(f1_score(labels[:, c], decided[:, c]))
    assert out["precision"] == pytest.approx(precision_score(labels.ravel(), decided.ravel()))
    assert out["recall"] == pytest.approx(recall_score(labels.ravel(), decided.ravel()))
    assert out["specificity"] == pytest.approx(recall_score(1 - labels.ravel(), 1 - decided.ravel()))
    assert out["accuracy"] == pytest.approx((labels == decided).mean())
    one_hot = np.eye(3)[[0, 1, 2, 1, 0]]
    scores = np.array([[0.4, 0.35, 0.25], [0.2, 0.5, 0.3], [0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    multi = classification_metrics(torch.tensor(scores), torch.tensor(one_hot), ["x", "y", "z"], "multiclass")
    assert multi["accuracy"] == pytest.approx(3 / 5) and not math.isnan(multi["auc_macro"])
    top1 = np.eye(3)[scores.argmax(1)]  # multiclass decides by arg-max, whatever the threshold
    for c, name in enumerate("xyz"):
        assert multi[f"fbeta/{name}"] == pytest.approx(f1_score(one_hot[:, c], top1[:, c]))
