"""Streamed data: fine-tuning and evaluation on inputs larger than memory.

:func:`open_data` reads ``--data``/``--valid`` either whole (a :class:`~compress.data.dataset.Dataset`,
as before) or as a :class:`StreamedData`: an input indexed once (:mod:`compress.data.stream_source`)
and then read again on every pass by background worker processes
(:mod:`compress.data.stream_workers`), so memory does not grow with the data set.

Which inputs stream (:class:`LoaderSettings`, ``--stream``): ``auto`` (default) streams Criteo text,
npy days, Parquet (:mod:`compress.data.parquet_source`) and in-process TorchRec batches
(:mod:`compress.data.batch_source`) holding more than ``min_rows`` rows (1,000,000, about 0.5 GB
as an in-memory ``Dataset``), counted by the indexing pass; ``on`` streams every such input;
``off`` reads every input whole. An ``.npz`` is always read whole (it is the small project
format). In-process batches are read in this process (no workers). Multi-hot inputs (Parquet list
columns, batches with bags of other than one id) stream as
:class:`~compress.data.jagged_rows.JaggedRows` through a shuffle buffer that draws the same order
(:class:`~compress.data.jagged_rows.JaggedShuffleBuffer`).

Training order. Pass ``p`` (an "epoch" over a stream) reads the blocks in file order; rows go
through a **shuffle buffer** of ``shuffle_rows`` rows drawn by ``numpy.random.default_rng([seed,
p])``: when a block of ``m`` rows arrives at a buffer holding ``n``, the ``n + m - shuffle_rows``
rows to hand on are drawn uniformly without replacement from the buffer and the block together
(in the drawn order), and the block's other rows take the freed places; at the end of a pass the
buffer is emptied in a random order. Each pass yields every row of the region exactly once; the
same seed gives the same rows in the same order, whatever the number and timing of the workers
(blocks arrive in block order). Batches are cut from that sequence and the last partial batch of a
pass is dropped, as the in-memory loop drops it, so a pass is ``rows // batch_size`` steps and
``epochs`` means passes. Resuming at step ``k`` reads pass ``k // steps_per_pass`` from its start
and drops the batches before ``k`` (with ``--on-bad-line skip`` the number of rows of a pass is
known only after reading it, so a resumed run reads from the first pass).

Memory, in the training process: the buffer holds at most ``shuffle_rows`` rows (264 bytes a row
for Criteo's 13 dense and 26 sparse columns: 69 MB at the default 262,144), plus one block being
received (1 MiB of text, about 4,000 Criteo rows) and one batch being cut. Each worker process
takes about 40 MB and about 36 times a block's bytes while it parses it, with up to ``prefetch +
2`` parsed blocks. Evaluation keeps a logit and a label per row (8 bytes); computing AUC and log
loss over them takes about 90 bytes a row while it runs.

Row numbers. A streamed input's rows are numbered by line (text, over the files in order) or by
sample (npy days); :meth:`StreamedData.slice` and :meth:`StreamedData.split_tail` take ranges of
those numbers without reading anything, so the held-out tail of ``--data`` and the selection and
report slices of :mod:`compress.train.validation` are the same rows as when the input is read
whole. With ``--on-bad-line skip`` a skipped line keeps its number (ranges count lines, and a range
yields its valid lines).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from compress.data.batch_source import BATCHES_NAME, Batches, index_batches, is_batches
from compress.data.batches import Batch
from compress.data.criteo_text import OnBadLine
from compress.data.dataset import Dataset, check_batch_size, tail_start
from compress.data.dense_transform import DEFAULT_TEXT_TRANSFORM, DenseTransform, check_transform
from compress.data.formats import detect_format, load_dataset
from compress.data.jagged_rows import JaggedShuffleBuffer
from compress.data.parquet_columns import ColumnMapping, mapping_from
from compress.data.parquet_source import index_parquet
from compress.data.row_batches import Batcher, ShuffleBuffer, rows_to_batch
from compress.data.stream_source import (
    BLOCK_BYTES,
    RowBlock,
    Source,
    TextSource,
    index_npy_days,
    index_text,
    region_tasks,
)
from compress.data.stream_workers import BlockReader
from compress.errors import DataError
from compress.io.fingerprint import sha256_json
from compress.io.model_spec import DLRMSpec

if TYPE_CHECKING:  # the loader settings (the command line's options) are read without torch
    import torch

log = logging.getLogger(__name__)

StreamMode = Literal["auto", "on", "off"]
STREAM_MODES: tuple[str, ...] = ("auto", "on", "off")
#: ``auto`` streams inputs with more rows than this.
STREAM_MIN_ROWS = 1_000_000
#: Default shuffle buffer, in rows.
SHUFFLE_ROWS = 262_144


def default_workers() -> int:
    """``min(2, CPUs)``: two parse about 300k Criteo rows/s, ahead of a DLRM's training step."""
    return max(1, min(2, os.cpu_count() or 1))


@dataclass(frozen=True)
class LoaderSettings:
    """How ``--data``/``--valid`` are read (see the module docstring). ``workers=0`` reads in the
    training process; ``shuffle_rows=0`` shuffles within each block only; ``prefetch``: blocks
    queued per worker."""

    stream: StreamMode = "auto"
    workers: int = field(default_factory=default_workers)
    shuffle_rows: int = SHUFFLE_ROWS
    min_rows: int = STREAM_MIN_ROWS
    block_bytes: int = BLOCK_BYTES
    prefetch: int = 2

    def __post_init__(self) -> None:
        if self.stream not in STREAM_MODES:
            raise DataError(f"stream must be one of {', '.join(STREAM_MODES)}, got {self.stream!r}")
        for name in ("workers", "shuffle_rows", "min_rows"):
            if getattr(self, name) < 0:
                raise DataError(f"loader setting {name} must be >= 0, got {getattr(self, name)}")
        if self.block_bytes < 1 or self.prefetch < 1:
            raise DataError("loader settings block_bytes and prefetch must be >= 1")


@dataclass
class LoaderStats:
    """What a stream read: rows handed on, blocks, the workers' seconds reading and parsing
    them, lines skipped as bad, the most rows the shuffle buffer held, passes completed."""

    workers: int
    shuffle_rows: int
    rows: int = 0
    blocks: int = 0
    worker_seconds: float = 0.0
    skipped_lines: int = 0
    max_buffered: int = 0
    passes: int = 0

    def add(self, block: RowBlock) -> None:
        self.rows += len(block)
        self.blocks += 1
        self.worker_seconds += block.seconds
        self.skipped_lines += block.skipped

    @property
    def rows_per_second(self) -> float:
        """Rows the loader parses a second with all its workers busy (its capacity)."""
        busy = self.worker_seconds / max(1, self.workers)
        return self.rows / busy if busy > 0 else 0.0

    def to_json(self) -> dict:
        return {
            "mode": "stream",
            "workers": self.workers,
            "shuffle_rows": self.shuffle_rows,
            "rows": self.rows,
            "passes": self.passes,
            "rows_per_second": round(self.rows_per_second, 1),
            "skipped_lines": self.skipped_lines,
            "max_buffered_rows": self.max_buffered,
        }


class StreamedData:
    """Rows ``start`` to ``stop - 1`` of an indexed input, read on demand (module docstring).

    Has the parts of the :class:`~compress.data.dataset.Dataset` interface that fine-tuning and
    evaluation use: ``len``, :meth:`slice`, :meth:`split_tail`, :meth:`batches`,
    ``feature_names``, ``num_dense`` and ``dense_transform``; plus :meth:`train_batches` (endless
    shuffled passes), :meth:`fingerprint` and :meth:`id_counts`.
    """

    def __init__(
        self,
        source: Source,
        feature_names: Sequence[str],
        settings: LoaderSettings,
        name: str,
        start: int = 0,
        stop: int | None = None,
    ) -> None:
        total = int(sum(b.lines for b in source.blocks))
        self.source = source
        self.feature_names = tuple(feature_names)
        self.settings = settings
        self.name = name
        self.start = start
        self.stop = total if stop is None else stop

    def __len__(self) -> int:
        """Rows in the range (lines, bad ones included, for text read with ``skip``)."""
        return self.stop - self.start

    def __repr__(self) -> str:
        return f"StreamedData({self.name}[{self.start}:{self.stop}])"

    @property
    def num_dense(self) -> int:
        src = self.source
        return src.layout.num_dense if isinstance(src, TextSource) else src.num_dense

    @property
    def dense_transform(self) -> str:
        return self.source.dense_transform

    @property
    def exact_rows(self) -> bool:
        """Whether ``len`` is the number of rows read (no bad line is skipped)."""
        return self.source.exact_rows

    @property
    def one_hot_features(self) -> tuple[str, ...]:
        """The features with exactly one id in every bag: all of Criteo text and npy days; a
        Parquet input's plain (not list) id columns; the features of in-process batches whose
        every bag held one id."""
        return tuple(getattr(self.source, "one_hot", self.feature_names))

    def slice(self, start: int, stop: int) -> StreamedData:
        """Rows ``start`` to ``stop - 1`` of this range (clamped, like Python slicing)."""
        start, stop, _ = slice(start, stop).indices(len(self))
        stop = max(start, stop)
        return StreamedData(
            self.source,
            self.feature_names,
            self.settings,
            self.name,
            self.start + start,
            self.start + stop,
        )

    def split_tail(self, fraction: float) -> tuple[StreamedData, StreamedData]:
        """``(train, valid)`` with the last ``round(N * fraction)`` rows held out, as
        :meth:`Dataset.split_tail <compress.data.dataset.Dataset.split_tail>` does."""
        start = tail_start(len(self), fraction)
        return self.slice(0, start), self.slice(start, len(self))

    def reader(self, first_pass: int = 0, passes: int | None = 1) -> BlockReader:
        """A :class:`BlockReader` over this range from pass ``first_pass`` for ``passes`` passes
        (``None``: endlessly)."""
        tasks = region_tasks(self.source, self.start, self.stop)
        if not tasks:
            raise DataError(f"{self.name}: no rows in lines {self.start}-{self.stop}")
        s = self.settings
        first = first_pass * len(tasks)
        workers = 0 if getattr(self.source, "in_process", False) else s.workers
        if passes is not None:  # no more workers than blocks; one block is read here
            blocks = len(tasks) * passes
            workers = 0 if blocks == 1 else min(workers, blocks)
        return BlockReader(
            self.source,
            tasks,
            workers=workers,
            prefetch=s.prefetch,
            first=first,
            stop=None if passes is None else first + passes * len(tasks),
        )

    def pass_chunks(
        self,
        seed: int,
        first_pass: int = 0,
        passes: int | None = 1,
        stats: LoaderStats | None = None,
        reader: BlockReader | None = None,
    ) -> Iterator[tuple[int, RowBlock | None]]:
        """``(pass, rows)`` in training order (shuffled, see the module docstring), then
        ``(pass, None)`` at the end of each pass. Closing the iterator stops the workers.
        ``reader``: the caller's ``self.reader(first_pass, passes)`` (to close it from outside)."""
        reader = reader or self.reader(first_pass, passes)
        n_tasks = len(reader.tasks)
        kind = JaggedShuffleBuffer if getattr(self.source, "jagged", False) else ShuffleBuffer
        buffer = kind(self.settings.shuffle_rows, np.random.default_rng([seed, first_pass]))
        try:
            for t, block in reader:
                p = t // n_tasks
                if stats is not None:
                    stats.add(block)
                out = buffer.push(block)
                if stats is not None:
                    stats.max_buffered = max(stats.max_buffered, buffer.max_size)
                if out is not None:
                    yield p, out
                if (t + 1) % n_tasks == 0:
                    rest = buffer.drain()
                    if rest is not None:
                        yield p, rest
                    if stats is not None:
                        stats.passes += 1
                    yield p, None
                    buffer.reset(np.random.default_rng([seed, p + 1]))
        finally:
            reader.close()

    def batches(
        self,
        batch_size: int,
        *,
        feature_names: Sequence[str],
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ) -> Iterator[Batch]:
        """One pass as :class:`Batch` objects, in file order (``shuffle``: in the training order
        of pass 0 for ``seed``); the last batch is smaller unless ``drop_last``."""
        keys = self._check_features(feature_names)
        check_batch_size(batch_size)
        batcher = Batcher(batch_size)
        if shuffle:
            chunks = (rows for _, rows in self.pass_chunks(seed))
        else:
            chunks = (block for _, block in self.reader())
        try:
            for rows in chunks:
                for full in batcher.add(rows):
                    yield rows_to_batch(full, keys)
        finally:  # also when the caller stops early: the workers end now
            chunks.close()
        rest = batcher.flush()
        if rest is not None and not drop_last:
            yield rows_to_batch(rest, keys)

    def num_batches(self, batch_size: int, *, drop_last: bool = False) -> int:
        """Batches :meth:`batches` yields when no line is skipped."""
        return len(self) // batch_size if drop_last else -(-len(self) // batch_size)

    def train_batches(
        self,
        feature_names: Sequence[str],
        batch_size: int,
        seed: int,
        start_step: int = 0,
        share: tuple[int, int] | None = None,
    ) -> TrainStream:
        """Endless training batches from step ``start_step`` (see :class:`TrainStream`);
        ``share``: rows ``[lo, hi)`` of each batch only."""
        keys = self._check_features(feature_names)
        return TrainStream(self, keys, batch_size, seed, start_step, share=share)

    def fingerprint(self) -> str:
        """Hex sha256 of the range's content: the input's bytes (every file, hashed when indexed;
        npy days on first use), how they are read, the features and the range, and the settings
        that decide the training order (shuffle buffer and block size; not the workers)."""
        return sha256_json(
            {
                "source": self.source.describe(),
                "features": list(self.feature_names),
                "rows": [self.start, self.stop],
                "order": [self.settings.shuffle_rows, self.settings.block_bytes],
            }
        )

    def id_counts(self, spec: DLRMSpec) -> dict[str, torch.Tensor]:
        """How often each row of each table occurs in the range (one pass in file order)."""
        import torch

        counts = {t.name: np.zeros(t.num_embeddings, dtype=np.int64) for t in spec.tables}
        column = {f: j for j, f in enumerate(self.feature_names)}
        for _, block in self.reader():
            for t in spec.tables:
                for f in t.feature_names:
                    ids = block.feature_ids(column[f])
                    counts[t.name] += np.bincount(ids, minlength=t.num_embeddings)[
                        : t.num_embeddings
                    ]
        return {k: torch.from_numpy(v) for k, v in counts.items()}

    def _check_features(self, feature_names: Sequence[str]) -> tuple[str, ...]:
        keys = tuple(feature_names)
        if keys != self.feature_names:
            raise DataError(
                f"{self.name}: streamed features are {list(self.feature_names)}, "
                f"batches asked for {list(keys)}"
            )
        return keys


class TrainStream:
    """Endless training batches over a :class:`StreamedData`: pass after pass, each shuffled for
    ``(seed, pass)``, the last partial batch of a pass dropped; the first batch is the one of step
    ``start_step``. ``stats`` counts what was read; :meth:`close` stops the workers. ``share``
    (a data-parallel worker's): only rows ``[lo, hi)`` of each batch are made into a batch; every
    worker reads the whole stream in the same seeded order, so the shares of one step are disjoint
    parts of the batch a single process would train on.

    A thread of this process starts at once: it fills the shuffle buffer (so the training process
    can evaluate, or anything else, meanwhile) and keeps up to ``prefetch_batches`` batches ready,
    cutting and shuffling while the model trains; :meth:`__next__` waits only when none is ready.
    """

    def __init__(
        self,
        data: StreamedData,
        feature_names: tuple[str, ...],
        batch_size: int,
        seed: int,
        start_step: int,
        prefetch_batches: int = 4,
        share: tuple[int, int] | None = None,
    ) -> None:
        self.data = data
        self.share = share
        self.feature_names = feature_names
        self.batch_size = batch_size
        self.seed = seed
        self.start_step = start_step
        in_process = getattr(data.source, "in_process", False)  # in-process batches: no workers
        self.stats = LoaderStats(
            0 if in_process else data.settings.workers, data.settings.shuffle_rows
        )
        self._first_pass, self._skip = self._position()
        self._reader = data.reader(self._first_pass, None)
        self._ready: queue.Queue = queue.Queue(maxsize=prefetch_batches)
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._produce, name="dqrm-batches", daemon=True)
        self._thread.start()

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> Batch:
        if self._closed:
            raise StopIteration
        kind, value = self._ready.get()
        if kind == "error":
            self.close()
            raise value
        return value

    def close(self) -> None:
        """Stop the thread and the workers (the thread's wait for a block ends with them)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._reader.close()
        self._thread.join()

    def __enter__(self) -> TrainStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _position(self) -> tuple[int, int]:
        """``(pass, batches of it to drop)`` of the first batch (step ``start_step``)."""
        bs = self.batch_size
        if not self.data.exact_rows:  # rows per pass unknown until read: replay from pass 0
            return 0, self.start_step
        per_pass = len(self.data) // bs
        if per_pass < 1:
            raise DataError(f"{self.data.name}: fewer rows than one batch of {bs}")
        return divmod(self.start_step, per_pass)

    def _produce(self) -> None:
        batches = self._batches()
        try:
            for batch in batches:
                if not self._hand_over(("batch", batch)):
                    return
        except BaseException as e:  # the training process raises it at its next batch
            if not self._stop.is_set():
                self._hand_over(("error", e))
        finally:
            batches.close()

    def _hand_over(self, item: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _batches(self) -> Iterator[Batch]:
        bs, skip = self.batch_size, self._skip
        batcher = Batcher(bs)
        yielded_this_pass = 0
        chunks = self.data.pass_chunks(
            self.seed, self._first_pass, None, self.stats, reader=self._reader
        )
        for _, rows in chunks:
            if rows is None:  # end of a pass: its last partial batch is dropped
                batcher.flush()
                if yielded_this_pass == 0:
                    raise DataError(
                        f"{self.data.name}: a pass holds fewer rows than one batch of {bs} "
                        f"({self.stats.skipped_lines} bad lines skipped)"
                    )
                yielded_this_pass = 0
                continue
            for full in batcher.add(rows):
                yielded_this_pass += 1
                if skip:
                    skip -= 1
                    continue
                if self.share is not None:
                    full = full.tail(self.share[0]).head(self.share[1] - self.share[0])
                yield rows_to_batch(full, self.feature_names)


def open_data(
    path: str | Path | Batches,
    spec: DLRMSpec,
    *,
    settings: LoaderSettings | None = None,
    on_bad_line: OnBadLine = "error",
    dense_transform: DenseTransform | None = None,
    columns: ColumnMapping | dict | str | Path | None = None,
) -> Dataset | StreamedData:
    """The samples at ``path`` for a model of shape ``spec``, whole or streamed as ``settings``
    say (module docstring); whole inputs are :func:`compress.data.formats.open_dataset`'s.
    ``path`` may also be in-process TorchRec batches (:mod:`compress.data.batch_source`), which
    stream like files (read whole under the same rule). ``columns``: which Parquet columns hold
    what (:mod:`compress.data.parquet_columns`; Parquet only)."""
    settings = settings or LoaderSettings()
    if dense_transform is not None:
        check_transform(dense_transform, "dense_transform")
    if is_batches(path):
        return _open_batches(path, spec, settings, dense_transform, columns)
    fmt = detect_format(path)
    if settings.stream == "off" or fmt == "npz":
        return _whole(path, spec, on_bad_line, dense_transform, columns)
    streamed = open_stream(
        path,
        spec,
        settings=settings,
        on_bad_line=on_bad_line,
        dense_transform=dense_transform,
        columns=columns,
    )
    if settings.stream == "auto" and len(streamed) <= settings.min_rows:
        return _whole(path, spec, on_bad_line, dense_transform, columns)
    return streamed


def _open_batches(
    batches: Batches,
    spec: DLRMSpec,
    settings: LoaderSettings,
    dense_transform: str | None,
    columns: object,
) -> Dataset | StreamedData:
    """In-process batches, indexed (one pass), then streamed or read whole as for a file."""
    if columns is not None:
        raise DataError(f"{BATCHES_NAME}: a column mapping applies to Parquet data only")
    features = spec.feature_names
    source = index_batches(
        batches,
        feature_names=features,
        num_embeddings=[spec.table_of_feature(f).num_embeddings for f in features],
        num_dense=spec.dense_in_features,
        dense_transform=dense_transform,
    )
    streamed = StreamedData(source, features, settings, name=BATCHES_NAME)
    if settings.stream == "off" or (
        settings.stream == "auto" and len(streamed) <= settings.min_rows
    ):
        from compress.data.source_whole import read_whole

        return read_whole(source)
    return streamed


def open_stream(
    path: str | Path,
    spec: DLRMSpec,
    *,
    settings: LoaderSettings,
    on_bad_line: OnBadLine = "error",
    dense_transform: DenseTransform | None = None,
    columns: ColumnMapping | dict | str | Path | None = None,
) -> StreamedData:
    """Index Criteo text, npy days or Parquet at ``path`` (one pass; Parquet: the footers) for
    streaming."""
    p = Path(path)
    fmt = detect_format(p)
    features = spec.feature_names
    rows = [spec.table_of_feature(f).num_embeddings for f in features]
    if columns is not None and fmt != "parquet":
        raise DataError(f"{p}: a column mapping (--columns) applies to Parquet data only")
    if fmt == "parquet":
        source: Source = index_parquet(  # type: ignore[assignment]
            p,
            feature_names=features,
            num_embeddings=rows,
            num_dense=spec.dense_in_features,
            columns=mapping_from(columns),
            dense_transform=dense_transform,
            block_bytes=settings.block_bytes,
        )
    elif fmt == "npy_days":
        if dense_transform not in (None, "log3"):
            raise DataError(
                f"{p}: dense features are stored 'log3'-transformed, but {dense_transform!r} is "
                "asked for (the model's inputs, or --dense-transform)"
            )
        source = index_npy_days(
            p,
            feature_names=features,
            num_embeddings=rows,
            num_dense=spec.dense_in_features,
            block_bytes=settings.block_bytes,
        )
    elif fmt == "criteo":
        source = index_text(
            p,
            num_dense=spec.dense_in_features,
            num_embeddings=rows,
            skip_bad_lines=on_bad_line == "skip",
            dense_transform=dense_transform or DEFAULT_TEXT_TRANSFORM,
            block_bytes=settings.block_bytes,
        )
    else:
        raise DataError(f"{p}: an .npz dataset is read whole, not streamed")
    data = StreamedData(source, features, settings, name=str(p))
    if len(data) == 0:
        raise DataError(f"{p}: no samples")
    log.debug("%s: indexed %d rows in %d blocks (%s)", p, len(data), len(source.blocks), fmt)
    return data


def _whole(
    path: str | Path,
    spec: DLRMSpec,
    on_bad_line: OnBadLine,
    dense_transform: str | None,
    columns: ColumnMapping | dict | str | Path | None = None,
) -> Dataset:
    return load_dataset(
        path,
        spec,
        on_bad_line=on_bad_line,
        dense_transform=dense_transform,  # type: ignore[arg-type]
        columns=columns,
    ).dataset
