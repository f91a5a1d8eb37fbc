"""Averaging an ensemble's members or test-time flips, against numpy and scipy computed from the definitions."""

import numpy as np
import pytest
import torch
from scipy.special import expit, logit, softmax

from engine.results.averaging import flipped_views, mean_probability, mean_thresholds


def test_sigmoid_outputs_are_calibrated_each_then_averaged_as_probabilities():
    rng = np.random.default_rng(0)
    z = [rng.normal(size=(5, 3)) * 3 for _ in range(3)]
    calibrations = [{"scale": [0.5, 1.0, 2.0], "bias": [-1.0, 0.0, 0.3]}, None,
                    {"scale": [0.8, 0.9, 1.1], "bias": None}]
    scales = [np.array(c["scale"]) if c else np.ones(3) for c in calibrations]
    biases = [np.array(c["bias"]) if c and c["bias"] else np.zeros(3) for c in calibrations]
    expected = np.mean([expit(x * a + b) for x, a, b in zip(z, scales, biases)], axis=0)
    got = mean_probability([torch.tensor(x) for x in z], calibrations, "multilabel")
    assert expit(got.double().numpy()) == pytest.approx(expected, abs=1e-6)
    assert got.double().numpy() == pytest.approx(logit(expected), rel=1e-4, abs=1e-4)


def test_softmax_outputs_average_class_probabilities_with_one_shared_scale():
    rng = np.random.default_rng(1)
    z = [rng.normal(size=(4, 5)) * 2 for _ in range(2)]
    calibrations = [{"scale": [0.5], "bias": None}, {"scale": [2.0], "bias": None}]
    expected = np.mean([softmax(x * c["scale"][0], axis=1) for x, c in zip(z, calibrations)], axis=0)
    got = mean_probability([torch.tensor(x) for x in z], calibrations, "multiclass")
    assert softmax(got.double().numpy(), axis=1) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="2 outputs but 1 calibrations"):
        mean_probability([torch.tensor(x) for x in z], calibrations[:1], "multiclass")


def test_flips_are_the_volume_and_one_flip_per_spatial_axis():
    x = torch.arange(2 * 1 * 2 * 3 * 4, dtype=torch.float32).reshape(2, 1, 2, 3, 4)
    views = flipped_views(x)
    expected = [x.numpy()] + [np.flip(x.numpy(), axis=a) for a in (2, 3, 4)]
    assert len(views) == 4 and all(np.array_equal(v.numpy(), e) for v, e in zip(views, expected))


def test_ensemble_threshold_is_each_labels_mean_over_members():
    members = [[0.2, 0.5, 0.9], [0.4, 0.5, 0.3], [0.3, 0.8, 0.6]]
    assert mean_thresholds(members) == pytest.approx(np.mean(members, axis=0).tolist())
