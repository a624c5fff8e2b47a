"""ONNX Runtime sessions as the project opens them: CPU only, the graphs' session settings.

:func:`ort_session` opens a CPU session with worker spinning off (:data:`SESSION_CONFIG`), so
ORT's idle threads do not slow other work in the same process; :func:`plain_session` opens one
with no option at all, as a user would, and :func:`serving_session` one with the settings
:class:`~exporters.runtime.predictor.Predictor` serves with (:data:`SERVING_SESSION_CONFIG`); all
three go through :func:`make_session`, which turns a graph file this ONNX Runtime cannot load into
an :class:`~compress.errors.ArtifactError` naming it. The parity checks
(:mod:`exporters.onnx.parity`) prove the exported graphs in these sessions.

Only ``onnxruntime`` and ``numpy`` are imported (not ``onnx``, not torch): serving needs no more.
A graph built in memory is given as an ``onnx.ModelProto`` or its serialized bytes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from compress.errors import ArtifactError

if TYPE_CHECKING:
    import onnx

#: ORT session config entries the graphs are meant to run with; stored in every model's
#: ``metadata_props`` under ``dqrm.ort_session_config`` (JSON). ORT 1.31 otherwise fuses
#: ``DequantizeLinear`` -> ``MatMul`` into ``MatMulNBits`` with int8 activations (level 4).
SESSION_CONFIG = {
    "session.intra_op.allow_spinning": "0",
    "session.inter_op.allow_spinning": "0",
    "session.qdq_matmulnbits_accuracy_level": "1",
}


#: ORT session entries the artifacts are served with (parity is proven with them and without any,
#: see :mod:`exporters.onnx.writer`): the graphs' own :data:`SESSION_CONFIG`
#: (worker threads do not spin) plus ``session.disable_quant_qdq``. Current graphs are exact
#: without any of them (MLP weights are ``Cast`` + ``Mul``, folded at load); the QDQ entries keep
#: graphs exported before that (``DequantizeLinear`` weights) exact and their weights folded.
SERVING_SESSION_CONFIG = {**SESSION_CONFIG, "session.disable_quant_qdq": "1"}


def ort_session(
    model: str | Path | onnx.ModelProto | bytes,
    threads: int | None = None,
    matmul_accuracy_level: int = 1,
) -> ort.InferenceSession:
    """CPU InferenceSession with :data:`SESSION_CONFIG` (no spinning, float32 quantized MatMuls).

    ``threads`` sets ``intra_op_num_threads`` (``None``: ORT's default). ``matmul_accuracy_level``
    is what fused ``MatMulNBits`` nodes use (1: float32 activations; 4: ORT's default, int8
    activations, faster and approximate). Models with external data must be given by path.
    """
    config = {
        **SESSION_CONFIG,
        "session.qdq_matmulnbits_accuracy_level": str(matmul_accuracy_level),
    }
    return make_session(model, config, threads)


def plain_session(
    model: str | Path | onnx.ModelProto | bytes, threads: int | None = None
) -> ort.InferenceSession:
    """``InferenceSession(model)`` on the CPU with no session config entry (ORT's defaults, all
    its graph optimizations): what a user who ignores the manifest's ``session_config`` gets.
    ``threads`` sets ``intra_op_num_threads`` only (``None``: ORT's default)."""
    return make_session(model, None, threads)


def serving_session(
    model: str | Path | bytes | onnx.ModelProto, threads: int | None = None
) -> ort.InferenceSession:
    """A CPU ``InferenceSession`` with :data:`SERVING_SESSION_CONFIG`; ``threads`` sets
    ``intra_op_num_threads`` (``None``: ORT's default). Models with external data: by path."""
    return make_session(model, SERVING_SESSION_CONFIG, threads)


def make_session(
    model: str | Path | bytes | onnx.ModelProto,
    config: Mapping[str, str] | None,
    threads: int | None = None,
) -> ort.InferenceSession:
    """A CPU ``InferenceSession`` with the session ``config`` entries and one inter-op thread, or,
    with ``config=None``, a plain one (no entry, ORT's default inter-op threads); ``threads``
    intra-op threads (``None``: ORT's default). Models with external data: by path. A graph file
    this ONNX Runtime cannot load (a newer opset or IR version, an unknown operator) is an
    :class:`ArtifactError` naming it and the ONNX Runtime version."""
    options = ort.SessionOptions()
    if config is not None:
        for key, value in config.items():
            options.add_session_config_entry(key, value)
        options.inter_op_num_threads = 1
    if threads is not None:
        options.intra_op_num_threads = threads
    if isinstance(model, Path):
        model = str(model)
    elif not isinstance(model, (str, bytes)):  # an onnx.ModelProto built in this process
        model = model.SerializeToString()
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except _ORT_ERRORS as e:
        if not isinstance(model, str):  # a graph built in this process: a bug, not an input
            raise
        raise ArtifactError(
            f"{model}: ONNX Runtime {ort.__version__} cannot load this graph: {_ort_reason(e)}"
        ) from e


#: What ``InferenceSession`` raises for a graph it cannot load (a newer opset or IR version than
#: this ONNX Runtime knows, an unknown operator, a malformed protobuf): the pybind11 error classes.
_ORT_ERRORS: tuple[type[BaseException], ...] = tuple(
    cls
    for name in (
        "Fail",
        "InvalidArgument",
        "InvalidGraph",
        "InvalidProtobuf",
        "NoSuchFile",
        "NotImplemented",
        "RuntimeException",
        "EPFail",
    )
    if isinstance(cls := getattr(ort.capi.onnxruntime_pybind11_state, name, None), type)
)
_ORT_PREFIX_RE = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : (?:Load model from .*? failed:)?")
_ORT_SOURCE_RE = re.compile(r"^/\S+:\d+ .*?\) (?=[A-Z])")
_MAX_REASON = 500


def _ort_reason(error: BaseException) -> str:
    """ORT's message on one line, without its error-code prefix and C++ source location."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    text = _ORT_SOURCE_RE.sub("", _ORT_PREFIX_RE.sub("", lines[0]).strip())
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


def run_session(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> dict:
    """Run ``session`` and return ``{output name: array}``."""
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))
