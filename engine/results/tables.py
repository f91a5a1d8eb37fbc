"""report.html's tables: the best validation's figures with their intervals, the held-out test set's, the labels
each macro figure left out and why, and each label's decisions and calibration (ECE with its interval and the
floor a perfectly calibrated model would show at this size). Plain HTML from summary.json's dictionaries."""

from __future__ import annotations

import html
import math

from engine.config.metric_registry import table_names


def format_value(v) -> str:
    """A metric for a table: 4 decimals, n/a for None or NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def interval_text(interval) -> str:
    """"low to high", n/a for a missing or undefined interval."""
    if not interval or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in interval):
        return "n/a"
    return f"{format_value(interval[0])} to {format_value(interval[1])}"


def label_flag(block: dict, name: str) -> str:
    """Why a label is out of `block`'s macro figures (a run's summary or its test block), or ""."""
    below = block.get("below_min_positive") or {}
    if name in below:
        return (f" (only {below[name]} positive patients: out of the macro figures, interval unreliable)")
    if name in (block.get("auc_left_out") or []):
        return " (one class only: undefined, out of the macro figures)"
    return ""


def macro_note(block: dict, names: list[str], where: str) -> str:
    """Which labels `block`'s macro figures average, and which it left out and why."""
    below = block.get("below_min_positive") or {}
    left_out = block.get("auc_left_out") or []
    rule = block.get("min_positive_patients")
    text = (f"Macro figures average {block.get('auc_macro_labels', len(names))} of {len(names)} labels"
            + (f" (both classes and at least {rule} positive patients in {where})" if rule else ""))
    if left_out:
        text += f"; left out, one class only in {where}: {html.escape(', '.join(left_out))}"
    if below:
        text += ("; left out, too few positive patients (listed apart, intervals unreliable): "
                 + html.escape(", ".join(f"{n} ({k})" for n, k in below.items())))
    return f"<p>{text}.</p>"


def left_out_text(single: list[str], below: dict[str, int], min_positive, qualifier: str = "") -> str:
    """"one class only: a, b; under K positive patients<qualifier>: c (3)", or "" when nothing was left out: the
    labels a macro figure left out, as the closing table, evaluate and the CV report word them."""
    return "; ".join(([f"one class only: {', '.join(single)}"] if single else [])
                     + ([f"under {min_positive} positive patients{qualifier}: "
                         + ", ".join(f"{n} ({k})" for n, k in below.items())] if below else []))


def macro_labels_of(block: dict, names: list[str]) -> list[str]:
    """The labels `block`'s macro figures averaged."""
    out = set(block.get("auc_left_out") or []) | set(block.get("below_min_positive") or {})
    return [n for n in names if n not in out]


def _figure_rows(values: dict, intervals: dict, keys: list[str], block: dict) -> str:
    return "".join(f"<tr><td>{html.escape(k)}</td><td>{format_value(values.get(k))}</td><td>"
                   + interval_text(intervals.get(k)) + (label_flag(block, k.split("/", 1)[1]) if "/" in k else "")
                   + "</td></tr>" for k in keys)


def _ece_cell(calibration: dict, name: str | None) -> str:
    """ECE, its interval and the perfectly calibrated floor (`name` None: the macro's)."""
    if name is None:
        value, interval, floor = (calibration.get("ece_macro"), calibration.get("ece_macro_interval"),
                                  calibration.get("ece_macro_floor"))
    else:
        value = calibration["ece"][name]
        interval = (calibration.get("ece_interval") or {}).get(name)
        floor = (calibration.get("ece_floor") or {}).get(name)
    return (f"<td>{format_value(value)}</td><td>{interval_text(interval)}</td><td>{format_value(floor)}</td>")


def calibration_html(summary: dict) -> str:
    """Each label's threshold, calibration (scale, intercept) and ECE with its interval and floor."""
    fmt, names, calibration = format_value, summary["labels"], summary["calibration"]
    scale, intercept = calibration.get("scale") or {}, calibration.get("intercept") or {}
    rows = "".join(f"<tr><td>{html.escape(n)}</td><td>{fmt(summary['thresholds'][n])}</td><td>{fmt(scale.get(n))}"
                   f"</td><td>{fmt(intercept.get(n))}</td>{_ece_cell(calibration, n)}</tr>" for n in names)
    rows += f"<tr><td>macro</td><td></td><td></td><td></td>{_ece_cell(calibration, None)}</tr>"
    top = calibration.get("ece_top_label")
    kind = calibration.get("ece_kind", "per label")
    extra = (f" Multiclass: ECE here is one-vs-rest per class; the top-label ECE (the top probability against "
             f"whether the top class is right) is {fmt(top)}." if top is not None else "")
    return (f"<p>ECE ({html.escape(kind)}): expected calibration error over {calibration['bins']} probability bins, "
            f"with its 95% patient bootstrap interval and the floor: the ECE a perfectly calibrated model would "
            f"show on this many volumes (noise alone; an ECE near its floor is no evidence of miscalibration)."
            f"{extra}</p><table><tr><th>label</th><th>threshold</th><th>scale</th><th>intercept</th><th>ECE</th>"
            f"<th>95% interval</th><th>floor</th></tr>{rows}</table>")


def statistics_html(summary: dict) -> str:
    """The best epoch's figures with their bootstrap intervals, how the macro figures were averaged, and each
    label's threshold, calibration (scale and intercept) and calibration error."""
    if "thresholds" not in summary:
        return ""
    best, names = summary["best"], summary["labels"]
    boot = summary.get("bootstrap")
    keys = ["auc_macro", "fbeta_macro"] + [f"{m}/{n}" for n in names for m in ("auc", "fbeta")]
    rows = _figure_rows(best, boot["intervals"] if boot else {}, keys, summary)
    degenerate = (boot or {}).get("degenerate", {}).get("auc_macro", 0)
    head = (f"<p>95% intervals for the population's value: bias-corrected and accelerated (BCa) bootstrap over "
            f"{boot['patients']} validation patients ({boot['resamples']} resamples, each patient's volumes kept "
            f"together). Every resample averages the same labels for the macro figures; {degenerate} resamples in "
            f"which one of them had a single class were left out. These are figures of the selection set: the "
            f"epoch, thresholds and calibration were chosen on it, so they are optimistic. A wide interval means "
            f"the validation set is too small to tell models apart.</p>" if boot else
            "<p>No intervals (metrics.bootstrap=0).</p>")
    head += macro_note(summary, names, "validation")
    rule = summary.get("threshold_rule", "fixed")
    note = ("" if rule == "fixed" else f" Thresholds tuned on this validation set ({rule}): F-beta here is "
            "optimistic; evaluate on held-out data for an unbiased figure.")
    return (f"<h2>Best epoch with 95% intervals (selection set)</h2>{head}<table><tr><th>metric</th><th>value</th>"
            f"<th>95% interval</th></tr>{rows}</table><h2>Decisions and calibration</h2><p>Threshold rule: "
            f"{html.escape(rule)}.{note} Calibration (metrics.calibrate; n/a: not calibrated): probability = "
            f"sigmoid(logit x scale + intercept), fitted on this validation set (Platt scaling, the scale kept at 0 "
            f"or above; the intercept undoes the shift pos_weight gives every logit; multiclass: one shared scale, a "
            f"temperature). AUC ranks the uncalibrated outputs: calibration never changes it.</p>"
            f"{calibration_html(summary)}")


def test_html(summary: dict) -> str:
    """The held-out test set's figures (the ones to publish) with their BCa intervals, the labels its macro figures
    left out, and a note when validation's macro averaged other labels; nothing without a test set."""
    test = summary.get("test")
    if not test:
        return ""
    names = summary["labels"]
    keys = [k for k in table_names() if k in test["metrics"]] + [f"auc/{n}" for n in names]
    rows = _figure_rows(test["metrics"], (test.get("bootstrap") or {}).get("intervals", {}), keys, test)
    differ = ""
    if "thresholds" in summary and macro_labels_of(summary, names) != macro_labels_of(test, names):
        differ = (f"<p><b>Validation and test average different labels</b> (validation: "
                  f"{html.escape(', '.join(macro_labels_of(summary, names)) or 'none')}; test: "
                  f"{html.escape(', '.join(macro_labels_of(test, names)) or 'none')}): their macro figures are not "
                  f"the same quantity.</p>")
    return (f"<h2>Held-out test set: the figures to publish</h2><p>{test['volumes']} volumes of {test['patients']} "
            f"patients that training never looked at, scored once with the best epoch's network, thresholds and "
            f"calibration (chosen on validation). Intervals: 95% BCa bootstrap over the test patients, for the "
            f"population's value.</p>{macro_note(test, names, 'the test set')}{differ}<table><tr><th>metric</th>"
            f"<th>value</th><th>95% interval</th></tr>{rows}</table>")


def encoder_html(summary: dict) -> str:
    """A pretrained encoder's weights (summary.json's `encoder`): where from, hub commit, SHA-256, licence."""
    record, e = summary.get("encoder") or {}, html.escape
    at, probe = f" at hub revision {record.get('revision')}" if record.get("revision") else "", \
        " The head trained on its cached embeddings (frozen encoder)." if summary.get("embeddings") else ""
    return (f"<p>Encoder {e(str(record.get('encoder')))}: weights {e(str(record.get('source') or record.get('file')))}"
            f"{e(at)}, SHA-256 {e(str(record.get('sha256')))}, licence {e(str(record.get('licence') or 'unknown'))}."
            f"{probe}</p>" if record else "")
