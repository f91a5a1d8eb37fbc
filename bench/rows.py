"""A results table's row: (figure, measured, target, status), and the pieces each family's `rows(f)` writes one
with: a ratio met only when its whole spread clears the target, a median with its spread, seconds as a range."""

from __future__ import annotations

from statistics import median

MET, MISSED, REPORTED = "met", "MISSED", "reported"
Row = tuple[str, str, str, str]


def row(figure: str, measured: str, target: str | None = None, ok: bool | None = None) -> Row:
    """(figure, measured, target, status): a row without a target is only reported, never met."""
    if target is None:
        return figure, measured, "", REPORTED
    return figure, measured, target, MET if ok else MISSED


def ratio_row(figure: str, median: float, spread: tuple[float, float], target: float, lower_is_better: bool,
              unit: str = "x") -> Row:
    """A ratio with its spread over the repeats; met only when the whole spread is on the target's right
    side (a target inside the noise band is not met)."""
    low, high = spread
    ok = high <= target if lower_is_better else low >= target
    return row(figure, f"{median:.3g}{unit} (spread {low:.3g}-{high:.3g})", f"{'<=' if lower_is_better else '>='} "
               f"{target:g}{unit}", ok)


def median_spread(values: list[float], digits: str = ".3g") -> str:
    """A figure's median over the repeats and its spread (min-max), as the two-sided rows print them."""
    return f"{median(values):{digits}}x (spread {min(values):{digits}}-{max(values):{digits}})"


def band(numerators: list[float], denominators: list[float]) -> tuple[float, float]:
    """The widest spread of a ratio of two repeated figures: lowest over highest, highest over lowest."""
    return min(numerators) / max(denominators), max(numerators) / min(denominators)


def seconds_range(values: list[float]) -> str:
    return f"{median(values):.2f} s ({min(values):.2f}-{max(values):.2f})"
