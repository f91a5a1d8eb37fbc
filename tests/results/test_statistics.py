"""Patient-level bootstrap intervals: BCa against its formula, coverage, one macro label set, F-beta."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

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


def bca_by_formula(replicates: np.ndarray, estimate: float, jackknife: np.ndarray, level: float) -> list[float]:
    """Efron & Tibshirani (1993) eq. 14.10-14.15, written from the book with scipy's normal distribution."""
    z0 = norm.ppf((np.sum(replicates < estimate) + 0.5 * np.sum(replicates == estimate)) / len(replicates))
    d = jackknife.mean() - jackknife
    a = np.sum(d**3) / (6 * np.sum(d**2) ** 1.5)
    alphas = [norm.cdf(z0 + (z0 + z) / (1 - a * (z0 + z))) for z in norm.ppf([(1 - level) / 2, (1 + level) / 2])]
    return list(np.quantile(replicates, alphas))


def test_bca_interval_follows_the_formula_and_its_level():
    from engine.results.statistics import bca_interval

    rng = np.random.default_rng(0)
    replicates, jackknife = rng.gamma(2.0, 1.0, 2000), rng.gamma(2.0, 1.0, 50)
    for level in (0.95, 0.9):
        got = bca_interval(torch.tensor(replicates), 1.7, torch.tensor(jackknife), level)
        assert got == pytest.approx(bca_by_formula(replicates, 1.7, jackknife, level), rel=1e-9)
    assert bca_interval(torch.tensor(replicates), 1.7, torch.tensor(jackknife), 0.9)[1] < \
        bca_interval(torch.tensor(replicates), 1.7, torch.tensor(jackknife), 0.95)[1]


def binormal(n: int, auc: float, prevalence: float, rng) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores N(0, 1) for negatives and N(mu, 1) for positives, mu set for the given AUC (Phi(mu / sqrt 2))."""
    mu = math.sqrt(2) * norm.ppf(auc)
    positives = max(1, round(n * prevalence))
    labels = torch.zeros(n, 1)
    labels[:positives] = 1
    scores = torch.tensor(rng.normal(size=(n, 1))) + mu * labels
    return torch.sigmoid(scores).float(), labels


def test_bca_intervals_cover_the_population_auc_at_n_40():
    """300 validation sets of 40 volumes (one per patient), AUC 0.95, prevalence 0.5: the 95% interval holds
    the population's AUC in >= 92% of them (the percentile bootstrap held it in ~84%)."""
    rng = np.random.default_rng(1)
    hits = 0
    for trial in range(300):
        probs, labels = binormal(40, 0.95, 0.5, rng)
        out = bootstrap_intervals(probs, labels, (probs >= 0.5).float(), [str(i) for i in range(40)], ["x"],
                                  resamples=1000, seed=trial)
        low, high = out["intervals"]["auc/x"]
        hits += low <= 0.95 <= high
    assert hits / 300 >= 0.92, hits / 300


def test_macro_averages_one_label_set_and_counts_the_resamples_that_lack_a_class():
    """A macro label with 2 positive patients (min_positive=1 lets it in) drops out of some resamples: those are
    left out of the macro interval and counted (never averaged over fewer labels), and the label is flagged as
    resting on few patients. By default (10 positive patients) it stays out of the macro altogether."""
    g = torch.Generator().manual_seed(0)
    n = 60
    labels = torch.stack([(torch.rand(n, generator=g) < 0.5).float(), torch.zeros(n)], 1)
    labels[:2, 1] = 1  # two positive patients for label b
    probs = torch.sigmoid(torch.randn(n, 2, generator=g) + 2 * labels)
    patients = [f"p{i}" for i in range(n)]
    out = bootstrap_intervals(probs, labels, (probs >= 0.5).float(), patients, ["a", "b"], resamples=400, seed=3,
                              min_positive=1)
    w = patient_weights(patients, 400, seed=3)
    b_missing = int(((w[:, :2].sum(1)) == 0).sum())  # resamples that drew neither positive patient of b
    assert out["degenerate"]["auc_macro"] == out["degenerate"]["auc/b"] == b_missing > 0
    assert out["macro_labels"] == ["a", "b"] and out["few_positive_patients"] == {}
    assert out["method"] == "BCa" and out["degenerate"]["auc/a"] == 0
    default = bootstrap_intervals(probs, labels, (probs >= 0.5).float(), patients, ["a", "b"], resamples=400, seed=3)
    assert default["macro_labels"] == ["a"] and default["few_positive_patients"] == {"b": 2}
    assert default["degenerate"]["auc_macro"] == 0 and default["degenerate"]["auc/b"] == b_missing
    assert default["unreliable"] == ["auc/b", "fbeta/b"] and default["min_positive_patients"] == 10


def test_weighted_fbeta_matches_sklearn_with_sample_weights():
    from sklearn.metrics import fbeta_score

    from engine.results.statistics import _weighted_fbeta

    rng = np.random.default_rng(2)
    y, d, w = rng.integers(0, 2, 50), rng.integers(0, 2, 50), rng.integers(0, 4, 50).astype(float)
    for beta in (0.5, 2.0):
        got = _weighted_fbeta(torch.tensor(d, dtype=torch.float64), torch.tensor(y, dtype=torch.float64),
                              torch.tensor(w)[None], beta)
        assert float(got) == pytest.approx(fbeta_score(y, d, beta=beta, sample_weight=w))


def test_macro_fbeta_leaves_out_a_label_without_positives_as_macro_auc_does():
    """One rule for every macro figure: a label with no positive is out of both, even when the model fires a
    false positive on it or none: with no positive, recall has nothing to count and F-beta is undefined (NaN, n/a)
    either way, never the 0 that MONAI's formula gives a label with false positives."""
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    probs = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.1, 0.1], [0.7, 0.1, 0.1], [0.6, 0.1, 0.1]])
    out = classification_metrics(probs, labels, ["a", "b", "c"], "multilabel")
    assert math.isnan(out["fbeta/b"]) and math.isnan(out["fbeta/c"])
    assert out["fbeta_macro"] == pytest.approx(out["fbeta/a"]) and out["auc_macro"] == pytest.approx(out["auc/a"])
    assert out["auc_labels"] == 1


def test_paired_comparison_on_the_same_patients():
    """Point estimates as sklearn computes them, the difference as second - first; a model compared with itself
    differs by exactly 0; a clearly better one's interval excludes 0."""
    from sklearn.metrics import roc_auc_score

    from engine.results.statistics import paired_comparison

    rng = np.random.default_rng(4)
    labels = torch.tensor(rng.integers(0, 2, size=(120, 2)), dtype=torch.float32)
    weak = torch.tensor(rng.random((120, 2)), dtype=torch.float32)
    strong = torch.sigmoid(torch.tensor(rng.normal(size=(120, 2)), dtype=torch.float32) + 2 * labels)
    patients = [f"p{i // 2}" for i in range(120)]
    out = paired_comparison(weak, strong, labels, patients, ["a", "b"], resamples=500, seed=1)
    for c, name in enumerate("ab"):
        expected = [roc_auc_score(labels[:, c], p[:, c]) for p in (weak, strong)]
        assert [out[f"auc/{name}"]["first"], out[f"auc/{name}"]["second"]] == pytest.approx(expected)
    macro = out["auc_macro"]
    assert macro["difference"] == pytest.approx(macro["second"] - macro["first"]) and macro["interval"][0] > 0
    same = paired_comparison(weak, weak, labels, patients, ["a", "b"], resamples=200, seed=1)["auc_macro"]
    assert same["difference"] == 0 and same["interval"] == [0.0, 0.0]


def test_an_all_negative_label_has_no_fbeta_interval_rather_than_zero_to_zero():
    """With no positive, F-beta is undefined in every resample (recall has nothing to count): no interval, where
    the model's false positives used to make it [0, 0]; the label is listed unreliable, and as it has one class
    it is not among the labels with too few positives that have both."""
    g = torch.Generator().manual_seed(1)
    labels = torch.stack([(torch.rand(50, generator=g) < 0.5).float(), torch.zeros(50)], 1)
    probs = torch.rand(50, 2, generator=g)
    decided = (probs >= 0.5).float()
    assert decided[:, 1].sum() > 0  # false positives on b
    out = bootstrap_intervals(probs, labels, decided, [str(i) for i in range(50)], ["a", "b"], resamples=100)
    assert all(math.isnan(v) for v in out["intervals"]["fbeta/b"]) and out["degenerate"]["fbeta/b"] == 100
    assert not any(math.isnan(v) for v in out["intervals"]["fbeta/a"])
    assert out["unreliable"] == ["auc/b", "fbeta/b"] and out["few_positive_patients"] == {}
