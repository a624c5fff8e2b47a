"""The report's content as plain data, drawn from :class:`~exporters.report.inputs.ReportInputs`.

:func:`build_report` reads every section it shows through
:class:`~exporters.artifacts.json_fields.JsonObject` (a malformed value is one
:class:`ArtifactError` line naming its file and JSON path) and turns the stored measurements into
what the plots draw: bytes per table, the fine-tuning curves, the reconstruction error, ROC and
calibration points from the score histograms (:func:`roc_points`, :func:`calibration_points`),
the parity figures and the provenance. What the artifacts do not hold (older artifacts, a PTQ
recipe, no validation data) is listed in :attr:`Report.missing` instead; nothing is guessed.

Pure functions of their inputs: the same artifacts give the same :class:`Report`.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from compress.errors import ArtifactError
from compress.report_format import REPORT_DATA_FILE, TRAIN_LOG_FILE
from exporters.artifacts.json_fields import (
    BOOL,
    INT,
    NONNEG_INT,
    OBJ,
    STR,
    JsonObject,
    Kind,
    Problems,
    is_int,
)
from exporters.artifacts.manifest_schema import MANIFEST
from exporters.report.inputs import ReportInputs

NUMBER = Kind(
    "a finite number",
    lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
)
#: Row counts of a score histogram bin (below 2**53: sums stay exact in int64 and float64).
COUNTS = Kind("a non-negative integer below 2**53", lambda v: is_int(v) and 0 <= v < 2**53)
#: Bins a stored score histogram may hold (the writer's is BINS of score_histogram, 400).
MAX_BINS = 100_000
#: Groups of similar size the calibration curve merges the score bins into.
CALIBRATION_GROUPS = 20
#: What "control" means, for the sentence saying it is not recorded.
CONTROL = "the same fine-tuning applied to the FP32 model"
#: The models whose scores the histograms hold, in drawing order.
SCORED = ("baseline", "compressed")


@dataclass(frozen=True)
class Metrics:
    auc: float
    logloss: float
    accuracy: float
    n: int


@dataclass(frozen=True)
class TableError:
    """A table's relative RMSE, plain and frequency-weighted (``None``: not available), and the
    rows the plain figure is over (``None``: every row, or not recorded)."""

    relative_rmse: float | None
    weighted: float | None
    exact: bool
    measured: bool
    rows_measured: int | None = None


@dataclass(frozen=True)
class PlanRow:
    """One row of the plan table: a table, the MLPs or the other dense weights."""

    name: str
    shape: str
    method: str
    bits: int | None
    detail: str
    rule: str
    bytes_before: int | None
    bytes_after: int
    error: TableError | None = None
    is_table: bool = True
    rows: int | None = None


@dataclass(frozen=True)
class TrainingPoint:
    step: int
    loss: float | None
    auc: float | None
    logloss: float | None


@dataclass(frozen=True)
class Training:
    """The fine-tuning evaluations (on the selection slice) and the checkpoint's score there."""

    points: tuple[TrainingPoint, ...]
    steps: int | None
    best_step: int | None
    metric: str | None
    slice: str | None
    baseline: Metrics | None
    #: the control run's evaluations on the same rows (``--control``; ``None``: not run)
    control: tuple[TrainingPoint, ...] | None = None


@dataclass(frozen=True)
class Histogram:
    negatives: np.ndarray
    positives: np.ndarray
    probability_sums: np.ndarray


@dataclass(frozen=True)
class CalibrationPoint:
    predicted: float
    observed: float
    rows: int


@dataclass(frozen=True)
class Scores:
    """ROC and calibration points per scored model (:data:`SCORED`) on the report slice."""

    slice: str
    roc: Mapping[str, tuple[np.ndarray, np.ndarray]]
    calibration: Mapping[str, tuple[CalibrationPoint, ...]]


@dataclass(frozen=True)
class Parity:
    max_abs_diff: tuple[tuple[str, float], ...]
    atol: float | None
    runtime: str | None
    detail: str


@dataclass(frozen=True)
class Report:
    checkpoint: str
    recipe: str
    tool_version: str
    bytes_before: int | None
    bytes_after: int | None
    metrics: Mapping[str, Metrics | None]
    metrics_slice: str | None
    plan: tuple[PlanRow, ...]
    reconstruction_weights: str | None
    training: Training | None
    scores: Scores | None
    parity: Parity | None
    notes: tuple[str, ...]
    quality_gate: str | None
    provenance: tuple[tuple[str, str], ...]
    recipe_toml: str | None
    missing: tuple[str, ...]


# --------------------------------------------------------------------------------------------
# Pure curve math


def roc_points(h: Histogram) -> tuple[np.ndarray, np.ndarray] | None:
    """``(false positive rates, true positive rates)`` at every bin edge from the top score
    down, from ``(0, 0)`` to ``(1, 1)`` (edges where neither changes left out); ``None`` when a
    class is empty."""
    pos = np.concatenate([[0], np.cumsum(h.positives[::-1])])
    neg = np.concatenate([[0], np.cumsum(h.negatives[::-1])])
    if pos[-1] == 0 or neg[-1] == 0:
        return None
    keep = np.ones(pos.size, dtype=bool)
    keep[1:] = (np.diff(pos) > 0) | (np.diff(neg) > 0)
    return neg[keep] / neg[-1], pos[keep] / pos[-1]


def roc_auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under the points of :func:`roc_points` (trapezoids)."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def calibration_points(
    h: Histogram, groups: int = CALIBRATION_GROUPS
) -> tuple[CalibrationPoint, ...]:
    """Mean predicted probability against observed click rate for the bins merged, in score
    order, into groups of at least ``rows / groups`` rows (the last one may be smaller)."""
    counts = h.negatives + h.positives
    total = int(counts.sum())
    if total == 0:
        return ()
    target = max(1, math.ceil(total / groups))
    out, n, pos, psum = [], 0, 0, 0.0
    for i in range(counts.size):
        n, pos, psum = (
            n + int(counts[i]),
            pos + int(h.positives[i]),
            psum + float(h.probability_sums[i]),
        )
        if n >= target or (i == counts.size - 1 and n):
            out.append(CalibrationPoint(psum / n, pos / n, n))
            n, pos, psum = 0, 0, 0.0
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Reading the sections


def build_report(inputs: ReportInputs) -> Report:
    """The :class:`Report` of ``inputs``; :class:`ArtifactError` naming the first malformed value
    (and how many more there are)."""
    p = Problems(MANIFEST)
    top = JsonObject(p, dict(inputs.manifest), "")
    dp = Problems(REPORT_DATA_FILE)
    data = None if inputs.report_data is None else JsonObject(dp, dict(inputs.report_data), "")
    missing: list[str] = []
    source = top.child("source", optional=True)
    recipe = top.child("recipe", optional=True)
    metrics = _metrics(top.child("metrics", optional=True))
    report = Report(
        checkpoint=source.get("checkpoint", STR, optional=True) or "(checkpoint not recorded)",
        recipe=recipe.get("name", STR, optional=True) or "(recipe not recorded)",
        tool_version=top.get("tool_version", STR, optional=True) or "(not recorded)",
        bytes_before=top.child("plan", optional=True).get("bytes_before", INT, optional=True),
        bytes_after=_bytes_after(top),
        metrics=metrics,
        metrics_slice=_data_sources(source).get("report"),
        plan=_plan_rows(top, data, missing),
        reconstruction_weights=_reconstruction_weights(data, missing),
        training=_training(top, inputs, data, missing),
        scores=_scores(data, missing),
        parity=_parity(top, missing),
        notes=tuple(top.list_of("notes", STR, optional=True) or ()),
        quality_gate=_quality_gate(top),
        provenance=_provenance(top, source, data),
        recipe_toml=recipe.get("toml", STR, optional=True),
        missing=(),
    )
    if all(m is None for m in metrics.values()):
        missing.insert(0, "AUC and log loss: no validation data was given")
    if metrics.get("control") is None:
        missing.append(f"control run ({CONTROL}): not run (--control runs it)")
    for problems in (p, dp):
        if problems.lines:
            n = len(problems.lines) - 1
            raise ArtifactError(problems.lines[0] + (f" (and {n} more)" if n else ""))
    return replace(report, missing=tuple(missing))


def _metric(o: JsonObject) -> Metrics | None:
    values = [o.get(k, NUMBER) for k in ("auc", "logloss", "accuracy")]
    n = o.get("n", NONNEG_INT)
    if any(v is None for v in values) or n is None:
        return None
    return Metrics(*values, n)


def _metrics(section: JsonObject) -> dict[str, Metrics | None]:
    out = {}
    for key in ("baseline", "before_finetune", "compressed", "control"):
        raw = section.get(key, OBJ, optional=True, nullable=True)
        if raw is None and key == "control" and key not in section.value:
            continue  # only runs with --control record it
        out[key] = None if raw is None else _metric(section.child(key))
    return out


def _data_sources(source: JsonObject) -> dict[str, str]:
    data = source.get("data", OBJ, optional=True, nullable=True) or {}
    return {k: v for k, v in data.items() if isinstance(v, str)}


def _bytes_after(top: JsonObject) -> int | None:
    b = top.child("bytes", optional=True)
    tables, dense = b.get("tables", INT, optional=True), b.get("dense", INT, optional=True)
    return None if tables is None or dense is None else tables + dense


def _errors_by_table(data: JsonObject | None) -> dict[str, TableError]:
    if data is None:
        return {}
    out = {}
    for t in data.child("reconstruction").each("tables"):
        name = t.get("name", STR)
        out[name] = TableError(
            relative_rmse=t.get("relative_rmse", NUMBER, nullable=True),
            weighted=t.get("relative_rmse_weighted", NUMBER, nullable=True),
            exact=bool(t.get("exact", BOOL)),
            measured=bool(t.get("measured", BOOL)),
            rows_measured=t.get("rows_measured", NONNEG_INT, optional=True, nullable=True),
        )
    return out


def _planned_before(data: JsonObject | None) -> dict[str, tuple[int | None, str]]:
    """``{table: (bytes before, rule text)}`` from ``report_data.json``'s plan."""
    if data is None:
        return {}
    out = {}
    for t in data.each("plan_tables"):
        out[t.get("name", STR)] = (t.get("bytes_before", NONNEG_INT), t.get("rule_text", STR))
    return out


def _plan_rows(top: JsonObject, data: JsonObject | None, missing: list[str]) -> tuple:
    planned, errors = _planned_before(data), _errors_by_table(data)
    if data is None:
        missing.append(
            f"bytes before per table, reconstruction error, ROC and calibration, checkpoint "
            f"sha256: no {REPORT_DATA_FILE} (artifacts written before dqrm-compress recorded it)"
        )
    rows = []
    for t in top.each("tables"):
        name = t.get("name", STR) or "?"
        group = t.get("group", STR, optional=True)
        before, _ = planned.get(name, (None, ""))
        rule = t.get("rule", INT, optional=True, nullable=True)
        n = t.get("num_embeddings", INT) or 0
        rows.append(
            PlanRow(
                name=name,
                rows=n,
                shape=f"{n:,} x {t.get('embedding_dim', INT) or 0}",
                method=t.get("method", STR) or "?",
                bits=t.get("bits", INT, nullable=True),
                detail=t.get("granularity", STR, nullable=True)
                or (f"group {group}" if group else "-"),
                rule="-" if rule is None else str(rule),
                bytes_before=before,
                bytes_after=t.get("bytes", NONNEG_INT) or 0,
                error=errors.get(name),
            )
        )
    return tuple(rows) + _dense_rows(top.child("plan", optional=True))


def _dense_rows(plan: JsonObject) -> tuple[PlanRow, ...]:
    """The MLPs (every ``nn.Linear``), and the other dense weights (DCN crossnet) when any."""
    mlp = plan.child("mlp", optional=True)
    if not mlp.value:
        return ()
    per_channel = mlp.get("per_channel", BOOL, optional=True)
    before, after = mlp.get("bytes_before", NONNEG_INT), mlp.get("bytes_after", NONNEG_INT) or 0
    rows = [
        PlanRow(
            "MLPs",
            "",
            mlp.get("method", STR) or "?",
            mlp.get("bits", INT, nullable=True),
            "per channel" if per_channel and mlp.value.get("bits") is not None else "-",
            "-",
            before,
            after,
            is_table=False,
        )
    ]
    d_before = plan.get("dense_bytes_before", NONNEG_INT, optional=True)
    d_after = plan.get("dense_bytes_after", NONNEG_INT, optional=True)
    known = d_before is not None and d_after is not None and before is not None
    if known and (d_before - before or d_after - after):
        rows.append(
            PlanRow(
                "other dense",
                "",
                "keep",
                None,
                "fp32",
                "-",
                d_before - before,
                d_after - after,
                is_table=False,
            )
        )
    return tuple(rows)


def _reconstruction_weights(data: JsonObject | None, missing: list[str]) -> str | None:
    if data is None:
        return None
    rec = data.child("reconstruction")
    weights = rec.get("weights", STR, nullable=True)
    if weights is None:
        note = rec.get("note", STR, nullable=True) or "row counts not known"
        missing.append(f"frequency-weighted reconstruction error: {note}")
    return weights


def _training(
    top: JsonObject, inputs: ReportInputs, data: JsonObject | None, missing: list[str]
) -> Training | None:
    train = top.get("train", OBJ, optional=True, nullable=True)
    if train is None and inputs.train_log is None:
        missing.append("fine-tuning curves: the recipe does not fine-tune")
        return None
    t = top.child("train")
    selected = t.get("selected_on", OBJ, optional=True, nullable=True) or {}
    log = inputs.train_log
    if log is None:
        missing.append(f"fine-tuning curves: no {TRAIN_LOG_FILE}")
    points = tuple(
        TrainingPoint(
            e["step"],
            e.get("loss"),
            (e.get("metrics") or {}).get("auc"),
            (e.get("metrics") or {}).get("logloss"),
        )
        for e in log or ()
    )
    if log is not None and not any(pt.auc is not None for pt in points):
        missing.append("fine-tuning curves: no evaluation recorded (no validation data)")
    baseline, slice_name = _selection_baseline(data)
    control = _control_points(data)
    if baseline is None and any(pt.auc is not None for pt in points):
        missing.append(
            "the checkpoint's score on the selection slice (the fine-tuning curves' baseline)"
        )
    return Training(
        points=points,
        steps=t.get("steps", NONNEG_INT, optional=True),
        best_step=t.get("best_step", NONNEG_INT, optional=True, nullable=True),
        metric=selected.get("metric") if isinstance(selected.get("metric"), str) else None,
        slice=slice_name
        or (selected.get("slice") if isinstance(selected.get("slice"), str) else None),
        baseline=baseline,
        control=control,
    )


def _control_points(data: JsonObject | None) -> tuple[TrainingPoint, ...] | None:
    """The control run's evaluations (``report_data.json``'s ``control.history``, entries as
    train_log.jsonl holds them; ``None`` when the run had no control)."""
    if data is None or data.value.get("control") is None:
        return None
    points = []
    for e in data.child("control").each("history"):
        metrics = e.child("metrics") if e.value.get("metrics") is not None else None
        points.append(
            TrainingPoint(
                e.get("step", NONNEG_INT),
                e.get("loss", NUMBER, nullable=True),
                None if metrics is None else metrics.get("auc", NUMBER),
                None if metrics is None else metrics.get("logloss", NUMBER),
            )
        )
    return tuple(points)


def _selection_baseline(data: JsonObject | None) -> tuple[Metrics | None, str | None]:
    if data is None or data.value.get("selection_baseline") is None:
        return None, None
    sel = data.child("selection_baseline")
    return _metric(sel.child("metrics")), sel.get("slice", STR)


def _histogram(o: JsonObject) -> Histogram | None:
    neg = o.list_of("negatives", COUNTS)
    pos = o.list_of("positives", COUNTS)
    sums = o.list_of("probability_sums", NUMBER)
    if neg is None or pos is None or sums is None:
        return None
    if not (len(neg) == len(pos) == len(sums)) or not neg or len(neg) > MAX_BINS:
        o.fail(
            "",
            "negatives, positives and probability_sums must be lists of one length, "
            f"1 to {MAX_BINS:,}",
        )
        return None
    return Histogram(np.array(neg, np.int64), np.array(pos, np.int64), np.array(sums, np.float64))


def _scores(data: JsonObject | None, missing: list[str]) -> Scores | None:
    if data is None:
        return None
    if data.value.get("scores") is None:
        missing.append("ROC and calibration: no validation data was given")
        return None
    s = data.child("scores")
    hists = {k: _histogram(s.child(k)) for k in SCORED}
    if any(h is None for h in hists.values()):
        return None
    roc = {k: roc_points(h) for k, h in hists.items()}
    if any(r is None for r in roc.values()):
        missing.append("ROC: the report slice holds one class only")
        return None
    return Scores(
        slice=s.get("slice", STR) or "?",
        roc=roc,
        calibration={k: calibration_points(h) for k, h in hists.items()},
    )


def _parity(top: JsonObject, missing: list[str]) -> Parity | None:
    onnx = top.get("onnx", OBJ, optional=True, nullable=True)
    if onnx is None or "parity" not in onnx:
        missing.append("ONNX Runtime parity: the artifacts hold no ONNX graphs")
        return None
    par = top.child("onnx").child("parity")
    diffs = par.child("max_abs_diff")
    rows = tuple((g, diffs.get(g, NUMBER)) for g in sorted(diffs.value))
    samples = par.get("samples", OBJ, optional=True) or {}
    sessions = par.list_of("sessions", STR, optional=True) or ()
    detail = ", ".join(f"{v} {k.replace('_', '-')}" for k, v in samples.items())
    if sessions:
        detail += f" samples; sessions: {', '.join(sessions)}"
    return Parity(
        max_abs_diff=tuple((g, d) for g, d in rows if d is not None),
        atol=par.get("atol", NUMBER, optional=True),
        runtime=par.get("runtime", STR, optional=True),
        detail=detail,
    )


def _quality_gate(top: JsonObject) -> str | None:
    gate = top.get("quality_gate", OBJ, optional=True)
    if gate is None:
        return None
    g = top.child("quality_gate")
    drop, passed = g.get("max_auc_drop", NUMBER), g.get("passed", BOOL)
    if passed:
        return f"passed --max-auc-drop {drop:g}"
    failure = g.get("failure", STR, nullable=True)
    return f"FAILED --max-auc-drop {drop:g}: {failure} (kept with --keep-failed)"


def _seed(toml_text: str | None) -> str:
    if toml_text is None:
        return "not recorded"
    try:
        recipe = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError:
        return "not recorded (recipe TOML unreadable)"
    finetune = recipe.get("finetune")
    if not isinstance(finetune, dict):
        return "none (the recipe does not fine-tune)"
    return f"{finetune.get('seed', 0)} (recipe [finetune] seed)"


def _provenance(
    top: JsonObject, source: JsonObject, data: JsonObject | None
) -> tuple[tuple[str, str], ...]:
    recipe = top.child("recipe", optional=True)
    sources = _data_sources(source)
    transform = top.child("inputs", optional=True).child("dense", optional=True)
    t = transform.get("transform", OBJ, optional=True) or {}
    checkpoint = source.get("checkpoint", STR, optional=True) or "not recorded"
    sha = "not recorded"
    if data is not None:
        ck = data.child("checkpoint")
        sha = f"{ck.get('sha256', STR)} ({ck.get('of', STR)})"
    rows = [
        ("tool", f"dqrm-compress {top.get('tool_version', STR, optional=True) or '?'}"),
        ("artifact format", str(top.get("format_version", INT, optional=True) or "?")),
        ("recipe", recipe.get("name", STR, optional=True) or "not recorded"),
        ("seed", _seed(recipe.get("toml", STR, optional=True))),
        ("checkpoint", checkpoint),
        ("checkpoint sha256", sha),
    ]
    labels = {
        "train": "training data",
        "valid": "validation data",
        "select": "selection slice",
        "report": "report slice",
    }
    rows += [(label, sources.get(k) or "none") for k, label in labels.items()]
    if t:
        rows.append(("dense transform", f"{t.get('name')}: {t.get('formula') or '-'}"))
    return tuple(rows)
