"""DeLong's test of an AUC difference against brute force written here: every positive-negative pair compared
(O(m n)), DeLong, DeLong & Clarke-Pearson's (1988) S10 / m + S01 / n, the patient-clustered variance with
explicit loops, scipy's normal; and its size under a true null, simulated."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from engine.results.delong import delong_comparison, influence
from engine.results.statistics import paired_comparison


def pairwise(x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(AUC, V10 per positive, V01 per negative) from the m x n pair matrix, ties one half."""
    pos, neg = x[y == 1], x[y == 0]
    pairs = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    return pairs.mean(), pairs.mean(1), pairs.mean(0)


def brute_psi(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each volume's influence, loop by loop: (V10_i - A) / m for positives, (V01_j - A) / n for negatives."""
    auc, v10, v01 = pairwise(x, y)
    m, n = int(y.sum()), int((1 - y).sum())
    psi, i_pos, i_neg = np.zeros(len(x)), 0, 0
    for i in range(len(x)):
        if y[i] == 1:
            psi[i], i_pos = (v10[i_pos] - auc) / m, i_pos + 1
        else:
            psi[i], i_neg = (v01[i_neg] - auc) / n, i_neg + 1
    return psi


def brute_clustered(psi: np.ndarray, patients: list[str]) -> float:
    """K / (K - 1) x sum over patients of (their volumes' summed psi)^2, with explicit loops."""
    totals = {}
    for value, patient in zip(psi, patients):
        totals[patient] = totals.get(patient, 0.0) + value
    k = len(totals)
    return k / (k - 1) * sum(t * t for t in totals.values())


def brute_obuchowski(psi: np.ndarray, positive: np.ndarray, patients: list[str]) -> float:
    """Obuchowski's clustered DeLong variance with explicit loops: per patient the summed influence of its positive
    volumes (P) and of its negative ones (N); Kp / (Kp - 1) sum P^2 + Kn / (Kn - 1) sum N^2 + 2 K / (K - 1) sum PN
    over the Kp patients with a positive, the Kn with a negative, all K."""
    pos, neg = {}, {}
    for value, is_positive, patient in zip(psi, positive, patients):
        side = pos if is_positive else neg
        side[patient] = side.get(patient, 0.0) + value
    kp, kn, k = len(pos), len(neg), len(set(patients))
    return (kp / (kp - 1) * sum(v * v for v in pos.values()) + kn / (kn - 1) * sum(v * v for v in neg.values())
            + 2 * k / (k - 1) * sum(pos[q] * neg[q] for q in pos if q in neg))


def scores(n: int, seed: int, labels: int = 2):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, labels)) < 0.4).astype(float)
    a = np.round(rng.normal(size=(n, labels)) + 1.2 * y, 1)  # rounded: many ties
    b = np.round(0.6 * a + rng.normal(size=(n, labels)) + 0.5 * y, 1)
    return a, b, y


def test_components_equal_the_pairwise_brute_force_ties_included():
    a, _, y = scores(80, 0)
    for c in range(2):
        auc, psi = influence(torch.tensor(a[:, c]), torch.tensor(y[:, c]))
        assert auc == pytest.approx(roc_auc_score(y[:, c], a[:, c]), abs=1e-12)
        assert psi.numpy() == pytest.approx(brute_psi(a[:, c], y[:, c]), abs=1e-12)
    one_class = influence(torch.tensor(a[:, 0]), torch.zeros(80))
    assert math.isnan(one_class[0]) and bool(one_class[1].isnan().all())


def test_one_volume_per_patient_is_delong_1988_exactly():
    """With one volume per patient a label's variance is DeLong et al.'s S10 / m + S01 / n of the difference, S10
    and S01 the covariances (1 / (m - 1), 1 / (n - 1)) of the two models' structural components (numpy)."""
    a, b, y = scores(60, 1)
    patients = [str(i) for i in range(60)]
    out = delong_comparison(torch.tensor(a), torch.tensor(b), torch.tensor(y), patients, ["x", "z"],
                            torch.tensor([True, True]), level=0.9)
    for c, name in enumerate("xz"):
        (auc_a, v10_a, v01_a), (auc_b, v10_b, v01_b) = pairwise(a[:, c], y[:, c]), pairwise(b[:, c], y[:, c])
        m, n, total = int(y[:, c].sum()), int((1 - y[:, c]).sum()), 60
        s10 = np.cov(np.stack([v10_a, v10_b]))  # 1 / (m - 1), as DeLong et al. define S10
        s01 = np.cov(np.stack([v01_a, v01_b]))
        s = s10 / m + s01 / n
        literal = s[0, 0] + s[1, 1] - 2 * s[0, 1]
        d10, d01 = s10[0, 0] + s10[1, 1] - 2 * s10[0, 1], s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]
        assert literal == pytest.approx(d10 / m + d01 / n, rel=1e-12) and total == m + n
        block = out[f"auc/{name}"]
        assert block["difference"] == pytest.approx(auc_b - auc_a, abs=1e-12)
        assert block["se"] ** 2 == pytest.approx(literal, rel=1e-10)
        z = (auc_b - auc_a) / math.sqrt(literal)
        assert block["z"] == pytest.approx(z, rel=1e-9) and block["p"] == pytest.approx(2 * norm.sf(abs(z)), rel=1e-9)


def test_clustered_variance_and_macro_equal_loops_over_patients():
    """1-3 volumes per patient: the variance sums each patient's influence before squaring (K / (K - 1) over
    K patients); the macro's influence is the mean of its labels', a rare label (2 positive patients) left out
    by the default rule; p and interval from scipy's normal."""
    a, b, y = scores(90, 2, labels=3)
    y[:, 2] = 0
    y[[0, 89], 2] = 1  # the first and the last patient
    rng = np.random.default_rng(3)
    patients = [f"p{i}" for i in np.sort(rng.integers(0, 40, 90))]
    names = ["x", "z", "rare"]
    out = paired_comparison(torch.tensor(a), torch.tensor(b), torch.tensor(y), patients, names, resamples=50,
                            level=0.9)
    psis = [brute_psi(b[:, c], y[:, c]) - brute_psi(a[:, c], y[:, c]) for c in range(3)]
    differences = [roc_auc_score(y[:, c], b[:, c]) - roc_auc_score(y[:, c], a[:, c]) for c in range(3)]
    for key, difference, variance in (
            ("auc/x", differences[0], brute_obuchowski(psis[0], y[:, 0] > 0.5, patients)),
            ("auc/rare", differences[2], brute_obuchowski(psis[2], y[:, 2] > 0.5, patients)),
            ("auc_macro", np.mean(differences[:2]), brute_clustered((psis[0] + psis[1]) / 2, patients))):
        se = math.sqrt(variance)
        got = out[key]["delong"]
        assert got["difference"] == pytest.approx(difference, abs=1e-12)
        assert got["se"] == pytest.approx(se, rel=1e-10)
        assert got["p"] == pytest.approx(2 * norm.sf(abs(difference / se)), rel=1e-9)
        assert got["interval"] == pytest.approx([difference - norm.ppf(0.95) * se, difference + norm.ppf(0.95) * se])
    assert out["macro_labels"] == ["x", "z"] and out["few_positive_patients"] == {"rare": 2}
    assert out["min_positive_patients"] == 10
    assert out["auc/rare"]["delong"]["unreliable"] and not out["auc/x"]["delong"]["unreliable"]
    unclustered = math.sqrt(brute_obuchowski(psis[0], y[:, 0] > 0.5, [str(i) for i in range(90)]))
    assert abs(out["auc/x"]["delong"]["se"] - unclustered) > 1e-3  # clustering changes the figure here


def test_undefined_figures_are_nan():
    a, _, y = scores(30, 4)
    y[:, 1] = 0
    same = delong_comparison(torch.tensor(a), torch.tensor(a), torch.tensor(y), [str(i) for i in range(30)],
                             ["x", "none"], torch.tensor([True, False]))
    assert same["auc/x"]["difference"] == 0 and same["auc/x"]["se"] == 0 and same["auc/x"]["interval"] == [0, 0]
    assert math.isnan(same["auc/x"]["z"]) and math.isnan(same["auc/x"]["p"])  # 0 / 0: no test to speak of
    assert all(math.isnan(v) for v in (same["auc/none"]["se"], same["auc/none"]["p"], *same["auc/none"]["interval"]))
    nothing = delong_comparison(torch.tensor(a), torch.tensor(a), torch.tensor(y), [str(i) for i in range(30)],
                                ["x", "none"], torch.tensor([False, False]))["auc_macro"]
    assert math.isnan(nothing["difference"]) and math.isnan(nothing["p"])
    single = delong_comparison(torch.tensor(a), torch.tensor(a[::-1].copy()), torch.tensor(y), ["p"] * 30,
                               ["x", "none"], torch.tensor([True, False]))["auc/x"]
    assert math.isnan(single["se"])  # one patient: no between-patient variance


def null_set(patients: int, rng, volumes: int = 2):
    """Two models with the same true AUC per label on the same patients: scores mu y + u + e with a patient
    effect u shared by both models and both volumes, and volume noise correlated 0.5 between the models. Labels
    per patient: two common ones and a rare one with 2 positive patients (out of the default macro)."""
    y = np.zeros((patients, 3))
    y[:, 0], y[:, 1], y[:2, 2] = rng.random(patients) < 0.4, rng.random(patients) < 0.5, 1
    y = np.repeat(y, volumes, 0)
    shared = np.repeat(rng.normal(0, 0.7, (patients, 3)), volumes, 0) + np.array([1.5, 1.0, 1.5]) * y
    e = rng.normal(size=(2, len(y), 3))
    first, second = shared + e[0], shared + 0.5 * e[0] + math.sqrt(0.75) * e[1]
    return first, second, y, [f"p{i // volumes}" for i in range(len(y))]


def test_delong_and_the_bootstrap_hold_their_size_under_a_true_null():
    """400 null sets of 40 patients (2 volumes each, AUC about 0.8-0.85): DeLong's macro test and the bootstrap
    interval (1,000 resamples) each reject at 5% in 2-8% of them (here 5.0% and 5.25%). Measured with 1,000 sets
    per size: DeLong 5.2% at 40 patients and 4.5% at 200, the bootstrap 5.7% and 5.4%; with the rare label
    averaged in (min_positive=1) DeLong 11.7% and 22%, the bootstrap 11.2% and 23%; the rare label's own test
    22% and 30% (DeLong), 24% and 36% (bootstrap). Elsewhere the bootstrap is the one that slips: one volume per
    patient, 40 patients, AUC 0.95: DeLong 3.9% (macro of 2 labels) and 1.2% (a label with 12 positives), the
    bootstrap 10.9% and 11%; AUC 0.76, the models correlated 0.8: DeLong 5.4% and 4.9%, the bootstrap 5.7% and
    8.1%. Test with DeLong's p; read the bootstrap interval as a spread."""
    rng = np.random.default_rng(0)
    rejected = np.zeros(2)
    for trial in range(400):
        first, second, y, patients = null_set(40, rng)
        macro = paired_comparison(torch.tensor(first), torch.tensor(second), torch.tensor(y), patients,
                                  ["a", "b", "rare"], resamples=1000, seed=trial)["auc_macro"]
        rejected += [macro["delong"]["p"] < 0.05, not macro["interval"][0] <= 0 <= macro["interval"][1]]
    assert ((0.02 <= rejected / 400) & (rejected / 400 <= 0.08)).all(), rejected / 400


def test_an_undefined_test_keeps_every_key():
    """A label with one class: every figure NaN but the difference's keys all there (evaluation.json's shape)."""
    from engine.results.delong import delong_test

    got = delong_test(math.nan, torch.zeros(4, dtype=torch.float64), torch.arange(4), 4, 0.95)
    assert set(got) == {"difference", "se", "z", "p", "interval"} and all(
        math.isnan(v) for v in (got["difference"], got["se"], got["z"], got["p"], *got["interval"]))


def test_the_clustered_variance_needs_two_patients_on_each_side():
    """Two patients, each with two positive and two negative volumes: Kp = Kn = K = 2, defined (brute force);
    one positive patient: undefined (NaN, not a division by zero); one negative volume: the AUC is defined."""
    from engine.results.delong import clustered_variance, influence

    scores = torch.tensor([0.9, 0.85, 0.3, 0.1, 0.15, 0.7, 0.2, 0.75], dtype=torch.float64)
    labels = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    patients = ["a"] * 4 + ["b"] * 4
    _, psi = influence(scores, labels)
    got = clustered_variance(psi, torch.tensor([0] * 4 + [1] * 4), 2, labels)
    assert got == pytest.approx(brute_obuchowski(psi.numpy(), labels.numpy() > 0.5, patients), rel=1e-12) and got > 0
    one = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # only patient a has positives
    assert math.isnan(clustered_variance(influence(scores, one)[1], torch.tensor([0] * 4 + [1] * 4), 2, one))
    single_negative = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    auc, psi = influence(scores, single_negative)
    assert auc == pytest.approx(roc_auc_score(single_negative.numpy(), scores.numpy())) and not bool(psi.isnan().any())
