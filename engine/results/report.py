"""The end-of-run report: `report.png` (every panel on one page) and a self-contained `report.html`
(the same panels embedded, plus the best-epoch summary and the config). Every panel is drawn from
data the run computed: metrics.csv rows, the LR history and the best epoch's validation outputs."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import torch

from engine.results.calibration import expected_calibration_error, reliability
from engine.results.images import png
from engine.results.metrics import confusion, roc_points
from engine.results.tables import encoder_html, format_value, statistics_html, test_html
from engine.utils.io import atomic_write, write_text


def roc_curve(probs: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[float]]:
    """False and true positive rates at every distinct threshold."""
    _, tps, fps = roc_points(probs, labels)
    pos, neg = max(float(labels.sum()), 1.0), max(float((1 - labels).sum()), 1.0)
    return [0.0] + (fps / neg).tolist(), [0.0] + (tps / pos).tolist()


def _column(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None and not math.isnan(r[key])]
    return [e for e, _ in pairs], [v for _, v in pairs]


def _losses(ax, rows, **_):
    for key, label in (("train_loss", "training"), ("val_loss", "validation")):
        ax.plot(*_column(rows, key), marker="o", label=label)
    ax.set(title="Loss per epoch", xlabel="epoch", ylabel="loss (log scale)", yscale="log")
    ax.legend()


def _scores(ax, rows, beta, **_):
    ax.plot(*_column(rows, "auc_macro"), marker="o", label="ROC AUC macro")
    ax.plot(*_column(rows, "fbeta_macro"), marker="s", label=f"F{beta:g} macro")
    ax.set(title="Validation scores per epoch", xlabel="epoch", ylim=(0, 1.02))
    ax.legend()


def _lr(ax, lr_history, **_):
    ax.plot([i for i, _ in lr_history], [v for _, v in lr_history])
    ax.set(title="Learning rate", xlabel="iteration", ylabel="lr")


def _label_legend(ax, names: list[str], where: str) -> None:
    """A legend of the labels' curves when each has a colour of its own (matplotlib's cycle has ten): beyond
    that the colours repeat and the legend misleads; the per-label table and bars name them instead. A fixed
    place: "best" tests every point of every curve."""
    if len(names) <= 10:
        ax.legend(fontsize="small", loc=where)


def _roc(ax, probs, labels, names, ranked=None, **_):  # ranked: the raw outputs, which the AUCs reported rank
    ranked = probs if ranked is None else ranked.float()
    for j, name in enumerate(names):
        if labels[:, j].min() != labels[:, j].max():
            ax.plot(*roc_curve(ranked[:, j], labels[:, j]), label=name)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set(title="ROC curves (best epoch)", xlabel="false positive rate", ylabel="true positive rate")
    _label_legend(ax, names, "lower right")


def _auc_bars(ax, best, names, **_):
    values = [best.get(f"auc/{n}") for n in names]
    values = [0.0 if v is None or math.isnan(v) else v for v in values]
    ax.barh(names, values)
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.3f}", va="center", fontsize="small")
    ax.set(title="ROC AUC per label (best epoch)", xlim=(0, 1.1))
    ax.invert_yaxis()


def _confusion_bars(ax, probs, labels, names, task, thresholds, **_):
    counts = confusion(probs, labels, task, thresholds)  # tp, fp, tn, fn per label
    left = torch.zeros(len(names))
    colours = ("tab:green", "tab:red", "tab:blue", "tab:orange")
    for k, (name, colour) in enumerate(zip(("TP", "FP", "TN", "FN"), colours)):
        ax.barh(names, counts[:, k].tolist(), left=left.tolist(), label=name, color=colour)
        left += counts[:, k]
    at = f"threshold {thresholds[0]:g}" if len(set(thresholds)) == 1 else "each label's threshold"
    ax.set(title=f"Confusion counts at {at} (best epoch)", xlabel="volumes")
    ax.invert_yaxis()
    ax.legend(ncol=4, fontsize="small")


def _reliability(ax, probs, labels, names, bins, **_):
    table, ece = reliability(probs, labels, bins), expected_calibration_error(probs, labels, bins)
    for j, name in enumerate(names):
        used = table[j, :, 2] > 0
        ax.plot(table[j, used, 0].tolist(), table[j, used, 1].tolist(), marker="o", label=f"{name} (ECE {ece[j]:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set(title=f"Reliability, {bins} bins (best epoch)", xlabel="mean predicted probability",
           ylabel="fraction positive", xlim=(0, 1), ylim=(0, 1.02))
    _label_legend(ax, names, "upper left")


PANELS = (_losses, _scores, _lr, _roc, _auc_bars, _confusion_bars, _reliability)


def png_bytes(fig, dpi: int = 90, tight: bool = True) -> bytes:
    """A matplotlib figure as PNG bytes, for report pages (this one, cv's and the sweep's). `tight`: laid out
    to fit its text first (rather than saved with bbox_inches="tight", which draws the figure twice)."""
    if tight:
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, pil_kwargs={"compress_level": 1})  # the fastest zlib level
    return buf.getvalue()


def draw_panels(rows: list[dict], lr_history: list[tuple[int, float]], probs: torch.Tensor, labels: torch.Tensor,
                names: list[str], task: str, thresholds: list[float], beta: float, best: dict, bins: int = 10,
                title: str = "", dpi: int = 90, ranked: torch.Tensor | None = None) -> tuple[list[bytes], bytes]:
    """(each panel as a PNG, the page of all of them under `title` as a PNG): one figure drawn once, two
    panels to a row, each panel's PNG cut from it (a figure per panel cost a third more in matplotlib's
    fixed work per figure). Fixed margins, the bar panels' left one wide enough for the longest label:
    measuring every text to lay them out cost a quarter of drawing them."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = dict(rows=rows, lr_history=lr_history, probs=probs.float(), labels=labels.float(), names=names,
                task=task, thresholds=list(thresholds), beta=beta, best=best, bins=bins, ranked=ranked)
    bars = max(4.0, 0.35 * len(names) + 1.5)
    layout = [((_losses, _scores), 4.5), ((_lr, _roc), 4.5), ((_auc_bars, _confusion_bars), bars),
              ((_reliability,), 4.5)]  # (panels of a row, its height in inches), in PANELS' order
    name_inches = min(4.2, 0.3 + 0.075 * max((len(n) for n in names), default=0))
    width, head = 7.0, 0.4  # inches: a panel's width, the title's strip
    height = head + sum(h for _, h in layout)
    fig = Figure(figsize=(2 * width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    fig.text(0.005, 1 - 0.08 / height, title, va="top", fontsize="large")
    cells, top = [], head
    for panels, h in layout:
        for column, panel in enumerate(panels):
            left = column * width + (name_inches if panel in (_auc_bars, _confusion_bars) else 1.05)
            ax = fig.add_axes([left / (2 * width), 1 - (top + h - 0.55) / height,
                               (column * width + 0.95 * width - left) / (2 * width), (h - 1.0) / height])
            panel(ax, **data)
            cells.append((column * width, top, width, h))
        top += h
    fig.canvas.draw()
    page = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    crops = [page[round(y * dpi):round((y + h) * dpi), round(x * dpi):round((x + w) * dpi)] for x, y, w, h in cells]
    return [png(crop) for crop in crops], png(page)


def write_report(folder: Path, panels: list[bytes], page: bytes, summary: dict, config_yaml: str,
                 sections: list[tuple[str, bytes]] = ()) -> tuple[Path | None, Path]:
    """Writes report.png (`page`, every panel; none when `page` is empty: report.panels=false) and report.html
    (the `panels`, the summary with its intervals, then `sections` (title, PNG): the saliency and input views)
    into `folder`; returns their paths."""
    png_path, html_path = folder / "report.png", folder / "report.html"
    if page:
        with atomic_write(png_path) as tmp:
            tmp.write_bytes(page)
    else:  # an earlier attempt's panels (a resumed run) are not this run's
        png_path.unlink(missing_ok=True)
    write_text(html_path, _html(panels, summary, config_yaml, sections))
    return png_path if page else None, html_path


def report_title(summary: dict) -> str:
    return (f"ct3d run {Path(summary['run']).name}: best epoch {summary['best_epoch']}, "
            f"{summary['key_metric']} {summary['best'][summary['key_metric']]:.4f}")


def img_tag(png: bytes, alt: str) -> str:
    """An <img> with the PNG inline, so a report page is one self-contained file."""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


SALIENCY_NOTE = ("<p>Grad-CAM heat maps (MONAI) for each label at the best epoch: the volumes the model scored "
                 "highest among the positives, and the negatives it scored highest above the threshold. Each row "
                 "shows axial, coronal and sagittal slices through the map's peak; red is where the evidence "
                 "for the label lay. A map that lights the body's edge, the table or air points at a shortcut, "
                 "not a finding.</p>")


def _html(images: list[bytes], summary: dict, config_yaml: str, sections: list[tuple[str, bytes]]) -> str:
    fmt = format_value

    best, final = summary["best"], summary["final"]
    stopped = " (stopped early)" if summary.get("stopped_early") else ""
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{fmt(best.get(k))}</td><td>{fmt(final.get(k))}</td></tr>"
                   for k in best if k not in ("seconds",))
    figures = "".join(img_tag(b, f"panel {i + 1}") for i, b in enumerate(images))
    extra = "".join(f"<h2>{html.escape(title)}</h2>{img_tag(png, title)}" for title, png in sections)
    if any(title.startswith("Where the model looked") for title, _ in sections):
        extra = SALIENCY_NOTE + extra
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ct3d report {html.escape(Path(summary['run']).name)}</title>
<style>body{{font-family:sans-serif;margin:2em}} img{{max-width:48%;margin:0.5%}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}} td:first-child{{text-align:left}}</style></head>
<body><h1>ct3d run {html.escape(Path(summary['run']).name)}</h1>
<p>{summary['train_volumes']} training and {summary['val_volumes']} validation volumes, task {summary['task']},
device {html.escape(summary['device'])}, wall time {summary['wall_seconds']:.0f} s.
Best epoch {summary['best_epoch']} by {summary['key_metric']}{stopped}. Validation is the selection set: the
epoch, thresholds and calibration were chosen on it, so its figures are optimistic{
    '; the held-out test set below is not' if summary.get('test') else ' (no held-out test set: data.test)'}.</p>
{encoder_html(summary)}
{test_html(summary)}
{figures}
{statistics_html(summary)}
{extra}
<h2>Best and final validation (selection set)</h2>
<table><tr><th>metric</th><th>best</th><th>final</th></tr>{rows}</table>
<h2>Config</h2><pre>{html.escape(config_yaml)}</pre></body></html>
"""
