"""Serve an artifact directory with ONNX Runtime: logits and metrics for datasets, files, tensors.

:class:`Predictor` verifies the directory first (every checksum, every array header: see
:mod:`exporters.load`), so a corrupt artifact is an :class:`~compress.errors.ArtifactError` naming
the file, never a crash inside ONNX Runtime. It then opens ``onnx/model.onnx`` with the session
settings the manifest records (:data:`SERVING_SESSION_CONFIG`: worker spinning off, exact float32
MLPs). A directory exported without graphs is served from a graph built in memory from its
arrays.

Inputs are what the model was trained on: dense features already transformed (the manifest's
``inputs.dense.transform``, ``log3`` = ``log(max(x, -2) + 3)``; :meth:`Predictor.predict_raw` and
:meth:`Predictor.open_data` apply it to raw Criteo text), and per sparse feature the row ids of
every bag, concatenated, with the bag lengths. Row ids are checked against the table sizes before
any batch reaches ORT.

Example::

    p = Predictor("out/dlrm.int4_qat", threads=2)
    p.evaluate(p.open_data("day_23.gz"))        # {"auc", "logloss", "accuracy", "n"}
    p.predict_tensors(dense, {"cat_0": ids}, {"cat_0": lengths})   # logits [B]
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from compress.dataset import Dataset
from compress.datasets import open_dataset
from compress.errors import DataError
from compress.metrics import evaluate as score_logits
from exporters.load import Artifacts, load_artifacts
from exporters.onnx_spec import SESSION_CONFIG
from exporters.onnx_validate import make_session

DENSE_INPUT = "dense"
LOGITS = "logits"
DEFAULT_BATCH_SIZE = 4096
#: ORT session entries the artifacts are served with (and their parity proven with, see
#: :mod:`exporters.onnx_writer`): the graphs' own :data:`~exporters.onnx_spec.SESSION_CONFIG`
#: (no spinning; float32 activations in quantized MatMuls) plus ``session.disable_quant_qdq``,
#: which lets ORT constant-fold the MLP weights' ``DequantizeLinear`` once at load instead of
#: dequantizing INT4/INT8 weights on every run (about 5% of a batch-2048 forward).
SERVING_SESSION_CONFIG = {**SESSION_CONFIG, "session.disable_quant_qdq": "1"}


def serving_session(
    model: str | Path | bytes | onnx.ModelProto, threads: int | None = None
) -> ort.InferenceSession:
    """A CPU ``InferenceSession`` with :data:`SERVING_SESSION_CONFIG`; ``threads`` sets
    ``intra_op_num_threads`` (``None``: ORT's default). Models with external data: by path."""
    return make_session(model, SERVING_SESSION_CONFIG, threads)


def dataset_feeds(
    dataset: Dataset, feature_inputs: Mapping[str, tuple[str, str]]
) -> dict[str, np.ndarray]:
    """ORT feeds of a whole (small) dataset: ``dense`` plus ``<f>__values``/``<f>__lengths``."""
    feeds = {DENSE_INPUT: np.ascontiguousarray(dataset.dense, dtype=np.float32)}
    for f, (values, lengths) in feature_inputs.items():
        off = dataset.offsets[f]
        feeds[values] = np.ascontiguousarray(dataset.values[f][off[0] : off[-1]], dtype=np.int64)
        feeds[lengths] = np.diff(off).astype(np.int64, copy=False)
    return feeds


class Predictor:
    """An artifact directory loaded into ONNX Runtime.

    Args:
        path: the artifact directory (``manifest.json`` inside).
        threads: ORT ``intra_op_num_threads`` (``None``: ORT's default, all cores).
        batch_size: samples per ORT run in :meth:`predict`.
    """

    def __init__(
        self, path: str | Path, threads: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.artifacts: Artifacts = load_artifacts(path, verify=True)
        self.spec = self.artifacts.spec
        self.batch_size = batch_size
        self._rows = {f: t.num_embeddings for t in self.spec.tables for f in t.feature_names}
        section = self.artifacts.onnx
        if section is not None:
            graph = section["graphs"]["model"]
            self.feature_inputs = {
                f: (io["values"], io["lengths"]) for f, io in graph["features"].items()
            }
            model: str | Path | bytes = self.artifacts.file(graph["file"])
        else:
            model, self.feature_inputs = self._build_in_memory()
        self.session = serving_session(model, threads=threads)
        self.runtime = "onnxruntime"

    def _build_in_memory(self) -> tuple[bytes, dict[str, tuple[str, str]]]:
        from exporters.graph_spec import graph_spec_from_artifacts
        from exporters.onnx_model import build_full_model, feature_input_names

        gspec = graph_spec_from_artifacts(self.artifacts)
        return build_full_model(gspec).SerializeToString(), feature_input_names(gspec)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.spec.feature_names

    # -- inputs

    def open_data(self, path: str | Path, on_bad_line: str = "error") -> Dataset:
        """Labelled data at ``path`` (Criteo TSV/.gz file or directory, TorchRec npy days, .npz)
        for this model; raw text gets the manifest's dense transform."""
        transform = (
            self.artifacts.manifest.get("inputs", {}).get("dense", {}).get("transform", "log3")
        )
        return open_dataset(path, self.spec, on_bad_line=on_bad_line, dense_transform=transform)

    def _check(
        self, dense: np.ndarray, values: Mapping[str, np.ndarray], lengths: Mapping[str, np.ndarray]
    ) -> int:
        """Raise :class:`DataError` unless the inputs fit the model; returns the batch size."""
        if dense.ndim != 2 or dense.shape[1] != self.spec.dense_in_features:
            raise DataError(
                f"dense must be [B, {self.spec.dense_in_features}], got {list(dense.shape)}"
            )
        batch = dense.shape[0]
        for f in self.feature_names:
            if f not in values or f not in lengths:
                raise DataError(f"no input for sparse feature {f!r}")
            v, ln = values[f], lengths[f]
            if ln.shape != (batch,) or (ln.size and ln.min() < 0):
                raise DataError(f"feature {f!r}: lengths must be [{batch}] non-negative counts")
            if v.ndim != 1 or v.shape[0] != int(ln.sum()):
                raise DataError(
                    f"feature {f!r}: {v.shape[0]} ids but lengths sum to {int(ln.sum())}"
                )
            if v.size and (v.min() < 0 or v.max() >= self._rows[f]):
                bad = int(v.min()) if v.min() < 0 else int(v.max())
                raise DataError(
                    f"feature {f!r}: row id {bad} outside its table of {self._rows[f]} rows"
                )
        return batch

    # -- scoring

    def predict_tensors(
        self,
        dense: np.ndarray,
        values_by_feature: Mapping[str, np.ndarray],
        lengths_by_feature: Mapping[str, np.ndarray],
    ) -> np.ndarray:
        """Logits ``[B]`` of one batch: ``dense`` float32 ``[B, num_dense]`` (transformed), per
        feature int64 ids ``[sum(lengths)]`` and lengths ``[B]`` (0 for an empty bag)."""
        dense = np.ascontiguousarray(dense, dtype=np.float32)
        values = {f: _ids(f, v) for f, v in values_by_feature.items()}
        lengths = {
            f: np.ascontiguousarray(lengths_by_feature[f], dtype=np.int64)
            for f in lengths_by_feature
        }
        self._check(dense, values, lengths)
        feeds = {DENSE_INPUT: dense}
        for f, (v_name, l_name) in self.feature_inputs.items():
            feeds[v_name], feeds[l_name] = values[f], lengths[f]
        return self.session.run([LOGITS], feeds)[0].reshape(-1)

    def predict(self, dataset: Dataset) -> np.ndarray:
        """Logits ``[N]`` of every sample of ``dataset``, in order, ``batch_size`` at a time."""
        out = [np.zeros(0, np.float32)]
        for start in range(0, len(dataset), self.batch_size):
            part = dataset.slice(start, start + self.batch_size)
            present = [f for f in self.feature_names if f in part.values]
            values = {f: part.values[f] for f in present}
            lengths = {f: part.lengths(f) for f in present}
            out.append(self.predict_tensors(part.dense, values, lengths))
        return np.concatenate(out)

    def predict_raw(self, path: str | Path, on_bad_line: str = "error") -> np.ndarray:
        """Logits ``[N]`` of the samples in a data file or directory (see :meth:`open_data`)."""
        return self.predict(self.open_data(path, on_bad_line))

    def evaluate(self, dataset: Dataset | str | Path, on_bad_line: str = "error") -> dict:
        """``{"auc", "logloss", "accuracy", "n"}`` on a dataset (or a data path)."""
        if not isinstance(dataset, Dataset):
            dataset = self.open_data(dataset, on_bad_line)
        return score_logits(self.predict(dataset), dataset.labels)


def _ids(feature: str, ids: np.ndarray) -> np.ndarray:
    """``ids`` as contiguous int64; :class:`DataError` for ids that are not integers (a cast
    would silently truncate 3.7 to 3)."""
    arr = np.asarray(ids)
    if arr.size and arr.dtype.kind not in "iu":
        raise DataError(f"feature {feature!r}: row ids must be integers, got {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)
