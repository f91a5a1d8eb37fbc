"""The metric registry: every validation figure by name, with its direction, whether it rests on decision
thresholds, how it is printed and where it shows. The config checks (metrics.key, sweep.metric), the metrics'
computation, metrics.csv, the closing table, the report, sweeps and early stopping all read it, so adding a
metric is one `register(Metric(...))`: a `compute(probs, labels, decided)` on the (N, C) validation tensors
gives its value. The built-in figures are computed together (they share one confusion matrix) in
engine.results.metrics and carry no `compute`. Standard library only: config checks must not import torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

PER_LABEL = ("auc", "fbeta")  # per-label figures: "auc/<label>", "fbeta/<label>"


@dataclass(frozen=True)
class Metric:
    name: str
    direction: str = "max"  # "max": higher is better; "min": lower is better
    thresholds: bool = False  # the figure depends on the decision thresholds (metrics.threshold_rule)
    format: str = ".4f"  # how tables print it
    table: bool = True  # in the closing table and the report's best/final table
    selectable: bool = True  # may be metrics.key (pick best.pt, stop early); not a count such as auc_labels
    compute: Callable | None = None  # (probs, labels, decided) -> float; None: a built-in computed elsewhere

    def __post_init__(self):
        if self.direction not in ("max", "min"):
            raise ValueError(f"metric {self.name}: direction must be 'max' or 'min', got {self.direction!r}")
        if not self.name or "/" in self.name:
            raise ValueError(f"metric name {self.name!r}: a word without '/' (per-label figures are built in)")

    def text(self, value: float | None) -> str:
        return "n/a" if value is None else f"{value:{self.format}}"


METRICS: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    """Adds `metric` (a name already taken is replaced: a test's toy metric may be registered twice)."""
    METRICS[metric.name] = metric
    return metric


def unregister(name: str) -> None:
    METRICS.pop(name, None)


for _metric in (
    Metric("val_loss", "min"),
    Metric("auc_macro"),
    Metric("auc_labels", table=False, format=".0f", selectable=False),  # how many labels macro AUC averaged
    Metric("auc_micro"),
    Metric("fbeta_macro", thresholds=True),
    Metric("fbeta_micro", thresholds=True),
    Metric("precision", thresholds=True),
    Metric("recall", thresholds=True),
    Metric("specificity", thresholds=True),
    Metric("accuracy", thresholds=True),
    Metric("ece_macro", "min", table=False),
):
    register(_metric)


def is_metric(name: str) -> bool:
    """A registered figure, or a per-label one (auc/<label>, fbeta/<label>)."""
    return name in METRICS or name.split("/", 1)[0] in PER_LABEL and "/" in name


def direction(name: str) -> str:
    """"max" or "min" for a registered or per-label figure (per-label AUC and F-beta: higher is better)."""
    return METRICS[name].direction if name in METRICS else "max"


def computed() -> list[Metric]:
    """The registered metrics with a `compute` of their own (added after the built-ins)."""
    return [m for m in METRICS.values() if m.compute is not None]


def selectable() -> list[str]:
    """The names metrics.key accepts."""
    return [name for name, m in METRICS.items() if m.selectable]


def table_names() -> list[str]:
    return [name for name, m in METRICS.items() if m.table]
