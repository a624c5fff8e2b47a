"""The report's plots: matplotlib figures drawn to SVG text, one function per plot.

Each function takes plain data from :mod:`exporters.report.data` and returns one ``<svg>``
element, ready to inline in HTML: no XML prolog, DOCTYPE or metadata (so no date and no URL), a
``<title>`` naming the plot, and every ``id`` prefixed with the plot's own name (matplotlib names
its ids ``figure_1``, ``axes_1``... in every figure, and derives the others from content hashes
salted with :data:`STYLE`'s ``svg.hashsalt``), so the same data gives the same bytes and plots do
not clash on one page. Text stays text (``svg.fonttype = none``): smaller, and searchable.

matplotlib is imported inside the functions (``Figure`` directly, never ``pyplot``: no global
backend or state is touched), so importing this module costs nothing; callers check that it is
installed first (:func:`exporters.report.require_matplotlib`).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from compress.io.summary import format_bytes
from exporters.report.data import PlanRow, Scores, Training

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: matplotlib settings for every plot (deterministic SVG, a quiet style).
STYLE: dict[str, Any] = {
    "svg.hashsalt": "dqrm-compress report",
    "svg.fonttype": "none",
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Liberation Sans", "Arial"],
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#d9dee5",
    "grid.linewidth": 0.6,
    "legend.frameon": False,
}
#: Colours: before grey-blue, baseline blue, after/compressed orange, weighted green, limits red,
#: differences purple.
BEFORE, AFTER, WEIGHTED, LIMIT, BASE = "#8fa3bf", "#dd6b20", "#2f855a", "#c53030", "#2c5282"
DIFF = "#6b46c1"
#: Figure width in inches: about the page's width, so that 9 pt text shows at about 12 px.
WIDTH = 11.0
#: Plot names: the ``id`` of the ``<figure>`` holding each one (``plot-<name>``).
PLOTS = ("bytes", "training", "reconstruction", "roc", "calibration", "parity")

_PROLOG = re.compile(r"\A.*?(?=<svg\b)", re.S)
_METADATA = re.compile(r"\s*<metadata>.*?</metadata>", re.S)
_ID = re.compile(r'\bid="([^"]+)"')
_REF = re.compile(r'((?:xlink:)?href="#|url\(#)([^")]+)')
_SIZE = re.compile(r'\s(?:width|height)="[^"]*"')


@contextmanager
def _style() -> Iterator[None]:
    import matplotlib

    with matplotlib.rc_context(STYLE):
        yield


def _figure(width: float, height: float, **kwargs: Any) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained", **kwargs)


def clean_svg(svg: str, name: str, title: str) -> str:
    """matplotlib's SVG document as an inline element: prolog, DOCTYPE, metadata and the fixed
    size removed (CSS sizes it; the viewBox keeps its shape), ids prefixed with ``name``, a
    ``<title>`` first."""
    from html import escape

    svg = _METADATA.sub("", _PROLOG.sub("", svg, count=1))
    svg = _ID.sub(lambda m: f'id="{name}-{m.group(1)}"', svg)
    svg = _REF.sub(lambda m: f"{m.group(1)}{name}-{m.group(2)}", svg)
    head, _, rest = svg.partition(">")
    head = _SIZE.sub("", head)
    return f'{head} role="img" class="plot-svg"><title>{escape(title)}</title>{rest}'.rstrip()


def to_svg(fig: Figure, name: str, title: str, legend: Sequence[Any] | None = None) -> str:
    """``fig`` titled ``title`` (top left) with the legend of ``legend``'s axes (one row below
    the plots), as a cleaned inline ``<svg>`` (:func:`clean_svg`): no date, no creator."""
    fig.suptitle(title, x=0.01, ha="left", fontweight="bold", fontsize=10.5)
    if legend:
        handles, labels = [], []
        for ax in legend:
            h, lab = ax.get_legend_handles_labels()
            handles += [x for x, y in zip(h, lab, strict=True) if y not in labels]
            labels += [y for y in lab if y not in labels]
        fig.legend(handles, labels, loc="outside lower center", ncols=len(labels))
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    return clean_svg(buf.getvalue(), f"plot-{name}", title)


def _byte_ticks(lo: float, hi: float) -> tuple[list[float], list[str]]:
    """Ticks at 1 B, 32 B, 1 KiB, 32 KiB, ... covering ``[lo, hi]``, labelled in binary units."""
    ticks = [float(32**k) for k in range(0, 10) if lo / 32 <= 32**k <= hi * 32]
    return ticks, [format_bytes(t).replace(".00", "") for t in ticks]


def bytes_chart(rows: Sequence[PlanRow], title: str) -> str:
    """Horizontal bars of bytes before and after for every table and the MLPs (log scale), the
    ratio written beside each pair."""
    names = [r.name for r in rows][::-1]
    before = [r.bytes_before for r in rows][::-1]
    after = [max(1, r.bytes_after) for r in rows][::-1]
    y = np.arange(len(rows))
    with _style():
        fig = _figure(WIDTH, 1.3 + 0.3 * len(rows))
        ax = fig.add_subplot()
        ax.barh(y + 0.2, [b or 0 for b in before], 0.38, color=BEFORE, label="before")
        ax.barh(y - 0.2, after, 0.38, color=AFTER, label="after")
        ax.set_xscale("log")
        known = [b for b in before if b] + after
        lo, hi = min(known), max(known)
        ticks, labels = _byte_ticks(lo, hi)
        ax.set_xticks(ticks, labels)
        ax.set_xlim(lo / 2, hi * 12)
        for yi, b, a in zip(y, before, after, strict=True):
            text = f"{b / a:.1f}x" if b else "before: not recorded"
            ax.text(max(b or 0, a) * 1.25, yi, text, va="center", fontsize=8, color="#4a5568")
        ax.set_yticks(y, names)
        ax.grid(axis="y", visible=False)
        ax.set_xlabel("bytes (log scale)")
        return to_svg(fig, "bytes", title, [ax])


def training_chart(training: Training, title: str, control_note: str) -> str:
    """AUC and log loss of the fine-tuning evaluations against the step, the checkpoint's score
    on the same rows as a dashed line, the control run's evaluations (when recorded) as a dotted
    one, the kept step marked; ``control_note`` (the control run is not recorded; empty: nothing)
    stands in the legend."""
    points = [p for p in training.points if p.auc is not None]
    steps = [p.step for p in points]
    with _style():
        fig = _figure(WIDTH, 3.6)
        axes = fig.subplots(1, 2)
        for ax, key, label in zip(axes, ("auc", "logloss"), ("AUC", "log loss"), strict=True):
            values = [getattr(p, key) for p in points]
            ax.plot(steps, values, "o-", color=AFTER, ms=3.5, lw=1.5, label="compressed")
            if training.baseline is not None:
                ax.axhline(
                    getattr(training.baseline, key),
                    color=BASE,
                    ls="--",
                    lw=1.2,
                    label="baseline (checkpoint)",
                )
            control = [p for p in training.control or () if getattr(p, key) is not None]
            if control:
                ax.plot(
                    [p.step for p in control],
                    [getattr(p, key) for p in control],
                    "s:",
                    color=BASE,
                    ms=3,
                    lw=1.2,
                    label="control (not compressed)",
                )
            if training.best_step is not None and training.best_step in steps:
                kept = values[steps.index(training.best_step)]
                ax.plot([training.best_step], [kept], "*", color=LIMIT, ms=11, label="kept step")
            ax.set_xlabel("fine-tuning step")
            ax.set_title(f"{label} (selection slice)", loc="left")
            ax.ticklabel_format(axis="y", useOffset=False)
        if control_note:
            axes[0].plot([], [], " ", label=control_note)  # in the legend, drawing nothing
        return to_svg(fig, "training", title, [axes[0]])


def reconstruction_chart(rows: Sequence[PlanRow], title: str) -> str:
    """Relative RMSE per table, plain and (when counts were known) frequency-weighted."""
    tables = [r for r in rows if r.is_table and r.error is not None][::-1]
    y = np.arange(len(tables))
    plain = [(r.error.relative_rmse or 0.0) for r in tables]
    weighted = [r.error.weighted for r in tables]
    has_weighted = any(w is not None for w in weighted)
    with _style():
        fig = _figure(WIDTH, 1.3 + 0.28 * len(tables))
        ax = fig.add_subplot()
        h = 0.38 if has_weighted else 0.6
        ax.barh(y + (0.2 if has_weighted else 0), plain, h, color=BEFORE, label="all rows equal")
        if has_weighted:
            w = [v or 0.0 for v in weighted]
            ax.barh(y - 0.2, w, h, color=WEIGHTED, label="weighted by row frequency")
        top = max([*plain, *(v or 0.0 for v in weighted), 1e-9])
        for yi, r in zip(y, tables, strict=True):
            e = r.error
            text = "exact" if e.exact else ("not measured" if not e.measured else "")
            if not text:
                shown = [v for v in (e.relative_rmse, e.weighted) if v is not None]
                text = " / ".join(f"{v:.3g}" for v in shown)
            ax.text(
                top * 0.02 + max(plain[yi], weighted[yi] or 0), yi, text, va="center", fontsize=8
            )
        ax.set_xlim(0, top * 1.25)
        ax.set_yticks(y, [r.name for r in tables])
        ax.grid(axis="y", visible=False)
        ax.set_xlabel("relative RMSE  |V - W| / |W|")
        return to_svg(fig, "reconstruction", title, [ax])


def _label(name: str, auc: float | None) -> str:
    return name if auc is None else f"{name} (AUC {auc:.4f})"


def roc_chart(scores: Scores, aucs: dict[str, float | None], title: str) -> str:
    """ROC curves of the baseline and the compressed model, and beside them the compressed
    model's true positive rate minus the baseline's at the same false positive rate."""
    colors = {"baseline": BASE, "compressed": AFTER}
    with _style():
        fig = _figure(WIDTH, 4.4)
        ax, diff = fig.subplots(1, 2, width_ratios=[1, 1.4])
        ax.plot([0, 1], [0, 1], color="#a0aec0", lw=0.8, ls=":")
        for name, (fpr, tpr) in scores.roc.items():
            ax.plot(fpr, tpr, color=colors[name], lw=1.4, label=_label(name, aucs.get(name)))
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="false positive rate", ylabel="true positive rate")
        ax.set_aspect("equal")
        ax.set_title("ROC", loc="left")
        grid = np.linspace(0.0, 1.0, 201)
        b_fpr, b_tpr = scores.roc["baseline"]
        c_fpr, c_tpr = scores.roc["compressed"]
        delta = np.interp(grid, c_fpr, c_tpr) - np.interp(grid, b_fpr, b_tpr)
        diff.axhline(0.0, color=BASE, lw=1.0, ls="--")
        diff.plot(grid, delta, color=DIFF, lw=1.4, label="TPR difference, compressed - baseline")
        diff.set(xlim=(0, 1), xlabel="false positive rate", ylabel="difference in TPR")
        diff.set_title("true positive rate, compressed minus baseline", loc="left")
        return to_svg(fig, "roc", title, [ax, diff])


def calibration_chart(scores: Scores, title: str) -> str:
    """Observed click rate against mean predicted probability per score group, both models."""
    colors = {"baseline": BASE, "compressed": AFTER}
    marks = {"baseline": "o", "compressed": "s"}
    with _style():
        fig = _figure(WIDTH, 3.8)
        ax = fig.add_subplot()
        hi = max(max(p.predicted, p.observed) for pts in scores.calibration.values() for p in pts)
        hi = min(1.0, hi * 1.08)
        ax.plot([0, hi], [0, hi], color="#a0aec0", lw=0.8, ls=":", label="perfect calibration")
        for name, pts in scores.calibration.items():
            ax.plot(
                [p.predicted for p in pts],
                [p.observed for p in pts],
                marker=marks[name],
                ms=3.5,
                lw=1.2,
                color=colors[name],
                label=name,
            )
        ax.set(xlim=(0, hi), ylim=(0, hi), xlabel="mean predicted probability")
        ax.set_ylabel("observed click rate")
        return to_svg(fig, "calibration", title, [ax])


def parity_chart(diffs: Sequence[tuple[str, float]], atol: float | None, title: str) -> str:
    """Largest logit difference between ONNX Runtime and PyTorch per graph (log scale), with the
    tolerance the export enforced; an exact 0 is drawn at the floor and labelled."""
    floor = 1e-12
    names = [g for g, _ in diffs][::-1]
    values = [d for _, d in diffs][::-1]
    y = np.arange(len(values))
    with _style():
        fig = _figure(WIDTH, 1.3 + 0.3 * max(1, len(values)))
        ax = fig.add_subplot()
        ax.barh(y, [max(v, floor) for v in values], 0.5, color=AFTER)
        for yi, v in zip(y, values, strict=True):
            ax.text(max(v, floor) * 1.6, yi, "0 (exact)" if v == 0 else f"{v:.2g}", va="center")
        if atol is not None:
            ax.axvline(atol, color=LIMIT, ls="--", lw=1.2, label=f"tolerance {atol:g}")
        ax.set_xscale("log")
        ax.set_xlim(floor / 3, max([*values, atol or 0.0, floor]) * 30)
        ax.set_yticks(y, names)
        ax.grid(axis="y", visible=False)
        ax.set_xlabel("max |logit difference|, ONNX Runtime vs PyTorch (log scale)")
        return to_svg(fig, "parity", title, [ax])
