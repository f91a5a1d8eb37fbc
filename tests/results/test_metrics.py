import math

import pytest
import torch

from engine.results.metrics import classification_metrics

NAMES = ["a", "b"]


def metrics(probs, labels, task="multilabel", names=NAMES, **kw):
    return classification_metrics(torch.tensor(probs), torch.tensor(labels), names, task, **kw)


def test_auc_known_values():
    # label a: 3 of 4 positive/negative pairs ranked right -> 0.75; label b: perfectly inverted -> 0.0
    probs = [[0.1, 0.9], [0.4, 0.8], [0.35, 0.2], [0.8, 0.1]]
    labels = [[0, 0], [0, 0], [1, 1], [1, 1]]
    m = metrics(probs, labels)
    assert m["auc/a"] == pytest.approx(0.75) and m["auc/b"] == pytest.approx(0.0)
    assert m["auc_macro"] == pytest.approx(0.375)
    # micro: positives 0.35,0.8,0.2,0.1 vs negatives 0.1,0.4,0.9,0.8: 1 + 2.5 + 1 + 0.5 (ties half) of 16 pairs
    assert m["auc_micro"] == pytest.approx(5 / 16)


def test_threshold_metrics_known_values():
    probs = [[0.9, 0.2], [0.6, 0.7], [0.2, 0.1], [0.4, 0.8]]
    labels = [[1, 0], [0, 1], [0, 0], [1, 1]]
    m = metrics(probs, labels, threshold=0.5, beta=2.0)
    # a: tp1 fp1 tn1 fn1; b: tp2 fp0 tn2 fn0 -> all: tp3 fp1 tn3 fn1
    assert m["precision"] == pytest.approx(0.75) and m["recall"] == pytest.approx(0.75)
    assert m["specificity"] == pytest.approx(0.75) and m["accuracy"] == pytest.approx(0.75)
    f2_a = 5 * 1 / (5 * 1 + 4 * 1 + 1)
    assert m["fbeta/a"] == pytest.approx(f2_a) and m["fbeta/b"] == pytest.approx(1.0)
    assert m["fbeta_macro"] == pytest.approx((f2_a + 1.0) / 2)
    assert m["fbeta_micro"] == pytest.approx(5 * 3 / (5 * 3 + 4 * 1 + 1))
    assert metrics(probs, labels, threshold=0.65)["precision"] == pytest.approx(1.0)


def test_label_with_one_class_is_left_out_of_macro_auc():
    m = metrics([[0.2, 0.3], [0.8, 0.1]], [[0, 1], [1, 1]])
    assert math.isnan(m["auc/b"]) and m["auc_macro"] == pytest.approx(1.0)


def test_multiclass_accuracy_is_top1():
    probs = [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]]
    labels = [[1, 0, 0], [0, 0, 1], [0, 1, 0]]
    m = metrics(probs, labels, task="multiclass", names=["x", "y", "z"])
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["auc/x"] == pytest.approx(1.0)
