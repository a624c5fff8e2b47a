"""Serve an artifact directory with ONNX Runtime: logits and metrics for datasets, files, tensors.

:class:`Predictor` verifies the directory first (every checksum, every array header: see
:mod:`exporters.artifacts.read`), so a corrupt artifact is an :class:`~compress.errors.ArtifactError` naming
the file, never a crash inside ONNX Runtime, and no path in the manifest reaches outside the
directory. It then opens the manifest's full graph (``model.onnx``, which reads the table files
in place: ONNX Runtime maps them, no copy is made; ``onnx/model.onnx`` in format 2 directories)
with the session settings the manifest records
(:data:`~exporters.onnx.sessions.SERVING_SESSION_CONFIG`: worker spinning off; the graphs are
exact without any session option). A directory exported without graphs is served from a graph
built in memory from its arrays.

Inputs are what the model was trained on: dense features already transformed (the manifest's
``inputs.dense.transform``, the one the data it was fine-tuned and evaluated on was read with, e.g.
``log3`` = ``log(max(x, -2) + 3)``; :meth:`Predictor.predict_raw` and :meth:`Predictor.open_data`
apply it to raw Criteo text, ``dense_transform=`` gives it where the manifest does not), and per sparse feature the row ids of
every bag, concatenated, with the bag lengths. Inputs are checked before any batch reaches ORT:
lengths must be non-negative and sum to the number of ids of their feature, and an id outside
``[0, rows)`` of its table is an :class:`OutOfRangeIdError` naming the feature and the id, unless
the Predictor is told ``out_of_range="row0"``: then such ids read row 0 of their own table, as the
graph does (the manifest's ``onnx.out_of_range_ids``, FBGEMM's bounds check).

Threads: by default (``parallel="batch"``) a batch is cut into up to ``threads`` slices of at least
:data:`MIN_SLICE` samples, which one single-threaded ONNX Runtime session scores at the same time,
one slice a thread (ORT's ``run`` releases the GIL and may be called from several threads; each
worker thread is pinned to a core of its own, as ORT pins its intra-op threads). The
graph is a chain of many small ops (per-table gathers, pooling, small MLP layers) that ORT's
intra-op threads barely speed up: on 2 cores a Criteo-shaped batch of 2048 took 11.2 ms with
2 intra-op threads and 6.4 ms as two slices of 1024 (``benchmarks/bench_serving.py``). Every
sample is scored by the same graph as alone in a batch of its slice, so the logits equal those of
an unsplit run within the parity tolerance (the graph's only batch-dependent choice is whether a
group of bags is pooled or read as rows). ``parallel="intra_op"`` instead gives the one session
``threads`` intra-op threads and never splits a batch. A server that already runs one request per
core serves best with ``threads=1``.

Example::

    p = Predictor("out/dlrm.int4_qat", threads=2)
    p.evaluate(p.open_data("day_23.gz"))        # {"auc", "logloss", "accuracy", "n"}
    p.predict_tensors(dense, {"cat_0": ids}, {"cat_0": lengths})   # logits [B]
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from compress.data.dataset import Dataset
from compress.data.dense_transform import check_transform
from compress.data.formats import detect_format, open_dataset
from compress.errors import DataError
from compress.train.metrics import evaluate as score_logits
from exporters.artifacts.read import Artifacts, load_artifacts
from exporters.onnx.sessions import serving_session

log = logging.getLogger(__name__)

DENSE_INPUT = "dense"
LOGITS = "logits"
DEFAULT_BATCH_SIZE = 4096
#: What :class:`Predictor` does with an id outside its table: refuse it, or read row 0 of the table.
OUT_OF_RANGE_MODES = ("error", "row0")
#: How :class:`Predictor` uses its threads: slices of a batch scored at the same time by a
#: single-threaded session, or ONNX Runtime's intra-op threads on the whole batch.
PARALLEL_MODES = ("batch", "intra_op")
#: The fewest samples a slice of a batch gets a thread of its own for (``parallel="batch"``).
MIN_SLICE = 256


def available_cores() -> int:
    """How many CPU cores this process may run on."""
    return len(available_core_ids()) or os.cpu_count() or 1


def available_core_ids() -> list[int]:
    """The ids of the cores this process may run on (empty where the OS does not say)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def _pinner(cores: list[int]) -> Callable[[], None]:
    """A thread initializer that pins each new thread to the next of ``cores`` in turn."""
    slots = itertools.count()

    def pin() -> None:
        if not cores:
            return
        core = cores[next(slots) % len(cores)]
        try:
            os.sched_setaffinity(0, {core})
        except OSError as error:  # the core was taken away meanwhile: unpinned, as fast
            log.debug("predictor worker not pinned to core %d: %s", core, error)

    return pin


def batch_cuts(batch: int, threads: int, min_slice: int = MIN_SLICE) -> list[int]:
    """Sample boundaries ``[0, ..., batch]`` of at most ``threads`` slices of at least
    ``min_slice`` samples each (one slice when the batch is smaller), as even as they come."""
    parts = max(1, min(threads, batch // min_slice))
    return [batch * k // parts for k in range(parts + 1)]


def slice_feeds(
    feeds: Mapping[str, np.ndarray],
    feature_inputs: Mapping[str, tuple[str, str]],
    cuts: list[int],
) -> list[dict[str, np.ndarray]]:
    """The feeds of one batch cut at sample boundaries ``cuts``: dense rows, bag lengths, and the
    ids of those bags (views, no copy)."""
    parts: list[dict[str, np.ndarray]] = [
        {DENSE_INPUT: feeds[DENSE_INPUT][a:b]} for a, b in itertools.pairwise(cuts)
    ]
    for values_name, lengths_name in feature_inputs.values():
        lengths, values = feeds[lengths_name], feeds[values_name]
        start = 0
        for k, (a, b) in enumerate(itertools.pairwise(cuts)):
            end = start + int(lengths[a:b].sum()) if b < cuts[-1] else len(values)
            parts[k][lengths_name] = lengths[a:b]
            parts[k][values_name] = values[start:end]
            start = end
    return parts


class OutOfRangeIdError(DataError):
    """A row id outside ``[0, rows)`` of its feature's table (refused unless
    ``out_of_range="row0"``)."""


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
        threads: threads a batch is scored with (``None``: every core this process may use).
        batch_size: samples per batch in :meth:`predict`.
        out_of_range: ``"error"`` (default): an id outside its table raises
            :class:`OutOfRangeIdError`; ``"row0"``: it reads row 0 of its own table, like the graph
            and FBGEMM's bounds check.
        dense_transform: the dense transform raw text is read with where the manifest's
            ``inputs.dense.transform`` does not know it (``None``: the manifest's); one that
            differs from a recorded transform is refused, as is data read in another one.
        parallel: ``"batch"`` (default): a batch is cut into up to ``threads`` slices of at
            least :data:`MIN_SLICE` samples, scored at the same time by one single-threaded
            session; ``"intra_op"``: one session with ``threads`` ONNX Runtime intra-op threads
            scores the whole batch (module docstring).
    """

    def __init__(
        self,
        path: str | Path,
        threads: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        out_of_range: str = "error",
        dense_transform: str | None = None,
        parallel: str = "batch",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if out_of_range not in OUT_OF_RANGE_MODES:
            raise ValueError(f"out_of_range must be 'error' or 'row0', got {out_of_range!r}")
        if parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel must be 'batch' or 'intra_op', got {parallel!r}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be positive, got {threads}")
        self.out_of_range = out_of_range
        self.artifacts: Artifacts = load_artifacts(path, verify=True)
        self.spec = self.artifacts.spec
        #: the transform the model's dense inputs are made with (``None``: not known)
        self.dense_transform = self._agreed_transform(dense_transform)
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
        #: how many threads a batch is scored with, and how (``PARALLEL_MODES``)
        self.threads = threads or available_cores()
        self.parallel = parallel
        self.session = serving_session(model, threads=1 if parallel == "batch" else self.threads)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = os.getpid()
        self._pool_lock = threading.Lock()  # callers' threads may make their first call at once
        self.runtime = "onnxruntime"

    def _agreed_transform(self, given: str | None) -> str | None:
        """The manifest's dense transform, or ``given`` where the manifest does not know it; a
        ``given`` one that differs from what the manifest records is a :class:`DataError`."""
        recorded = self.artifacts.parsed.dense_transform.name
        if given is None:
            return recorded
        given = check_transform(given, "dense_transform")
        if recorded is not None and given != recorded:
            raise DataError(
                f"{self.artifacts.path / 'manifest.json'}: the model takes {recorded!r}-transformed "
                f"dense features (inputs.dense.transform), not {given!r} (--dense-transform): "
                "leave the option out"
            )
        return given

    def _build_in_memory(self) -> tuple[bytes, dict[str, tuple[str, str]]]:
        from exporters.onnx.from_artifacts import graph_spec_from_artifacts
        from exporters.onnx.model import build_full_model, feature_input_names

        gspec = graph_spec_from_artifacts(self.artifacts)
        return build_full_model(gspec).SerializeToString(), feature_input_names(gspec)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.spec.feature_names

    # -- inputs

    def open_data(self, path: str | Path, on_bad_line: str = "error") -> Dataset:
        """Labelled data at ``path`` (Criteo TSV/.gz file or directory, TorchRec npy days, .npz)
        for this model; raw text gets the manifest's dense transform. An id beyond its table is
        an :class:`OutOfRangeIdError` here, before any batch is scored, unless
        ``out_of_range="row0"``."""
        if self.dense_transform is None and detect_format(path) == "criteo":
            why = (
                "format 1 manifests do not record it"
                if self.artifacts.parsed.format_version < 2
                else "no data was read when it was compressed"
            )
            raise DataError(
                f"{path}: raw text needs the dense transform the model was trained with, and "
                f"{self.artifacts.path / 'manifest.json'} does not know it ({why}): pass "
                "--dense-transform log3 or none (Predictor(..., dense_transform=...))"
            )
        data = open_dataset(
            path,
            self.spec,
            on_bad_line=on_bad_line,
            dense_transform=self.dense_transform,
            check_row_ids=False,
        )
        if self.out_of_range == "error":  # "row0" maps them batch by batch
            for f in self.feature_names:
                self._in_range(f, data.values[f])
        return data

    def _check(
        self, dense: np.ndarray, values: Mapping[str, np.ndarray], lengths: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Raise :class:`DataError` unless the inputs fit the model (an id out of range:
        :class:`OutOfRangeIdError`, unless ``out_of_range="row0"``); returns the ids to feed
        (with ``"row0"``, out-of-range ids replaced by 0)."""
        if dense.ndim != 2 or dense.shape[1] != self.spec.dense_in_features:
            raise DataError(
                f"dense must be [B, {self.spec.dense_in_features}], got {list(dense.shape)}"
            )
        batch = dense.shape[0]
        out = {}
        for f in self.feature_names:
            if f not in values or f not in lengths:
                raise DataError(f"no input for sparse feature {f!r}")
            v, ln = values[f], lengths[f]
            if ln.shape != (batch,):
                raise DataError(f"feature {f!r}: lengths must be [{batch}], got {list(ln.shape)}")
            if ln.size and ln.min() < 0:
                raise DataError(f"feature {f!r}: negative bag length {int(ln.min())}")
            if v.ndim != 1:
                raise DataError(f"feature {f!r}: ids must be [n], got {list(v.shape)}")
            # a bag longer than all ids first: the int64 sum of huge lengths could wrap to n
            if ln.size and int(ln.max()) > v.shape[0]:
                raise DataError(f"feature {f!r}: a bag of {int(ln.max())} ids but {v.shape[0]} ids")
            if v.shape[0] != int(ln.sum()):
                raise DataError(
                    f"feature {f!r}: {v.shape[0]} ids but lengths sum to {int(ln.sum())}"
                )
            out[f] = self._in_range(f, v)
        return out

    def _in_range(self, feature: str, ids: np.ndarray) -> np.ndarray:
        """``ids``, or :class:`OutOfRangeIdError` for one outside the table (``"error"``), or a
        copy with those ids replaced by 0 (``"row0"``: what the graph does with them anyway;
        done here too so that graphs exported before the graph did it serve the same)."""
        rows = self._rows[feature]
        if not ids.size or (ids.min() >= 0 and ids.max() < rows):
            return ids
        if self.out_of_range == "row0":
            return np.where((ids >= 0) & (ids < rows), ids, 0)
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise OutOfRangeIdError(
            f"feature {feature!r}: row id {bad} outside its table of {rows} rows (serve such ids "
            "as row 0 of the table with out_of_range='row0', eval --out-of-range row0)"
        )

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
        lengths = {f: _ids(f, ln, "bag lengths") for f, ln in lengths_by_feature.items()}
        values = self._check(dense, values, lengths)
        feeds = {DENSE_INPUT: dense}
        for f, (v_name, l_name) in self.feature_inputs.items():
            feeds[v_name], feeds[l_name] = values[f], lengths[f]
        return self._run(feeds, dense.shape[0])

    def _run_one(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        return self.session.run([LOGITS], feeds)[0].reshape(-1)

    def _run(self, feeds: dict[str, np.ndarray], batch: int) -> np.ndarray:
        """Logits of checked feeds: the whole batch in one run, or (``parallel="batch"``) its
        slices at the same time on the Predictor's worker threads."""
        threads = self.threads if self.parallel == "batch" else 1
        cuts = batch_cuts(batch, threads)
        if len(cuts) == 2:
            return self._run_one(feeds)
        parts = slice_feeds(feeds, self.feature_inputs, cuts)
        return np.concatenate(list(self._workers().map(self._run_one, parts)))

    def _workers(self) -> ThreadPoolExecutor:
        """The worker threads that score slices, one a core: each is pinned to its own core of
        those the process may use (as ONNX Runtime pins its intra-op threads), so that two slices
        never share a core while another idles."""
        with self._pool_lock:
            if self._pool is None or self._pool_pid != os.getpid():  # a forked child: none
                self._pool_pid = os.getpid()
                self._pool = ThreadPoolExecutor(
                    self.threads, "predictor", initializer=_pinner(available_core_ids())
                )
            return self._pool

    def close(self) -> None:
        """Stop the worker threads (a later batch starts new ones)."""
        with self._pool_lock:
            if self._pool is not None and self._pool_pid == os.getpid():
                self._pool.shutdown()
            self._pool = None

    def predict(self, dataset: Dataset) -> np.ndarray:
        """Logits ``[N]`` of every sample of ``dataset``, in order, ``batch_size`` at a time.
        A dataset that records another dense transform than the model's is a :class:`DataError`."""
        theirs, ours = dataset.dense_transform, self.dense_transform
        if theirs is not None and ours is not None and theirs != ours:
            raise DataError(
                f"the dataset's dense features are {theirs!r}-transformed, the model takes "
                f"{ours!r}-transformed ones (manifest inputs.dense.transform)"
            )
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


def _ids(feature: str, ids: np.ndarray, what: str = "row ids") -> np.ndarray:
    """``ids`` (or bag lengths) as contiguous int64; :class:`DataError` for values that are not
    integers (a cast would silently truncate 3.7 to 3)."""
    arr = np.asarray(ids)
    if arr.size and arr.dtype.kind not in "iu":
        raise DataError(f"feature {feature!r}: {what} must be integers, got {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)
