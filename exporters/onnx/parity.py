"""Parity checks between a reference (PyTorch or numpy) and ONNX Runtime outputs.

A parity proof fails hard: :func:`compare_outputs` raises :class:`ParityError` naming the output,
the largest difference and where it is, instead of warning. :func:`compare_all` checks names first,
then shapes, then values for every output. :func:`ort_session` opens a CPU session with worker
spinning off, so ORT's idle threads do not slow other work in the same process;
:func:`plain_session` opens one with no option at all, as a user would, and :func:`serving_session`
one with the settings :class:`~exporters.runtime.predictor.Predictor` serves with; all three go through
:func:`make_session`.

:func:`verify_parity` re-runs the export's parity check on the host it is called on (its ONNX
Runtime version, its CPU): the feeds and reference logits stored under ``onnx/parity/`` at export
go through ``model.onnx`` in a plain session and in the serving session, and a difference above
the manifest's ``atol`` is a :class:`ParityError` (``dqrm-compress verify --parity``).

ORT pitfall (1.31): at its default optimization level ORT rewrites ``DequantizeLinear`` (int8 or
int4 weight) -> ``MatMul`` into ``com.microsoft::MatMulNBits`` with ``accuracy_level=4``, which
quantizes the *activations* to int8 too (up to ~2e-2 absolute error on a small model's logits, far
beyond a 1e-5 parity budget). The exported graphs therefore dequantize MLP weights with ``Cast`` +
``Mul`` (:mod:`exporters.onnx.dense`), which no fusion matches, and need no session option.
``session.qdq_matmulnbits_accuracy_level`` (set by :func:`ort_session`) only matters for other
graphs that use ``DequantizeLinear`` weights.

Example::

    sess = ort_session(model, threads=1)
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    compare_all({"logits": torch_logits}, got, atol=1e-5)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from compress.errors import ArtifactError, DqrmError
from exporters.onnx.spec import SESSION_CONFIG

#: ORT session entries the artifacts are served with (parity is proven with them and without any,
#: see :mod:`exporters.onnx.writer`): the graphs' own :data:`~exporters.onnx.spec.SESSION_CONFIG`
#: (worker threads do not spin) plus ``session.disable_quant_qdq``. Current graphs are exact
#: without any of them (MLP weights are ``Cast`` + ``Mul``, folded at load); the QDQ entries keep
#: graphs exported before that (``DequantizeLinear`` weights) exact and their weights folded.
SERVING_SESSION_CONFIG = {**SESSION_CONFIG, "session.disable_quant_qdq": "1"}


class ParityError(DqrmError):
    """An exported graph computes something other than its reference."""


def compare_outputs(
    reference: np.ndarray, actual: np.ndarray, atol: float, name: str = "output"
) -> dict:
    """Max/mean absolute difference of one output; raises :class:`ParityError` above ``atol``.

    Returns ``{"name", "shape", "max_abs_diff", "mean_abs_diff", "argmax", "reference",
    "actual", "atol"}`` where ``argmax`` is the index of the largest difference and ``reference``/
    ``actual`` the values there. NaN in one array and not the other counts as an infinite
    difference; shapes must match exactly.
    """
    ref = np.asarray(reference)
    act = np.asarray(actual)
    if ref.shape != act.shape:
        raise ParityError(f"output {name!r}: shape {list(act.shape)}, expected {list(ref.shape)}")
    result = {"name": name, "shape": tuple(ref.shape), "atol": float(atol)}
    if ref.size == 0:
        return {
            **result,
            "max_abs_diff": 0.0,
            "mean_abs_diff": 0.0,
            "argmax": None,
            "reference": None,
            "actual": None,
        }
    ref64, act64 = ref.astype(np.float64), act.astype(np.float64)
    diff = np.abs(ref64 - act64)
    same_nan = np.isnan(ref64) & np.isnan(act64)
    diff = np.where(same_nan, 0.0, np.where(np.isnan(diff), np.inf, diff))
    where = np.unravel_index(int(np.argmax(diff)), diff.shape)
    result.update(
        max_abs_diff=float(diff[where]),
        mean_abs_diff=float(diff.mean()),
        argmax=tuple(int(i) for i in where),
        reference=float(ref64[where]),
        actual=float(act64[where]),
    )
    if not result["max_abs_diff"] <= atol:
        raise ParityError(
            f"output {name!r}: max abs diff {result['max_abs_diff']:.3g} > atol {atol:.3g} "
            f"at {list(result['argmax'])} (reference {result['reference']!r}, "
            f"actual {result['actual']!r})"
        )
    return result


def compare_all(
    reference: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray], atol: float
) -> dict[str, dict]:
    """:func:`compare_outputs` for every reference output; missing or extra names fail first."""
    missing = sorted(set(reference) - set(actual))
    extra = sorted(set(actual) - set(reference))
    if missing or extra:
        raise ParityError(f"output names differ: missing {missing}, unexpected {extra}")
    for name in reference:  # all shapes before any value
        if np.shape(reference[name]) != np.shape(actual[name]):
            raise ParityError(
                f"output {name!r}: shape {list(np.shape(actual[name]))}, "
                f"expected {list(np.shape(reference[name]))}"
            )
    return {name: compare_outputs(reference[name], actual[name], atol, name) for name in reference}


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
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, Path):
        model = str(model)
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


# ---------------------------------------------------------------------------------------------
# Re-proving parity on the serving host


def _parity_reference(manifest: Mapping, where: Path) -> tuple[dict, float]:
    """The manifest's stored parity sets and tolerance; :class:`ArtifactError` when absent."""
    parity = (manifest.get("onnx") or {}).get("parity") or {}
    sets, atol = parity.get("reference_data"), parity.get("atol")
    if not isinstance(sets, dict) or not sets or not isinstance(atol, (int, float)):
        raise ArtifactError(
            f"{where}: no ONNX parity reference (exported without graphs or by an older "
            "dqrm-compress): re-export to use --parity"
        )
    for set_name, entry in sets.items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("inputs"), dict)
            and isinstance(entry.get("logits"), str)
        ):
            raise ArtifactError(f"{where}: onnx.parity.reference_data.{set_name} is malformed")
    return sets, float(atol)


def parity_report(path: str | Path, threads: int | None = None) -> dict:
    """Re-run the export's ONNX Runtime parity check of the artifact directory ``path`` here.

    Verifies every checksum first, then scores the stored feeds of each parity set with
    ``model.onnx`` in a plain session and in the serving session and compares with the stored
    reference logits. Returns ``{"ok", "runtime", "atol", "max_abs_diff", "sets": {set:
    {session: max_abs_diff}}, "problem"}``: ``problem`` is ``None``, or one line naming the set,
    the session and the largest difference above the manifest's ``atol``. Raises
    :class:`ArtifactError` when the directory is corrupt or holds no parity reference.
    """
    from exporters.artifacts.read import load_artifacts, map_npy

    arts = load_artifacts(path, verify=True)
    sets, atol = _parity_reference(arts.manifest, arts.path / "manifest.json")
    model = arts.file(arts.onnx["graphs"]["model"]["file"])
    sessions = {
        "plain": plain_session(model, threads=threads),
        "serving": serving_session(model, threads=threads),
    }
    report: dict = {"ok": True, "runtime": ort.__version__, "atol": atol, "max_abs_diff": 0.0}
    report["sets"], report["problem"] = {}, None
    for set_name, entry in sets.items():
        feeds = {name: np.asarray(map_npy(arts.file(rel))) for name, rel in entry["inputs"].items()}
        expected = np.asarray(map_npy(arts.file(entry["logits"])))
        report["sets"][set_name] = {}
        for kind, session in sessions.items():
            got = run_session(session, feeds)["logits"]
            what = f"model.onnx logits (parity set {set_name}, {kind} session)"
            try:
                diff = compare_outputs(expected, got, atol, what)["max_abs_diff"]
            except ParityError as e:
                diff = _max_abs_diff(expected, got)
                report["ok"] = False
                report["problem"] = report["problem"] or (
                    f"{arts.path}: parity fails on onnxruntime {ort.__version__}: {e}"
                )
            report["sets"][set_name][kind] = diff
            report["max_abs_diff"] = max(report["max_abs_diff"], diff)
    return report


def verify_parity(path: str | Path, threads: int | None = None) -> dict:
    """:func:`parity_report`, raising :class:`ParityError` with its ``problem`` when not ok."""
    report = parity_report(path, threads)
    if not report["ok"]:
        raise ParityError(report["problem"])
    return report


def _max_abs_diff(expected: np.ndarray, got: np.ndarray) -> float:
    if np.shape(expected) != np.shape(got):
        return float("inf")
    diff = np.abs(np.asarray(expected, np.float64) - np.asarray(got, np.float64))
    return float(np.nan_to_num(diff, nan=np.inf).max(initial=0.0))
