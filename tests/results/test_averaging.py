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


def _members(rng, volumes: list[str], labels: np.ndarray, rule: str = "youden", beta: float = 1.0) -> list[dict]:
    """Three members that validated on `volumes`, each listing them in its own order, with their own logits."""
    out = []
    for k in range(3):
        order = rng.permutation(len(volumes))
        z = labels * (1.0 + k) + rng.normal(size=labels.shape) * 1.5 - 0.5 * k  # each on its own scale
        out.append({"name": f"m{k}.pt", "thresholds": rng.uniform(0.2, 0.8, labels.shape[1]).tolist(),
                    "rule": rule, "beta": beta, "fixed": 0.5, "why": "",
                    "volumes": [volumes[i] for i in order], "logits": torch.tensor(z[order]),
                    "labels": torch.tensor(labels[order])})
    return out


def _averaged_by_hand(members: list[dict], calibrations: list[dict | None], volumes: list[str]) -> np.ndarray:
    """Per volume of `volumes`, the mean over members of expit(z * scale + bias), each member's row found by name."""
    probs = []
    for m, c in zip(members, calibrations):
        row = {v: i for i, v in enumerate(m["volumes"])}
        z = m["logits"].double().numpy()[[row[v] for v in volumes]]
        scale = np.array(c["scale"]) if c else 1.0
        bias = np.array(c["bias"]) if c and c["bias"] else 0.0
        probs.append(expit(z * scale + bias))
    return np.mean(probs, axis=0)


def _brute_force(p: np.ndarray, y: np.ndarray, score) -> float:
    """The candidate threshold (every distinct probability, highest first) with the highest score of deciding p >= t;
    a tie keeps the higher threshold."""
    best, chosen = -np.inf, None
    for t in np.unique(p)[::-1]:
        d = p >= t
        tp, fp = np.sum(d & (y == 1)), np.sum(d & (y == 0))
        value = score(tp, fp, np.sum(y == 1) - tp, np.sum(y == 0) - fp)
        if value > best + 1e-12:
            best, chosen = value, t
    return float(chosen)


@pytest.mark.parametrize("rule,beta", [("youden", 1.0), ("fbeta", 2.0)])
def test_ensemble_thresholds_are_refit_on_the_averaged_probabilities_of_a_shared_validation(rule, beta):
    from engine.results.averaging import ensemble_thresholds

    rng = np.random.default_rng(3)
    volumes = [f"v{i}.nii.gz" for i in range(60)]
    labels = (rng.uniform(size=(60, 3)) < [0.3, 0.5, 0.0]).astype(float)  # the third label has no positive
    members = _members(rng, volumes, labels, rule, beta)
    calibrations = [{"scale": [0.7, 1.2, 1.0], "bias": [0.4, -0.3, 0.0]}, None,
                    {"scale": [1.5, 0.8, 1.0], "bias": None}]
    thresholds, record = ensemble_thresholds(members, calibrations, "multilabel")
    p = _averaged_by_hand(members, calibrations, members[0]["volumes"])
    y = labels[[volumes.index(v) for v in members[0]["volumes"]]]
    b2 = beta * beta
    scores = {"youden": lambda tp, fp, fn, tn: tp / (tp + fn) - fp / (fp + tn),
              "fbeta": lambda tp, fp, fn, tn: (1 + b2) * tp / ((1 + b2) * tp + b2 * fn + fp)}
    expected = [_brute_force(p[:, j], y[:, j], scores[rule]) for j in range(2)] + [0.5]  # one class: the fixed one
    assert thresholds == pytest.approx(expected, abs=1e-6)
    assert record == {"method": "refit", "rule": rule, "volumes": 60}
    assert thresholds[:2] != pytest.approx(np.mean([m["thresholds"] for m in members], axis=0)[:2].tolist(), abs=1e-3)
    if rule == "youden":  # the same choice by scikit-learn's ROC curve: the first point of the highest J
        from sklearn.metrics import roc_curve

        for j in range(2):
            fpr, tpr, cuts = roc_curve(y[:, j], p[:, j], drop_intermediate=False)
            assert thresholds[j] == pytest.approx(cuts[int(np.argmax(tpr - fpr))], abs=1e-6)


def test_ensemble_thresholds_fall_back_to_the_members_mean_without_a_shared_validation():
    from engine.results.averaging import ensemble_thresholds, thresholds_note

    rng = np.random.default_rng(5)
    volumes = [f"v{i}" for i in range(30)]
    labels = (rng.uniform(size=(30, 2)) < 0.4).astype(float)
    mean = np.mean([m["thresholds"] for m in _members(np.random.default_rng(9), volumes, labels)], axis=0).tolist()

    def chosen(change, rule: str = "youden") -> tuple[list[float], dict]:
        members = _members(np.random.default_rng(9), volumes, labels, rule)
        change(members)
        return ensemble_thresholds(members, [None] * 3, "multilabel")

    def other_volumes(members):  # cross-validation folds: each validated other patients
        members[1]["volumes"] = [f"w{i}" for i in range(30)]

    thresholds, record = chosen(other_volumes)
    assert thresholds == pytest.approx(mean) and record == {
        "method": "mean", "rule": "youden", "reason": "the members validated on different volumes (cross-validation "
                                                      "folds do): there is no shared validation to refit on"}
    assert thresholds_note(record) == f"the members' mean thresholds, NOT refit for the ensemble ({record['reason']})"
    thresholds, record = chosen(other_volumes, rule="fixed")
    assert thresholds == [0.5, 0.5] and record == {"method": "fixed", "rule": "fixed"}
    assert thresholds_note(record) == "the fixed threshold (metrics.threshold_rule fixed)"

    def no_outputs(members):
        members[2].update(logits=None, why="it holds no validation outputs")

    def unknown_rule(members):
        members[0].update(rule=None, why="no config.yaml")

    def other_rules(members):
        members[1]["rule"] = "fbeta"

    def relabelled(members):
        members[1]["labels"] = 1 - members[1]["labels"]

    for change, rule, reason in (
            (no_outputs, "youden", "m2.pt: it holds no validation outputs"),
            (unknown_rule, None, "m0.pt: no config.yaml"),
            (other_rules, None, "the members were tuned under other rules (rule, beta, fixed): [('fbeta', 1.0, None), "
                                "('youden', None, None)]"),
            (relabelled, "youden", "the members' validations label the same volumes differently")):
        thresholds, record = chosen(change)
        assert thresholds == pytest.approx(mean), change.__name__
        assert record == {"method": "mean", "rule": rule, "reason": reason}, change.__name__
    thresholds, record = chosen(lambda members: None)
    assert record["method"] == "refit" and thresholds_note(record).startswith(
        "refit on the members' shared validation (30 volumes, rule youden")

    def unused_settings(members):  # youden reads neither beta nor the fixed threshold: they may differ
        members[1].update(beta=2.0, fixed=0.3)

    assert chosen(unused_settings) == chosen(lambda members: None)
    fbeta_other_beta = _members(np.random.default_rng(9), volumes, labels, "fbeta")
    fbeta_other_beta[1]["beta"] = 2.0  # fbeta reads beta: tuned under other rules
    assert ensemble_thresholds(fbeta_other_beta, [None] * 3, "multilabel")[1]["method"] == "mean"
    fixed_other = _members(np.random.default_rng(9), volumes, labels, "fixed")
    fixed_other[2]["fixed"] = 0.3
    assert ensemble_thresholds(fixed_other, [None] * 3, "multilabel")[1]["method"] == "mean"
