"""Parity checks between a reference (PyTorch or numpy) and ONNX Runtime outputs.

A parity proof fails hard: :func:`compare_outputs` raises :class:`ParityError` naming the output,
the largest difference and where it is, instead of warning. :func:`compare_all` checks names first,
then shapes, then values for every output. The sessions they run in (:func:`ort_session`,
:func:`plain_session`, :func:`serving_session`, all through :func:`make_session`) are defined in
:mod:`exporters.onnx.sessions` and importable from here.

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

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from compress.errors import ArtifactError, DqrmError
from exporters.onnx.sessions import (  # the sessions parity is proven in, importable from here too
    SERVING_SESSION_CONFIG,
    make_session,
    ort_session,
    plain_session,
    run_session,
    serving_session,
)

__all__ = [
    "SERVING_SESSION_CONFIG",
    "ParityError",
    "compare_all",
    "compare_outputs",
    "make_session",
    "ort_session",
    "parity_report",
    "plain_session",
    "run_session",
    "serving_session",
    "verify_parity",
]


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
