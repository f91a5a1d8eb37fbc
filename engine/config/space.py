"""A sweep's settings checked like every other setting, before any trial runs (and before `k8s render`
emits a sweep Job): the search space names real config keys with ranges or choices, and the metric is
one a validation produces, with its direction."""

from __future__ import annotations

from engine.config import metric_registry
from engine.config.loading import with_overrides
from engine.config.schema import Config
from engine.utils.errors import CT3DError


def metric_and_direction(cfg: Config) -> tuple[str, str]:
    metric = cfg.sweep.metric or str(cfg.metrics.key)
    if not metric_registry.is_metric(metric):
        raise CT3DError(f"config error: sweep.metric: {metric!r} is not a validation metric "
                        f"({', '.join(metric_registry.METRICS)}, auc/<label>, fbeta/<label>)")
    lower = metric_registry.direction(metric) == "min" or (metric == str(cfg.metrics.key) and cfg.metrics.mode == "min")
    return metric, "minimize" if lower else "maximize"


def check_space(cfg: Config) -> dict[str, dict]:
    """sweep.space as {key: spec}, each key a config setting and each spec a range or choices."""
    metric_and_direction(cfg)  # a bad metric name stops here, before any trial
    space = dict(cfg.sweep.space)
    if not space:
        raise CT3DError("config error: sweep.space: empty; e.g. sweep.space={train.lr: {type: log, low: 1e-4, "
                        "high: 1e-2}}")
    for key, spec in space.items():
        where = f"sweep.space.{key}"
        if not isinstance(spec, dict) or not ("choices" in spec or {"low", "high"} <= set(spec)):
            raise CT3DError(f"config error: {where}: needs {{type: float|log|int, low, high}} or {{choices: [...]}}")
        if "choices" in spec:
            if not spec["choices"] or not all(isinstance(c, (str, int, float, bool)) for c in spec["choices"]):
                raise CT3DError(f"config error: {where}.choices: needs a list of numbers, words or booleans")
            sample = spec["choices"][0]
        else:
            if spec.get("type", "float") not in ("float", "log", "int") or not spec["low"] < spec["high"]:
                raise CT3DError(f"config error: {where}: type float, log or int with low < high")
            sample = spec["low"]
        with_overrides(cfg, {key: sample}, where)  # an unknown key or a wrong type stops here
    return space
