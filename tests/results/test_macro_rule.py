"""The macro label rule (metrics.min_positive_patients): which labels macro figures average, checked against
counts made by hand and sklearn's per-label figures; F-beta of a label with no positive is undefined."""

import math
import random

import pytest
import torch
from sklearn.metrics import fbeta_score, roc_auc_score

from engine.results.metrics import classification_metrics, macro_labels, positive_patients


def _random_set(seed: int, n: int = 60, labels: int = 5):
    rng = random.Random(seed)
    patients = [f"p{rng.randrange(n // 2)}" for _ in range(n)]  # about two volumes per patient
    prevalence = [0.5, 0.3, 0.08, 0.03, 0.0][:labels]
    y = torch.tensor([[float(rng.random() < q) for q in prevalence] for _ in range(n)])
    p = torch.rand(n, labels, generator=torch.Generator().manual_seed(seed)) * 0.5 + 0.5 * y
    return y, p, patients


@pytest.mark.parametrize("seed", range(5))
def test_positive_patients_counts_distinct_patients_with_a_positive_volume(seed):
    y, _, patients = _random_set(seed)
    expected = [len({patients[i] for i in range(len(patients)) if y[i, c] == 1}) for c in range(y.shape[1])]
    assert positive_patients(y, patients).tolist() == expected
    assert positive_patients(y).tolist() == [int(y[:, c].sum()) for c in range(y.shape[1])]  # rows as patients
    with pytest.raises(ValueError, match="one per row"):
        positive_patients(y, patients[:-1])


@pytest.mark.parametrize("seed,minimum", [(s, m) for s in range(4) for m in (1, 3, 10)])
def test_macro_labels_need_both_classes_and_enough_positive_patients(seed, minimum):
    y, _, patients = _random_set(seed)
    expected = []
    for c in range(y.shape[1]):
        positives = {patients[i] for i in range(len(patients)) if y[i, c] == 1}
        negatives = [i for i in range(len(patients)) if y[i, c] == 0]
        expected.append(bool(negatives) and len(positives) >= minimum)
    assert macro_labels(y, patients, minimum).tolist() == expected


def test_macro_figures_average_the_kept_labels_only():
    y, p, patients = _random_set(7, n=200)
    keep = macro_labels(y, patients, 10)
    assert keep.tolist()[:2] == [True, True] and not keep[-1]  # the common ones in, the never-positive one out
    out = classification_metrics(p, y, list("abcde"), "multilabel", 0.5, keep=keep)
    kept = [c for c in range(5) if keep[c]]
    aucs = [roc_auc_score(y[:, c].numpy(), p[:, c].numpy()) for c in kept]
    fbetas = [fbeta_score(y[:, c].numpy(), (p[:, c] >= 0.5).numpy(), beta=1.0) for c in kept]
    assert out["auc_macro"] == pytest.approx(sum(aucs) / len(aucs), abs=1e-6)
    assert out["fbeta_macro"] == pytest.approx(sum(fbetas) / len(fbetas), abs=1e-6)
    assert out["auc_labels"] == len(kept)
    # a rare label's own figure is still there, beside the macro
    rare = next(c for c in range(4) if not keep[c])
    assert out[f"auc/{'abcde'[rare]}"] == pytest.approx(roc_auc_score(y[:, rare].numpy(), p[:, rare].numpy()),
                                                         abs=1e-6)


def test_fbeta_of_a_label_without_positives_is_undefined_not_zero():
    y = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    p = torch.tensor([[0.9, 0.9], [0.1, 0.8], [0.8, 0.1], [0.2, 0.1]])  # two false positives on "b"
    out = classification_metrics(p, y, ["a", "b"], "multilabel", 0.5)
    assert math.isnan(out["fbeta/b"]) and out["fbeta/a"] == pytest.approx(
        fbeta_score(y[:, 0].numpy(), (p[:, 0] >= 0.5).numpy(), beta=1.0))


def test_confusion_counts_match_sklearn_per_label():
    from sklearn.metrics import confusion_matrix

    from engine.results.metrics import confusion

    y, p, _ = _random_set(11, n=50, labels=3)
    thresholds = [0.3, 0.5, 0.7]
    counts = confusion(p, y, "multilabel", thresholds)  # tp, fp, tn, fn per label
    for j, t in enumerate(thresholds):
        tn, fp, fn, tp = confusion_matrix(y[:, j].numpy(), (p[:, j] >= t).numpy(), labels=[0, 1]).ravel()
        assert counts[j].tolist() == [tp, fp, tn, fn]


def test_a_registered_metric_gets_the_calibrated_probabilities_the_labels_and_the_decisions():
    """Metrics added to the registry score the calibrated probabilities where given (AUC ranks the raw ones), with
    the labels and the decisions made elsewhere (cross-validation's per-fold thresholds)."""
    from engine.config.metric_registry import Metric, register, unregister

    seen = {}

    def spy(probs, labels, decided) -> float:
        seen.update(probs=probs.clone(), labels=labels.clone(), decided=decided.clone())
        return 0.25

    y, raw, _ = _random_set(13, n=30, labels=2)
    calibrated, decided = raw.sqrt(), (raw > 0.6).float()
    register(Metric("spy", direction="max", compute=spy))
    try:
        out = classification_metrics(raw, y, ["a", "b"], "multilabel", 0.5, decided=decided, calibrated=calibrated)
        assert out["spy"] == 0.25 and torch.equal(seen["probs"], calibrated) and torch.equal(seen["labels"], y)
        assert torch.equal(seen["decided"], decided)
        classification_metrics(raw, y, ["a", "b"], "multilabel", 0.5)
        assert torch.equal(seen["probs"], raw) and torch.equal(seen["decided"], (raw >= 0.5).float())
    finally:
        unregister("spy")


def test_run_statistics_and_paired_comparison_count_patients_not_volumes_and_rank_the_raw_outputs():
    """Two volumes per patient: a label with 6 positive patients (12 positive volumes) is under 10 and left out;
    the bootstrap ranks `ranked` (here reversed), not the calibrated probabilities; macro_mean without a mask
    averages the labels with both classes."""
    from engine.config.scoring import MetricsConfig
    from engine.results.metrics import decisions, macro_mean
    from engine.results.statistics import bootstrap_intervals, paired_comparison, run_statistics

    g = torch.Generator().manual_seed(21)
    n = 80
    patients = [f"p{i // 2}" for i in range(n)]
    y = torch.zeros(n, 3)
    y[:, 0] = (torch.rand(n, generator=g) < 0.5).float()
    y[:12, 1] = 1  # patients p0-p5
    p = (torch.rand(n, 3, generator=g) + y) / 2
    ranked = 1 - p
    metrics = MetricsConfig(bootstrap=60, min_positive_patients=10)
    out = run_statistics(p, y, patients, ["a", "rare", "none"], "multilabel", [0.5] * 3, None, metrics, ranked=ranked)
    assert out["below_min_positive"] == {"rare": 6} and out["auc_left_out"] == ["none"]
    assert out["bootstrap"] == bootstrap_intervals(ranked, y, decisions(p, "multilabel", [0.5] * 3), patients,
                                                   ["a", "rare", "none"], 1.0, 60, 0, min_positive=10)
    paired = paired_comparison(p, ranked, y, patients, ["a", "rare", "none"], resamples=20)
    assert paired["few_positive_patients"] == {"rare": 6} and paired["macro_labels"] == ["a"]
    assert macro_mean([0.1, 0.2, 0.3], y) == pytest.approx(0.15)  # "none" has one class
