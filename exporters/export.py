"""One call from a compressed model to a complete artifact directory (what the main job writes).

    >>> from exporters.export import export
    >>> written = export(result, "demo/dlrm.int4_qat")   # tables, dense weights, ONNX, manifest

``onnx=False`` writes only the packed tables, dense weights and manifest
(:func:`exporters.artifacts.write.save`); the default adds the ONNX graphs with their parity proof
(:func:`exporters.onnx.writer.onnx_writer`).
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
) -> WrittenArtifacts:
    """Write ``result`` to ``out_dir`` atomically, with ONNX graphs unless ``onnx=False``;
    ``timer`` (optional) receives the seconds of the ONNX parity check as stage ``parity``."""
    config = OnnxExportConfig(one_hot_features=result.one_hot_features)
    writers = (onnx_writer(result.model, config, timer),) if onnx else ()
    return save(result, out_dir, force=force, extra_writers=writers)
