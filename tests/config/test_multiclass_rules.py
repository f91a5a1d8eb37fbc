"""Multiclass decides by arg-max: a threshold rule that tunes thresholds is refused at config check, by key."""

import pytest

from engine.config.loading import load_config
from engine.utils.errors import CT3DError

MULTICLASS = ("data.demo.enabled=true", "data.task=multiclass", "data.num_classes=3")


@pytest.mark.parametrize("rule", ["youden", "fbeta"])
def test_a_tuned_threshold_rule_is_refused_for_multiclass(rule):
    with pytest.raises(CT3DError) as info:
        load_config(None, [*MULTICLASS, f"metrics.threshold_rule={rule}"])
    message = str(info.value)
    assert message.startswith("config error: metrics.threshold_rule: ") and "\n" not in message
    assert rule in message and "arg-max" in message and "fixed" in message


def test_the_fixed_rule_for_multiclass_and_tuned_rules_elsewhere_load():
    assert str(load_config(None, list(MULTICLASS)).metrics.threshold_rule) == "fixed"
    for task in ("multilabel", "binary"):
        cfg = load_config(None, ["data.demo.enabled=true", f"data.task={task}", "metrics.threshold_rule=youden"])
        assert str(cfg.metrics.threshold_rule) == "youden"


def test_validation_tunes_no_threshold_for_multiclass():
    """Even handed a tuning rule (a run from before the refusal), multiclass validation keeps the fixed threshold;
    the same outputs read as multilabel do get tuned ones (so this test sees a tuned threshold when there is one)."""
    import torch

    from engine.training.handlers import ValidationMetrics

    generator = torch.Generator().manual_seed(0)
    classes = torch.arange(30) % 3
    labels = torch.nn.functional.one_hot(classes, 3).float()
    logits = 2 * labels + torch.randn(30, 3, generator=generator)  # each class likelier on its own volumes
    thresholds = {}
    for task in ("multiclass", "multilabel"):
        validation = ValidationMetrics(["a", "b", "c"], task, torch.nn.functional.cross_entropy, 0.5, 1.0, "youden")
        _, thresholds[task], *_ = validation._decide(logits, labels)
    assert thresholds["multiclass"] == [0.5] * 3
    assert thresholds["multilabel"] != [0.5] * 3
