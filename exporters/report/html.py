"""The report as one self-contained HTML page: inline CSS, inline SVG plots, no script, no URL.

:func:`render_html` takes the :class:`~exporters.report.data.Report` and the plots already drawn
(``{name: <svg>}``, :mod:`exporters.report.plots`) and returns the page. Every value from the
artifacts is escaped. Each plot sits in ``<figure id="plot-<name>">`` with a caption; a section
whose data is not recorded says so in place of its plot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

from compress.io.summary import format_bytes
from exporters.report.data import CONTROL, Metrics, PlanRow, Report

CSS = """
:root { --ink: #1a202c; --muted: #5a6577; --line: #e2e8f0; --card: #f7fafc; --accent: #dd6b20;
        --base: #2c5282; --bad: #c53030; --good: #2f855a; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff;
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 28px 32px 48px; }
header { border-bottom: 3px solid var(--accent); padding-bottom: 10px; margin-bottom: 18px; }
h1 { font-size: 24px; margin: 0; }
h1 .arrow { color: var(--accent); }
h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
.sub, .caption, figcaption, .muted { color: var(--muted); }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(200px, 1fr)); gap: 12px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; }
.card .label { font-size: 12px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); }
.card .value { font-size: 18px; font-weight: 600; }
.card .delta { font-size: 13px; color: var(--muted); }
.good { color: var(--good); } .bad { color: var(--bad); }
table { border-collapse: collapse; width: 100%; font-size: 13px; margin: 6px 0 10px; }
th, td { padding: 4px 8px; border-bottom: 1px solid var(--line); text-align: left; white-space: nowrap; }
th { background: var(--card); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.dense td { background: #fffaf0; }
figure { margin: 10px 0 18px; }
figure svg { width: 100%; height: auto; display: block; }
figcaption { font-size: 12.5px; margin-top: 4px; }
.grid2 { display: grid; grid-template-columns: 1fr 1fr; gap: 18px; }
.missing { background: #fffaf0; border: 1px solid #fbd38d; border-radius: 8px; padding: 8px 14px; }
.missing h2 { border: 0; margin: 2px 0; font-size: 14px; }
.missing ul { margin: 4px 0; padding-left: 20px; }
.gate-failed { background: #fff5f5; border: 1px solid #feb2b2; border-radius: 8px; padding: 8px 14px; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 3px 16px; margin: 6px 0; }
dt { color: var(--muted); } dd { margin: 0; overflow-wrap: anywhere; }
pre { background: var(--card); border: 1px solid var(--line); padding: 10px; font-size: 12px;
      overflow-x: auto; }
footer { margin-top: 30px; font-size: 12px; color: var(--muted); }
"""

#: The models of the quality table, with how they are labelled.
MODELS = (
    ("baseline", "baseline (the checkpoint)"),
    ("before_finetune", "compressed, before fine-tuning"),
    ("compressed", "compressed"),
    ("control", "control (the same fine-tuning, not compressed)"),
)


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _bytes(n: int | None) -> str:
    return "not recorded" if n is None else format_bytes(n)


def _signed(x: float, digits: int = 4) -> str:
    return f"{x:+.{digits}f}".replace("-", "\u2212")


def _card(label: str, value: str, delta: str = "", cls: str = "") -> str:
    d = f'<div class="delta {cls}">{delta}</div>' if delta else ""
    return f'<div class="card"><div class="label">{_e(label)}</div><div class="value">{value}</div>{d}</div>'


def _cards(r: Report) -> str:
    cards = []
    if r.bytes_before is not None and r.bytes_after:
        ratio = r.bytes_before / r.bytes_after
        cards.append(
            _card(
                "size",
                f"{_e(_bytes(r.bytes_before))} &rarr; {_e(_bytes(r.bytes_after))}",
                f"{ratio:.1f}x smaller",
                "good",
            )
        )
    base, comp = r.metrics.get("baseline"), r.metrics.get("compressed")
    if base is not None and comp is not None:
        d_auc, d_ll = comp.auc - base.auc, comp.logloss - base.logloss
        cards.append(
            _card(
                "AUC",
                f"{base.auc:.4f} &rarr; {comp.auc:.4f}",
                f"{_signed(d_auc)} vs baseline",
                "good" if d_auc >= -0.001 else "bad",
            )
        )
        cards.append(
            _card(
                "log loss",
                f"{base.logloss:.4f} &rarr; {comp.logloss:.4f}",
                f"{_signed(d_ll)} vs baseline",
                "good" if d_ll <= 0.001 else "bad",
            )
        )
    if r.parity is not None and r.parity.max_abs_diff:
        worst = max(d for _, d in r.parity.max_abs_diff)
        ok = r.parity.atol is None or worst <= r.parity.atol
        limit = "" if r.parity.atol is None else f" &le; {r.parity.atol:g}"
        cards.append(
            _card(
                "ONNX Runtime parity",
                f"{worst:.2g}",
                f"max |logit diff|{limit}",
                "good" if ok else "bad",
            )
        )
    return f'<section class="cards">{"".join(cards)}</section>' if cards else ""


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int], cls=None) -> str:
    def cell(tag: str, i: int, v: str) -> str:
        return f'<{tag} class="num">{v}</{tag}>' if i in numeric else f"<{tag}>{v}</{tag}>"

    th = "".join(cell("th", i, _e(h)) for i, h in enumerate(head))
    body = []
    for k, row in enumerate(rows):
        c = f' class="{cls[k]}"' if cls and cls[k] else ""
        body.append(f"<tr{c}>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _metric_cells(m: Metrics | None) -> list[str]:
    if m is None:
        return ["&ndash;"] * 4
    return [f"{m.auc:.4f}", f"{m.logloss:.4f}", f"{m.accuracy:.4f}", f"{m.n:,}"]


def _quality(r: Report) -> str:
    rows = [
        [_e(label), *_metric_cells(r.metrics.get(key))]
        for key, label in MODELS
        if key not in ("before_finetune", "control") or r.metrics.get(key) is not None
    ]
    on = (
        f"Measured on {_e(r.metrics_slice)} (the report slice, never used to choose the kept step)."
        if r.metrics_slice
        else "No validation data was given: nothing was scored."
    )
    table = _table(["model", "AUC", "log loss", "accuracy", "rows"], rows, {1, 2, 3, 4})
    return f'<h2>Quality</h2>{table}<p class="caption">{on}</p>'


def _error_text(row: PlanRow, weighted: bool) -> str:
    e = row.error
    if e is None:
        return "&ndash;"
    if e.exact:
        return "0 (exact)"
    if not e.measured:
        return "not measured"
    v = e.weighted if weighted else e.relative_rmse
    return "&ndash;" if v is None else f"{v:.4g}"


def _plan(r: Report, figure: str) -> str:
    head = ["table", "rows x dim", "method", "bits", "granularity", "rule"]
    head += ["bytes before", "bytes after", "smaller", "rel. RMSE", "rel. RMSE (weighted)"]
    rows, classes = [], []
    for p in r.plan:
        ratio = (
            f"{p.bytes_before / p.bytes_after:.1f}x"
            if p.bytes_before and p.bytes_after
            else "&ndash;"
        )
        rows.append(
            [
                f"<b>{_e(p.name)}</b>",
                _e(p.shape),
                _e(p.method),
                "&ndash;" if p.bits is None else str(p.bits),
                _e(p.detail),
                _e(p.rule),
                _e(_bytes(p.bytes_before)),
                _e(_bytes(p.bytes_after)),
                ratio,
                _error_text(p, False) if p.is_table else "",
                _error_text(p, True) if p.is_table else "",
            ]
        )
        classes.append("" if p.is_table else "dense")
    table = _table(head, rows, {1, 3, 6, 7, 8, 9, 10}, classes)
    return f"<h2>Plan</h2>{table}{figure}"


def _figure(name: str, svgs: Mapping[str, str], caption: str) -> str:
    svg = svgs.get(name)
    if svg is None:
        return ""
    return f'<figure id="plot-{name}">{svg}<figcaption>{caption}</figcaption></figure>'


def _absent(what: str) -> str:
    return f'<p class="missing-note muted">{_e(what)}: not recorded.</p>'


def _training(r: Report, svgs: Mapping[str, str]) -> str:
    t = r.training
    if t is None:
        return (
            f"<h2>Fine-tuning</h2>{_absent('Fine-tuning curves (the recipe does not fine-tune)')}"
        )
    kept = (
        f"Kept step {t.best_step} of {t.steps}, chosen by {_e(t.metric)} on the selection slice."
        if t.best_step is not None and t.metric
        else "No step was chosen on validation data."
    )
    on = f" Evaluations on {_e(t.slice)}." if t.slice else ""
    base = (
        " The dashed line is the checkpoint scored on the same rows."
        if t.baseline is not None
        else " The checkpoint's score on these rows is not recorded."
    )
    control = (
        f" The dotted line is the control ({CONTROL}), evaluated on the same rows."
        if t.control
        else f" Control ({CONTROL}): not recorded (--control runs it)."
    )
    caption = f"{kept}{on}{base}{control}"
    body = _figure("training", svgs, caption) or f'<p class="caption">{caption}</p>'
    return f"<h2>Fine-tuning</h2>{body}"


def _reconstruction(r: Report, svgs: Mapping[str, str]) -> str:
    weights = (
        f" The weighted figure weighs each row by its {_e(r.reconstruction_weights)}."
        if r.reconstruction_weights
        else ""
    )
    caption = (
        "Relative RMSE of each stored table against the checkpoint's: sqrt(&Sigma;|V<sub>i</sub> "
        "&minus; W<sub>i</sub>|&sup2; / &Sigma;|W<sub>i</sub>|&sup2;) over its rows, V the rows the "
        "compressed model looks up (dequantized, after fine-tuning when the recipe fine-tunes), W "
        f"the checkpoint's.{weights}"
    )
    sampled = [
        f"{_e(p.name)} {p.error.rows_measured:,} of {p.rows:,}"
        for p in r.plan
        if p.error is not None
        and p.error.rows_measured
        and p.rows
        and p.error.rows_measured < p.rows
    ]
    if sampled:
        caption += (
            " The plain figure of a large table is measured on evenly spaced rows ("
            + ", ".join(sampled)
            + "); the weighted one on every row that occurs."
        )
    body = _figure("reconstruction", svgs, caption) or _absent("Reconstruction error")
    return f"<h2>Reconstruction error</h2>{body}"


def _scores(r: Report, svgs: Mapping[str, str]) -> str:
    if r.scores is None:
        return f"<h2>ROC and calibration</h2>{_absent('ROC and calibration curves')}"
    on = _e(r.scores.slice)
    roc = _figure(
        "roc",
        svgs,
        f"On {on}, from fixed-bin score histograms (0.05 logit wide) stored at export; the AUCs "
        "in the legend are the exact ones.",
    )
    cal = _figure(
        "calibration",
        svgs,
        f"On {on}: score bins merged into groups of about 5% of the rows each.",
    )
    return f"<h2>ROC and calibration</h2>{roc}{cal}"


def _parity(r: Report, svgs: Mapping[str, str]) -> str:
    p = r.parity
    if p is None:
        return f"<h2>ONNX Runtime parity</h2>{_absent('Parity figures (no ONNX graphs)')}"
    rows = [[_e(g), f"{d:.3g}"] for g, d in p.max_abs_diff]
    table = _table(["graph", "max |logit difference|"], rows, {1})
    tol = "" if p.atol is None else f" Tolerance {p.atol:g}."
    caption = f"{_e(p.runtime or 'ONNX Runtime')} against the PyTorch compressed model on {_e(p.detail)}.{tol}"
    return f"<h2>ONNX Runtime parity</h2>{table}{_figure('parity', svgs, caption)}"


def _notes(r: Report) -> str:
    items = [f"<li>{_e(n)}</li>" for n in r.notes]
    gate = ""
    if r.quality_gate is not None:
        cls = "gate-failed" if r.quality_gate.startswith("FAILED") else "muted"
        gate = f'<p class="{cls}">Quality gate: {_e(r.quality_gate)}</p>'
    if not items and not gate:
        return ""
    return f"<h2>Notes</h2>{gate}{'<ul>' + ''.join(items) + '</ul>' if items else ''}"


def _provenance(r: Report) -> str:
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in r.provenance)
    toml = (
        f"<details><summary>recipe TOML</summary><pre>{_e(r.recipe_toml)}</pre></details>"
        if r.recipe_toml
        else ""
    )
    return f"<h2>Provenance</h2><dl>{rows}</dl>{toml}"


def _missing(r: Report) -> str:
    if not r.missing:
        return ""
    items = "".join(f"<li>{_e(m)}</li>" for m in r.missing)
    return f'<section class="missing"><h2>Not recorded</h2><ul>{items}</ul></section>'


def render_html(r: Report, svgs: Mapping[str, str]) -> str:
    """The whole page (see the module docstring)."""
    title = f"{r.checkpoint}, {r.recipe}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>dqrm-compress report: {_e(title)}</title>",
        f"<style>{CSS}</style></head><body><main>",
        f'<header><h1>{_e(r.checkpoint)} <span class="arrow">&rarr;</span> {_e(r.recipe)}</h1>',
        f'<p class="sub">dqrm-compress {_e(r.tool_version)} report</p></header>',
        _cards(r),
        _missing(r),
        f'<section id="quality">{_quality(r)}</section>',
        f'<section id="plan">{_plan(r, _figure("bytes", svgs, "Stored bytes per table and of the MLPs before and after, log scale; the ratio beside each pair."))}</section>',
        f'<section id="training">{_training(r, svgs)}</section>',
        f'<section id="reconstruction">{_reconstruction(r, svgs)}</section>',
        f'<section id="scores">{_scores(r, svgs)}</section>',
        f'<section id="parity">{_parity(r, svgs)}</section>',
        f'<section id="notes">{_notes(r)}</section>',
        f'<section id="provenance">{_provenance(r)}</section>',
        "<footer>Written by <code>dqrm-compress report</code>: one file, no scripts, nothing "
        "loaded from the network.</footer>",
        "</main></body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"
