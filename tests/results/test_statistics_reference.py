"""The intervals and the figures around them, recomputed here from their definitions: every resample's AUC and
F-beta by sklearn with the resample's patient counts as sample weights, the jackknife by leaving each patient
out, the BCa interval by Efron & Tibshirani's formula (test_statistics.bca_by_formula); the summary blocks key
by key."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import fbeta_score, roc_auc_score
from test_statistics import bca_by_formula

from engine.config.schema import MetricsConfig
from engine.results.statistics import (
    _both_classes,
    _weighted_auc,
    _weighted_fbeta,
    bca_interval,
    bootstrap_intervals,
    jackknife_weights,
    paired_comparison,
    patient_weights,
    per_label_calibration,
    run_statistics,
)


def data(n: int = 48, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 2)) < [0.4, 0.3]).astype(np.float64)
    probs = 1 / (1 + np.exp(-(rng.normal(size=(n, 2)) + 1.5 * labels)))
    patients = [f"p{i // 3}" for i in range(n)]  # three volumes per patient
    return probs, labels, patients


def weighted(metric, y, s, w) -> float:
    """sklearn's figure with sample weights; NaN where a class is missing under the weights."""
    if metric is roc_auc_score and (w @ y == 0 or w @ (1 - y) == 0):
        return math.nan
    if metric is not roc_auc_score and w @ y == 0:
        return math.nan
    return metric(y, s, sample_weight=w)


def reference(figure, probs, labels, decisions, patients, resamples, seed, level):
    """(interval, replicates' NaN count) of `figure` ((N,) -> float over weights) by the book."""
    w = patient_weights(patients, resamples, seed).numpy()
    boot = np.array([figure(row) for row in w])
    jack = np.array([figure(row) for row in jackknife_weights(patients).numpy()])
    estimate = figure(np.ones(len(patients)))
    finite, jack = boot[~np.isnan(boot)], jack[~np.isnan(jack)]
    return bca_by_formula(finite, estimate, jack, level), int(np.isnan(boot).sum())


def test_bootstrap_intervals_equal_sklearn_resample_by_resample_and_the_formula():
    probs, labels, patients = data()
    decisions = (probs >= 0.45).astype(np.float64)
    out = bootstrap_intervals(torch.tensor(probs), torch.tensor(labels), torch.tensor(decisions), patients,
                              ["a", "b"], beta=2.0, resamples=300, seed=4, level=0.9)
    assert (out["method"], out["level"], out["resamples"], out["unit"], out["patients"]) == (
        "BCa", 0.9, 300, "patient", 16)
    for c, name in enumerate("ab"):
        y = labels[:, c]
        auc = lambda w, c=c: weighted(roc_auc_score, labels[:, c], probs[:, c], w)  # noqa: E731
        fb = lambda w, c=c: weighted(lambda t, d, sample_weight: fbeta_score(  # noqa: E731
            t, d, beta=2.0, sample_weight=sample_weight, zero_division=0), labels[:, c], decisions[:, c], w)
        for key, figure in ((f"auc/{name}", auc), (f"fbeta/{name}", fb)):
            interval, nans = reference(figure, probs, labels, decisions, patients, 300, 4, 0.9)
            assert out["intervals"][key] == pytest.approx(interval, abs=1e-9), key
            assert out["degenerate"][key] == nans
        assert y.any()
    # the macro averages the labels with >= 10 positive patients (here a: 10 of 16 patients; b has 8), counted
    # here from the rows; min_positive=1 lets b in
    positive = [len({pt for pt, v in zip(patients, labels[:, c]) if v}) for c in range(2)]
    assert positive == [10, 8] and out["macro_labels"] == ["a"] and out["few_positive_patients"] == {"b": 8}
    assert out["unreliable"] == ["auc/b", "fbeta/b"] and out["min_positive_patients"] == 10
    for least, chosen in ((10, [0]), (1, [0, 1])):
        macro = lambda w, chosen=chosen: np.mean([weighted(roc_auc_score, labels[:, c], probs[:, c], w)  # noqa
                                                  for c in chosen])
        got = out if least == 10 else bootstrap_intervals(
            torch.tensor(probs), torch.tensor(labels), torch.tensor(decisions), patients, ["a", "b"], beta=2.0,
            resamples=300, seed=4, level=0.9, min_positive=least)
        assert got["intervals"]["auc_macro"] == pytest.approx(reference(macro, probs, labels, decisions, patients,
                                                                        300, 4, 0.9)[0], abs=1e-9)
    defaults = bootstrap_intervals(torch.tensor(probs), torch.tensor(labels), torch.tensor(decisions), patients,
                                   ["a", "b"])
    assert defaults["resamples"] == 1000 and defaults["level"] == 0.95
    assert defaults["intervals"] == bootstrap_intervals(torch.tensor(probs), torch.tensor(labels),
                                                        torch.tensor(decisions), patients, ["a", "b"], 1.0, 1000,
                                                        0, 0.95)["intervals"]


def test_few_positive_patients_is_strictly_below_ten():
    n = 60
    labels = np.zeros((n, 2))
    labels[:10, 0] = 1  # ten positive patients: not few
    labels[:9, 1] = 1  # nine: few
    probs = np.clip(labels * 0.6 + 0.2, 0, 1)
    out = bootstrap_intervals(torch.tensor(probs), torch.tensor(labels), torch.tensor(labels), [str(i) for i in
                              range(n)], ["ten", "nine"], resamples=20)
    assert out["few_positive_patients"] == {"nine": 9}


def test_paired_comparison_equals_sklearn_on_the_same_resamples():
    probs, labels, patients = data(seed=1)
    other = np.clip(probs + np.random.default_rng(2).normal(0, 0.2, probs.shape), 0.001, 0.999)
    out = paired_comparison(torch.tensor(probs), torch.tensor(other), torch.tensor(labels), patients, ["a", "b"],
                            resamples=300, seed=2, level=0.9)
    assert {k: out[k] for k in ("resamples", "level", "method", "unit", "patients", "macro_labels")} == {
        "resamples": 300, "level": 0.9, "method": "BCa", "unit": "patient", "patients": 16, "macro_labels": ["a", "b"]}
    for c, name in enumerate("ab"):
        diff = lambda w, c=c: (weighted(roc_auc_score, labels[:, c], other[:, c], w)  # noqa: E731
                               - weighted(roc_auc_score, labels[:, c], probs[:, c], w))
        interval, nans = reference(diff, probs, labels, None, patients, 300, 2, 0.9)
        block = out[f"auc/{name}"]
        # differences of two AUCs tie with the estimate up to rounding, which torch and sklearn round apart
        assert block["interval"] == pytest.approx(interval, abs=2e-3) and block["degenerate"] == nans
        assert block["difference"] == pytest.approx(block["second"] - block["first"])
        assert block["first"] == pytest.approx(roc_auc_score(labels[:, c], probs[:, c]))
    assert paired_comparison(torch.tensor(probs), torch.tensor(other), torch.tensor(labels), patients,
                             ["a", "b"])["resamples"] == 1000


SYMMETRIC = np.array([0.0, 1.0, 2.0])  # a jackknife without skew: the formula's acceleration is 0


def test_bca_edges_two_replicates_few_jackknife_values_ties_and_clamping():
    rng = np.random.default_rng(5)
    jack = rng.gamma(2.0, 1.0, 30)
    two = np.array([1.0, 2.0])
    assert bca_interval(torch.tensor(two), 1.5, torch.tensor(jack), 0.9) == pytest.approx(
        bca_by_formula(two, 1.5, jack, 0.9))
    assert all(math.isnan(v) for v in bca_interval(torch.tensor([1.0]), 1.5, torch.tensor(jack), 0.9))
    assert all(math.isnan(v) for v in bca_interval(torch.tensor(two), math.nan, torch.tensor(jack), 0.9))
    replicates = np.round(rng.normal(1.0, 0.3, 400), 1)  # many ties with the estimate
    for jackknife in (jack[:2], jack[:3]):  # two values: no acceleration; three: the formula's
        expected = bca_by_formula(replicates, 1.0, jackknife, 0.9) if len(jackknife) > 2 else \
            bca_by_formula(replicates, 1.0, SYMMETRIC, 0.9)
        assert bca_interval(torch.tensor(replicates), 1.0, torch.tensor(jackknife), 0.9) == pytest.approx(expected)
    assert bca_interval(torch.tensor(replicates), 1.0, torch.tensor(np.ones(5)), 0.9) == pytest.approx(
        bca_by_formula(replicates, 1.0, SYMMETRIC, 0.9))  # no spread: no acceleration
    n = len(replicates)  # every replicate below the estimate: z0 from the share clamped to 1 - 0.5 / n
    from scipy.stats import norm

    z0, z = norm.ppf(1 - 0.5 / n), norm.ppf([0.05, 0.95])
    clamped = list(np.quantile(replicates, norm.cdf(z0 + (z0 + z))))
    assert bca_interval(torch.tensor(replicates), 99.0, torch.tensor(np.ones(5)), 0.9) == pytest.approx(clamped)
    z0 = norm.ppf(0.5 / n)
    assert bca_interval(torch.tensor(replicates), -99.0, torch.tensor(np.ones(5)), 0.9) == pytest.approx(
        list(np.quantile(replicates, norm.cdf(z0 + (z0 + z)))))


def test_weighted_figures_at_their_edges():
    p = torch.tensor([0.2, 0.7, 0.7], dtype=torch.float64)
    y = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    w = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    auc = _weighted_auc(p, y, w)
    assert auc[0] == 1.0 and auc[1] == 0.5 and math.isnan(auc[2]) and math.isnan(auc[3])  # one negative suffices
    d = torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64)
    fb = _weighted_fbeta(d, y, w, 1.0)
    assert fb[0] == 0.0 and math.isnan(fb[2])  # no positive and no positive decision: undefined, not 0
    assert _both_classes(y[:, None], w).flatten().tolist() == [True, True, False, False]
    only_positive = torch.tensor([[0.0, 2.0, 0.0]], dtype=torch.float64)
    assert _both_classes(y[:, None], only_positive).flatten().tolist() == [False]
    assert torch.equal(jackknife_weights(["a", "b", "a"]),
                       torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]], dtype=torch.float64))


def test_the_summary_blocks_key_by_key():
    assert per_label_calibration(None, ["a", "b"]) == {"scale": None, "intercept": None}
    assert per_label_calibration({"scale": [0.5], "bias": None}, ["a", "b"]) == {
        "scale": {"a": 0.5, "b": 0.5}, "intercept": None}
    assert per_label_calibration({"scale": [0.5, 2.0], "bias": [0.1, -0.2]}, ["a", "b"]) == {
        "scale": {"a": 0.5, "b": 2.0}, "intercept": {"a": 0.1, "b": -0.2}}
    probs, labels, patients = data()
    labels[:, 1] = 0  # label b: one class
    p, y = torch.tensor(probs), torch.tensor(labels)
    config = MetricsConfig(bootstrap=50, bootstrap_seed=3, beta=2.0, calibration_bins=5)
    calibration = {"scale": [0.5, 2.0], "bias": [0.1, -0.2]}
    out = run_statistics(p, y, patients, ["a", "b"], "multilabel", [0.3, 0.6], calibration, config)
    bins = np.minimum((probs * 5).astype(int), 4)
    ece = [sum(abs(probs[bins[:, c] == k, c].mean() - labels[bins[:, c] == k, c].mean()) * (bins[:, c] == k).sum()
               for k in range(5) if (bins[:, c] == k).any()) / len(probs) for c in range(2)]
    assert out["thresholds"] == {"a": 0.3, "b": 0.6}
    assert out["calibration"]["bins"] == 5 and out["calibration"]["ece"] == pytest.approx(dict(zip("ab", ece)))
    assert out["calibration"]["ece_macro"] == pytest.approx(ece[0])  # b has one class: left out, as from macro AUC
    assert out["calibration"]["scale"] == {"a": 0.5, "b": 2.0} and out["calibration"]["intercept"] == {
        "a": 0.1, "b": -0.2}
    assert out["auc_macro_labels"] == 1 and out["auc_left_out"] == ["b"]
    direct = bootstrap_intervals(p, y, (p >= torch.tensor([0.3, 0.6], dtype=p.dtype)).double(), patients,
                                 ["a", "b"], 2.0, 50, 3)
    assert out["bootstrap"] == direct
    assert "bootstrap" not in run_statistics(p, y, patients, ["a", "b"], "multilabel", [0.3, 0.6], None,
                                             MetricsConfig(bootstrap=0))
    empty = run_statistics(p[:0], y[:0], [], ["a", "b"], "multilabel", [0.5, 0.5], None, config)
    # no volumes: no label qualifies for the macro (it was 2 before the positive-patient rule: no one-class label)
    assert "bootstrap" not in empty and empty["auc_left_out"] == [] and empty["auc_macro_labels"] == 0
    one_hot = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 1]), 3).double()
    scores = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4], [0.6, 0.3, 0.1]], dtype=torch.float64)
    multi = run_statistics(scores, one_hot, ["a", "b", "c", "d"], ["x", "y", "z"], "multiclass", [0.5] * 3, None,
                           MetricsConfig(bootstrap=20))
    top1 = torch.nn.functional.one_hot(scores.argmax(1), 3).double()  # arg-max decisions, not thresholds
    assert multi["bootstrap"] == bootstrap_intervals(scores, one_hot, top1, ["a", "b", "c", "d"], ["x", "y", "z"],
                                                     1.0, 20, 0)


def test_no_label_with_both_classes_makes_every_macro_resample_degenerate():
    labels = torch.zeros(12, 2, dtype=torch.float64)
    probs = torch.rand(12, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = bootstrap_intervals(probs, labels, labels, [str(i) for i in range(12)], ["a", "b"], resamples=30)
    assert out["degenerate"]["auc_macro"] == 30 and out["macro_labels"] == []
    assert all(math.isnan(v) for v in out["intervals"]["auc_macro"])


def test_paired_comparison_defaults_to_seed_zero():
    probs, labels, patients = data(24, seed=3)
    a, b, y = torch.tensor(probs), torch.tensor(probs[::-1].copy()), torch.tensor(labels)
    # min_positive=1: 8 patients have fewer than 10 positives, and a NaN macro never compares equal to itself
    assert paired_comparison(a, b, y, patients, ["a", "b"], resamples=200, min_positive=1) == paired_comparison(
        a, b, y, patients, ["a", "b"], resamples=200, seed=0, min_positive=1)
