"""The macro AUC's BCa interval with a rare label about: simulated here, three common labels and one with 2
positive patients, binormal scores of known AUC. Averaging only labels with >= 10 positive patients (the
default) keeps the macro interval's coverage; averaging the rare one in (min_positive=1) breaks it."""

import math

import numpy as np
import torch
from scipy.stats import norm

from engine.results.statistics import bootstrap_intervals

AUCS = np.array([0.75, 0.85, 0.9, 0.8])  # three common labels, then the rare one
SHIFTS = math.sqrt(2) * norm.ppf(AUCS)  # scores N(0, 1) for negatives, N(d, 1) for positives: AUC Phi(d / sqrt 2)


def dataset(patients: int, rng) -> tuple[torch.Tensor, torch.Tensor]:
    """One volume per patient; 40% positive for each common label (16 of 40: always >= 10), 2 for the rare."""
    labels = np.zeros((patients, 4))
    for c in range(3):
        labels[rng.permutation(patients)[: int(0.4 * patients)], c] = 1
    labels[rng.permutation(patients)[:2], 3] = 1
    return torch.tensor(rng.normal(size=(patients, 4)) + SHIFTS * labels), torch.tensor(labels)


def coverage(patients: int, sets: int, resamples: int) -> dict[int, float]:
    """Share of `sets` simulated sets whose 95% macro interval holds the true macro AUC: the mean over the
    labels that qualify (min_positive 10: the three common ones; 1: all four)."""
    rng = np.random.default_rng(patients)
    names, hits = ["a", "b", "c", "rare"], {10: 0, 1: 0}
    for trial in range(sets):
        scores, labels = dataset(patients, rng)
        for least, truth in ((10, AUCS[:3].mean()), (1, AUCS.mean())):
            out = bootstrap_intervals(scores, labels, (scores > 0).double(), [str(i) for i in range(patients)],
                                      names, resamples=resamples, seed=trial, min_positive=least)
            low, high = out["intervals"]["auc_macro"]
            hits[least] += low <= truth <= high
            assert out["macro_labels"] == (names[:3] if least == 10 else names)
    return {least: hit / sets for least, hit in hits.items()}


def test_macro_coverage_at_40_patients():
    """Here 0.963 by the rule and 0.890 with the rare label averaged in (1,000 other sets: 0.952 and 0.871)."""
    got = coverage(40, 300, 1000)
    assert got[10] >= 0.93 and got[1] <= got[10] - 0.04, got


def test_macro_coverage_at_200_patients():
    """Here 0.957 by the rule and 0.710 with the rare label averaged in (600 other sets, 1,000 resamples: 0.947
    and 0.698; the issue's 0.65): the rare label's AUC, from 2 positives, swings the macro by more than the
    interval of the rest allows."""
    got = coverage(200, 300, 500)
    assert got[10] >= 0.93 and got[1] <= 0.8, got
