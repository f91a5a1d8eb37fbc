"""A results table's row: (figure, measured, target, status), and how a list of seconds is written in one. Apart
from report.py so that a family's own rows (bench/distributed.py) use them without importing the report."""

from __future__ import annotations

from statistics import median

MET, MISSED, REPORTED = "met", "MISSED", "reported"


def row(figure: str, measured: str, target: str | None = None, ok: bool | None = None) -> tuple[str, str, str, str]:
    """(figure, measured, target, status): a row without a target is only reported, never met."""
    if target is None:
        return figure, measured, "", REPORTED
    return figure, measured, target, MET if ok else MISSED


def seconds_range(values: list[float]) -> str:
    return f"{median(values):.2f} s ({min(values):.2f}-{max(values):.2f})"
