"""One call from a compressed model to a complete artifact directory (what the main job writes).

    >>> from exporters.export import export
    >>> written = export(result, "demo/dlrm.int4_qat")   # tables, dense weights, ONNX, manifest

``onnx=False`` writes only the packed tables, dense weights and manifest
(:func:`exporters.artifacts.write.save`); the default adds the ONNX graphs with their parity proof
(:func:`exporters.onnx.writer.onnx_writer`); ``report=True`` (what the main job passes) the HTML
report (:func:`exporters.report.render.report_writer`).
"""

from __future__ import annotations

from pathlib import Path

from compress.pipeline import CompressionResult
from compress.timings import StageTimer
from exporters.artifacts.write import WrittenArtifacts, save
from exporters.onnx.writer import OnnxExportConfig, onnx_writer


def export(
    result: CompressionResult,
    out_dir: str | Path,
    *,
    force: bool = False,
    onnx: bool = True,
    timer: StageTimer | None = None,
    report: bool = False,
) -> WrittenArtifacts:
    """Write ``result`` to ``out_dir`` atomically, with ONNX graphs unless ``onnx=False``;
    ``timer`` (optional) receives the seconds of the ONNX parity check as stage ``parity``.
    ``report=True`` adds ``report.html`` (:mod:`exporters.report`; needs matplotlib, else
    :class:`~exporters.report.render.ReportUnavailable` before anything is written)."""
    config = OnnxExportConfig(one_hot_features=result.one_hot_features)
    writers = (onnx_writer(result.model, config, timer),) if onnx else ()
    if report:  # after the ONNX writer: the report shows its parity figures
        from exporters.report.render import report_writer

        writers += (report_writer(),)
    return save(result, out_dir, force=force, extra_writers=writers)
