"""Averaging several outputs for one volume: an ensemble's members or test-time flips. Each output is
calibrated on its own first (calibrations are fitted on single outputs), the probabilities averaged, and the
mean returned as logits whose probabilities are it, so nothing downstream calibrates again; and an ensemble's
thresholds, refit on its own probabilities where its members share a validation. Small and pure, so mutation
testing covers it (docs/testing.md)."""

from __future__ import annotations

import torch

from engine.results.calibration import apply_calibration, tune_thresholds
from engine.results.metrics import as_logits, probabilities

FLIP_AXES = (2, 3, 4)  # the spatial axes of a (batch, channel, x, y, z) batch


def mean_probability(logits: list[torch.Tensor], calibrations: list[dict | None], task: str) -> torch.Tensor:
    """Logits whose probabilities are the mean over `logits` of probabilities(apply_calibration(z, c))."""
    if len(logits) != len(calibrations):
        raise ValueError(f"{len(logits)} outputs but {len(calibrations)} calibrations")
    mean = torch.stack([probabilities(apply_calibration(z, c), task) for z, c in zip(logits, calibrations)]).mean(0)
    return as_logits(mean, task)


def flipped_views(inputs: torch.Tensor) -> list[torch.Tensor]:
    """The batch and its flips along each spatial axis, one at a time (4 views)."""
    return [inputs] + [torch.flip(inputs, dims=(axis,)) for axis in FLIP_AXES]


def mean_thresholds(per_member: list[list[float]]) -> list[float]:
    """Per label, the mean of the members' thresholds (an ensemble's decision threshold)."""
    return [sum(column) / len(column) for column in zip(*per_member)]


def ensemble_thresholds(members: list[dict], calibrations: list[dict | None], task: str) -> tuple[list[float], dict]:
    """An ensemble's per-label decision thresholds and how they were chosen: {"method": "refit", "fixed" or "mean",
    "rule", "volumes" (refit), "reason" (mean)}. `members`: per member its own "thresholds", the "rule" (None:
    unknown, "why" says why), "beta" and "fixed" threshold they were tuned with, and its best validation's
    "volumes", "logits" and "labels" (logits None where the member holds none its weights gave; "why").
    Members' thresholds were tuned for their own probabilities, not for the mean of several: with every member
    validated on the same volumes, the rule is applied again to the ensemble's own probabilities of them
    (aligned by volume, each member calibrated and averaged as the ensemble does at prediction time). Rule fixed:
    its threshold. Otherwise (members validated on other volumes, as cross-validation folds are, or tuned under
    other rules) there is no shared validation to tune on: the members' mean thresholds, with the reason."""
    mean = mean_thresholds([m["thresholds"] for m in members])
    unknown = [m for m in members if m["rule"] is None]
    if unknown:
        return mean, {"method": "mean", "rule": None, "reason": f"{unknown[0]['name']}: {unknown[0]['why']}"}
    # what each rule reads: beta for fbeta, the threshold for fixed (a tuned rule's one-class labels keep the first's)
    rules = {(m["rule"], m["beta"] if m["rule"] == "fbeta" else None, m["fixed"] if m["rule"] == "fixed" else None)
             for m in members}
    if len(rules) > 1:
        return mean, {"method": "mean", "rule": None,
                      "reason": f"the members were tuned under other rules (rule, beta, fixed): "
                                f"{sorted(rules, key=str)}"}
    ((rule, beta, fixed),) = rules
    beta, fixed = members[0]["beta"] if beta is None else beta, members[0]["fixed"] if fixed is None else fixed
    if rule == "fixed":
        return [fixed] * len(mean), {"method": "fixed", "rule": rule}
    missing = [m for m in members if m["logits"] is None]
    if missing:
        return mean, {"method": "mean", "rule": rule, "reason": f"{missing[0]['name']}: {missing[0]['why']}"}
    volumes = members[0]["volumes"]
    if any(sorted(m["volumes"]) != sorted(volumes) for m in members[1:]):
        return mean, {"method": "mean", "rule": rule, "reason": "the members validated on different volumes "
                      "(cross-validation folds do): there is no shared validation to refit on"}
    positions = [{v: i for i, v in enumerate(m["volumes"])} for m in members]
    rows = [torch.tensor([p[v] for v in volumes], dtype=torch.long) for p in positions]
    labels = [m["labels"][r].float() for m, r in zip(members, rows)]
    if any(not torch.equal(y, labels[0]) for y in labels[1:]):
        return mean, {"method": "mean", "rule": rule,
                      "reason": "the members' validations label the same volumes differently"}
    logits = [m["logits"][r].float() for m, r in zip(members, rows)]
    probs = probabilities(mean_probability(logits, calibrations, task), task)
    return tune_thresholds(probs, labels[0], rule, beta, fixed), {"method": "refit", "rule": rule,
                                                                  "volumes": len(volumes)}


def thresholds_note(record: dict) -> str:
    """One line on how an ensemble's thresholds were chosen (printed by predict, and in ensemble.json)."""
    if record["method"] == "refit":
        return (f"refit on the members' shared validation ({record['volumes']} volumes, rule {record['rule']}, "
                f"the ensemble's own probabilities)")
    if record["method"] == "fixed":
        return "the fixed threshold (metrics.threshold_rule fixed)"
    return f"the members' mean thresholds, NOT refit for the ensemble ({record['reason']})"
