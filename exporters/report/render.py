"""Draw the report: the command's :func:`write_report_file` and the export's :func:`report_writer`.

Both draw from the same inputs (:mod:`exporters.report.inputs`) with the same code, so the
``report.html`` an export writes and ``dqrm-compress report`` of that directory are the same bytes
(with the same matplotlib). matplotlib is the optional ``report`` extra
(``pip install 'dqrm-compress[report]'``, which ``make setup`` installs); without it
:func:`require_matplotlib` raises :class:`ReportUnavailable` (one line, exit code 2).

Example::

    write_report_file("demo/dlrm.int4_qat", "report.html")
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from compress.errors import ArtifactError, DqrmError, first_line, os_error_reason
from compress.io.atomic_file import atomic_open
from compress.report_format import REPORT_HTML
from exporters.artifacts.atomic_dir import umask
from exporters.report.data import Report, build_report
from exporters.report.inputs import ReportInputs, read_directory, stage_inputs

#: How to get matplotlib, for the one-line message when it is missing.
INSTALL_HINT = "pip install 'dqrm-compress[report]' (make setup installs it)"

Writer = Callable[[Path, dict], None]


class ReportUnavailable(DqrmError):
    """The report cannot be drawn here: matplotlib (the ``report`` extra) is not installed."""


def matplotlib_problem() -> str | None:
    """Why the report cannot be drawn here (matplotlib missing or broken), or ``None``."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as e:
        return f"matplotlib is not installed ({first_line(e)}): {INSTALL_HINT}"
    return None


def require_matplotlib() -> None:
    """:class:`ReportUnavailable` when :func:`matplotlib_problem` finds one."""
    problem = matplotlib_problem()
    if problem is not None:
        raise ReportUnavailable(f"report: {problem}")


def draw_plots(report: Report) -> dict[str, str]:
    """``{plot name: <svg>}`` of every plot the report has data for."""
    from exporters.report import plots

    svgs = {"bytes": plots.bytes_chart(report.plan, "Bytes per table, before and after")}
    training = report.training
    if training is not None and any(p.auc is not None for p in training.points):
        note = (
            "control (FP32 model, same fine-tuning): not recorded" if not training.control else ""
        )
        svgs["training"] = plots.training_chart(
            training, "AUC and log loss over fine-tuning steps", note
        )
    if any(r.error is not None for r in report.plan):
        svgs["reconstruction"] = plots.reconstruction_chart(
            report.plan, "Reconstruction error per table"
        )
    if report.scores is not None:
        aucs = {k: (m.auc if m is not None else None) for k, m in report.metrics.items()}
        svgs["roc"] = plots.roc_chart(report.scores, aucs, "ROC, baseline vs compressed")
        svgs["calibration"] = plots.calibration_chart(
            report.scores, "Calibration, baseline vs compressed"
        )
    if report.parity is not None and report.parity.max_abs_diff:
        svgs["parity"] = plots.parity_chart(
            report.parity.max_abs_diff, report.parity.atol, "ONNX Runtime parity per graph"
        )
    return svgs


def _draw(inputs: ReportInputs) -> tuple[bytes, Report, dict[str, str]]:
    from exporters.report.html import render_html

    report = build_report(inputs)
    svgs = draw_plots(report)
    return render_html(report, svgs).encode("utf-8"), report, svgs


def render_report(inputs: ReportInputs) -> bytes:
    """The report page of ``inputs`` as UTF-8 bytes (needs matplotlib)."""
    require_matplotlib()
    return _draw(inputs)[0]


@dataclass(frozen=True)
class WrittenReport:
    """Where the report went, the plots it holds, what it says is not recorded, and the
    warnings reading the manifest gave."""

    path: Path
    plots: tuple[str, ...]
    missing: tuple[str, ...]
    warnings: tuple[str, ...] = ()


def write_report_file(artifacts_dir: str | Path, out: str | Path) -> WrittenReport:
    """Draw the report of the artifact directory ``artifacts_dir`` into the file ``out`` (written
    whole or not at all). ``out`` inside the directory is refused: an unlisted or changed file
    there would fail ``verify`` (the main job already wrote its ``report.html``)."""
    require_matplotlib()
    root, out = Path(artifacts_dir), Path(out)
    inputs = read_directory(root)
    target = out.resolve()
    if target.is_relative_to(root.resolve()):
        raise ArtifactError(
            f"{out}: inside the artifact directory {root}, where a file its manifest does not "
            f"list fails verify; write elsewhere (its own {REPORT_HTML} is already there)"
        )
    if out.is_dir():
        raise ArtifactError(f"{out}: is a directory; --out names the HTML file to write")
    page, report, svgs = _draw(inputs)
    try:
        with atomic_open(out) as f:
            os.fchmod(f.fileno(), 0o666 & ~umask())  # a page to share, not a private temp file
            f.write(page)
    except OSError as e:
        raise ArtifactError(f"{out}: cannot write ({os_error_reason(e)})") from None
    return WrittenReport(out, tuple(svgs), report.missing, tuple(inputs.warnings))


def report_writer() -> Writer:
    """An extra writer for :func:`exporters.artifacts.write.save`: draws ``report.html`` into
    the staging directory from what is already there (run it after the ONNX writer, whose
    parity figures it shows)."""
    require_matplotlib()

    def write(stage: Path, manifest: dict) -> None:
        (stage / REPORT_HTML).write_bytes(render_report(stage_inputs(stage, manifest)))

    return write
