"""Data read as a stream of row blocks: the first pass that indexes the blocks, and reading one.

A streamed input is cut into **blocks** once, by :func:`index_text` or :func:`index_npy_days`, and
every later pass reads the same blocks (a worker process reads any block alone):

- **Criteo text** (a file, a ``.gz`` or a directory of day files, in natural order): a block is
  whole lines, about ``block_bytes`` (1 MiB by default) of them, cut where the in-memory reader
  (:mod:`compress.data.criteo_text`) cuts when it reads that much at a time; a line longer than
  any valid one is a block of its own that holds one bad line and no bytes. The indexing pass reads every byte once (a ``.gz``
  is decompressed), looks only for line ends (about 1 GB/s, against about 20 MB/s to parse) and
  hashes the bytes for the input's fingerprint. A truncated ``.gz`` is an error naming the last
  line read, before anything is trained.
- **TorchRec npy days**: the headers are read (the shape and dtype checks of
  :mod:`compress.data.criteo_npy`) and each day is cut into blocks of about ``block_bytes``.

Rows are numbered across the input (lines of text, counted over the files in order; samples of
npy days), and a **region** ``[start, stop)`` of those numbers is what a stream reads: the
training part, the selection or report slice. A block read for a region keeps only the region's
lines, cut before parsing, so a bad line outside the region is never looked at.

A read block is a :class:`RowBlock`: labels, transformed dense values and one table row per
feature (streamed inputs are one-hot: one id per bag, as Criteo text and npy days are). Bad lines
are errors naming file and line, or with ``on_bad_line="skip"`` counted in ``RowBlock.skipped``.
A file that no longer matches its index (changed while being read) is a :class:`DataError`.
"""

from __future__ import annotations

import gzip
import hashlib
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from compress.data import criteo_text
from compress.data.criteo_npy import day_paths, find_days, npy_rows_arrays, open_npy_day
from compress.data.criteo_text import (
    CriteoLayout,
    criteo_files,
    describe_bad_line,
    open_text,
    overlong_message,
    parse_block,
    transform_dense,
)
from compress.data.jagged_rows import JaggedRows, concat_jagged
from compress.errors import DataError

#: Bytes of input per block (text: at most this, in whole lines; npy days: rows of about this
#: many bytes). Parsing takes about 36 times a block's bytes of temporary memory, and blocks of
#: 1 MiB parse about twice as fast as blocks of 8 MiB (they stay in the CPU caches).
BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class RowBlock:
    """Rows read from one block: ``labels`` float32 ``[n]``, ``dense`` float32 ``[n, D]``
    (transformed), ``ids`` int64 ``[n, F]`` (table rows, one per feature), ``skipped``: bad lines
    dropped (``on_bad_line="skip"``), ``seconds``: the worker's time to read and parse it."""

    labels: np.ndarray
    dense: np.ndarray
    ids: np.ndarray
    skipped: int = 0
    seconds: float = 0.0

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, index: np.ndarray) -> RowBlock:
        """The rows at ``index`` (a copy)."""
        return RowBlock(self.labels[index], self.dense[index], self.ids[index])

    def head(self, n: int) -> RowBlock:
        return RowBlock(self.labels[:n], self.dense[:n], self.ids[:n])

    def tail(self, n: int) -> RowBlock:
        """Rows ``n`` onwards."""
        return RowBlock(self.labels[n:], self.dense[n:], self.ids[n:])

    def feature_ids(self, j: int) -> np.ndarray:
        """Every id of feature ``j``, in row order."""
        return self.ids[:, j]


def concat_blocks(blocks: Sequence[RowBlock]) -> RowBlock:
    """The rows of ``blocks`` one after another (multi-hot blocks:
    :func:`compress.data.jagged_rows.concat_jagged`)."""
    if len(blocks) == 1:
        return blocks[0]
    if isinstance(blocks[0], JaggedRows):
        return concat_jagged(blocks)  # type: ignore[return-value]
    return RowBlock(
        np.concatenate([b.labels for b in blocks]),
        np.concatenate([b.dense for b in blocks]),
        np.concatenate([b.ids for b in blocks]),
    )


@dataclass(frozen=True)
class TextBlock:
    """One block of a text file: ``size`` bytes from byte ``start`` of the (decompressed) file
    ``file`` (an index into the source's files), holding ``lines`` lines from line ``first_line``
    (1-based, in that file). ``overlong``: one line too long to be valid (no bytes kept);
    ``terminated``: the bytes end with a newline (the last line of a file may not)."""

    file: int
    start: int
    size: int
    first_line: int
    lines: int
    overlong: bool = False
    terminated: bool = True


@dataclass(frozen=True)
class NpyBlock:
    """Samples ``start`` to ``stop - 1`` of day ``days[day]`` of an npy-day source."""

    day: int
    start: int
    stop: int

    @property
    def lines(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class TextSource:
    """An indexed Criteo text input (see the module docstring); picklable, for worker processes.
    ``digests``: sha256 of each file's (decompressed) bytes."""

    files: tuple[Path, ...]
    layout: CriteoLayout
    num_embeddings: tuple[int, ...]
    dense_transform: str
    skip_bad_lines: bool
    blocks: tuple[TextBlock, ...]
    digests: tuple[str, ...]

    @property
    def exact_rows(self) -> bool:
        """Whether every counted line is a row (bad lines are errors, not skipped)."""
        return not self.skip_bad_lines

    def describe(self) -> dict:
        """What the rows are made of, for fingerprints: content and reading options, not paths."""
        return {
            "format": "criteo",
            "sha256": list(self.digests),
            "dense_transform": self.dense_transform,
            "on_bad_line": "skip" if self.skip_bad_lines else "error",
            "num_embeddings": list(self.num_embeddings),
        }


@dataclass(frozen=True)
class NpySource:
    """Indexed TorchRec npy days (see the module docstring); picklable."""

    directory: Path
    days: tuple[int, ...]
    feature_names: tuple[str, ...]
    num_embeddings: tuple[int, ...]
    num_dense: int
    blocks: tuple[NpyBlock, ...]
    dense_transform: str = "log3"
    exact_rows: bool = True
    _digests: list[str] = field(default_factory=list, compare=False, repr=False)

    def describe(self) -> dict:
        """What the rows are made of, for fingerprints: content, not paths."""
        if not self._digests:  # hashed on first use: reads every day file once
            self._digests.extend(
                _file_sha256(p)
                for day in self.days
                for p in day_paths(self.directory, day).values()
            )
        return {
            "format": "npy_days",
            "sha256": list(self._digests),
            "num_embeddings": list(self.num_embeddings),
        }


Source = TextSource | NpySource


def index_text(
    path: str | Path,
    *,
    num_dense: int,
    num_embeddings: Sequence[int],
    skip_bad_lines: bool,
    dense_transform: str,
    block_bytes: int = BLOCK_BYTES,
) -> TextSource:
    """Index a Criteo text file or directory of day files (see the module docstring)."""
    layout = CriteoLayout(num_dense=num_dense, num_sparse=len(num_embeddings))
    files = tuple(criteo_files(path))
    blocks: list[TextBlock] = []
    digests = []
    for number, file in enumerate(files):
        file_blocks, digest = _index_text_file(file, number, layout, block_bytes)
        blocks.extend(file_blocks)
        digests.append(digest)
    return TextSource(
        files=files,
        layout=layout,
        num_embeddings=tuple(int(n) for n in num_embeddings),
        dense_transform=dense_transform,
        skip_bad_lines=skip_bad_lines,
        blocks=tuple(blocks),
        digests=tuple(digests),
    )


def _index_text_file(
    path: Path, number: int, layout: CriteoLayout, block_bytes: int
) -> tuple[list[TextBlock], str]:
    """The blocks of one file and the sha256 of its bytes.

    The file is read as :mod:`compress.data.criteo_text` reads it (``CHUNK_BYTES`` at a time, or
    ``block_bytes`` if less; each read cut after its last newline, an over-long line dropped
    unread), and consecutive reads are joined into blocks of about ``block_bytes`` (at most); a read that
    fails is a :class:`DataError` naming the last line read, the line the in-memory reader names.
    """
    blocks: list[TextBlock] = []
    digest = hashlib.sha256()
    line = 1  # the number of the next line
    offset = 0  # bytes read so far
    rest, rest_start, dropping = b"", 0, False
    pending: TextBlock | None = None  # reads joined so far
    read_bytes = min(criteo_text.CHUNK_BYTES, block_bytes)

    def add(block: TextBlock) -> None:
        nonlocal pending
        joins = (
            pending is not None
            and pending.size + block.size <= block_bytes
            and not (pending.overlong or block.overlong)
            and pending.start + pending.size == block.start
        )
        if joins:
            assert pending is not None
            pending = replace(
                pending,
                size=pending.size + block.size,
                lines=pending.lines + block.lines,
                terminated=block.terminated,
            )
            return
        if pending is not None:
            blocks.append(pending)
        pending = block

    try:
        with open_text(path) as fh:
            while data := fh.read(read_bytes):
                digest.update(data)
                start, offset = offset, offset + len(data)
                if dropping:  # inside an over-long line: its bytes are dropped up to its newline
                    cut = data.find(b"\n") + 1
                    if not cut:
                        continue
                    data, start, dropping = data[cut:], start + cut, False
                if rest:
                    data, start = rest + data, rest_start
                cut = data.rfind(b"\n") + 1
                if cut:
                    lines = data.count(b"\n", 0, cut)
                    add(TextBlock(number, start, cut, line, lines))
                    line += lines
                rest, rest_start = data[cut:], start + cut
                if len(rest) > layout.max_line_bytes:
                    add(TextBlock(number, rest_start, 0, line, 1, overlong=True))
                    line += 1
                    rest, dropping = b"", True
            if rest:
                add(TextBlock(number, rest_start, len(rest), line, 1, terminated=False))
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(
            f"{path}: cannot be read after line {line - 1} ({e or type(e).__name__})"
        ) from None
    if pending is not None:
        blocks.append(pending)
    return blocks, digest.hexdigest()


def index_npy_days(
    directory: str | Path,
    *,
    feature_names: Sequence[str],
    num_embeddings: Sequence[int],
    num_dense: int,
    block_bytes: int = BLOCK_BYTES,
) -> NpySource:
    """Index a directory of TorchRec npy days: every day's headers are checked, nothing else read."""
    d = Path(directory)
    days = find_days(d)
    if not days:
        raise DataError(f"{d}: no day_<i>_dense.npy files")
    blocks: list[NpyBlock] = []
    for i, day in enumerate(days):
        opened = open_npy_day(d, day, len(feature_names), num_dense)
        row_bytes = sum(a.itemsize * int(np.prod(a.shape[1:])) for a in _arrays(opened))
        step = max(1, block_bytes // max(1, row_bytes))
        blocks.extend(
            NpyBlock(i, s, min(s + step, opened.rows)) for s in range(0, opened.rows, step)
        )
        del opened  # unmap
    return NpySource(
        directory=d,
        days=tuple(days),
        feature_names=tuple(feature_names),
        num_embeddings=tuple(int(n) for n in num_embeddings),
        num_dense=num_dense,
        blocks=tuple(blocks),
    )


def block_lines(source: Source) -> np.ndarray:
    """Rows (lines of text) of each block, int64."""
    return np.fromiter((b.lines for b in source.blocks), dtype=np.int64, count=len(source.blocks))


@dataclass(frozen=True)
class Task:
    """Read lines ``lo`` to ``hi - 1`` of block ``block`` (0-based within the block)."""

    block: int
    lo: int
    hi: int


def region_tasks(source: Source, start: int, stop: int) -> tuple[Task, ...]:
    """The block parts that hold rows ``start`` to ``stop - 1`` of ``source``, in order."""
    sizes = block_lines(source)
    ends = np.cumsum(sizes)
    begins = ends - sizes
    tasks = []
    for b in np.flatnonzero((ends > start) & (begins < stop)):
        lo = max(start - int(begins[b]), 0)
        hi = min(stop - int(begins[b]), int(sizes[b]))
        tasks.append(Task(int(b), lo, hi))
    return tuple(tasks)


class BlockFiles:
    """Open files of one reader (one per worker process), for reading blocks in order."""

    def __init__(self) -> None:
        self._open: dict[Path, BinaryIO] = {}
        #: what a source that reads its own blocks keeps between them (a Parquet row group's
        #: reader, an iterator over in-process batches); closed with the files
        self.state: dict[object, Any] = {}

    def read(self, path: Path, start: int, size: int) -> bytes:
        fh = self._open.get(path)
        if fh is not None and isinstance(fh, gzip.GzipFile) and fh.tell() > start:
            fh.close()  # a .gz seeks forward only: open it again to go back
            fh = None
        if fh is None:
            fh = open_text(path)
            self._open[path] = fh
        fh.seek(start)
        return fh.read(size)

    def close(self) -> None:
        for fh in self._open.values():
            fh.close()
        self._open.clear()
        for kept in self.state.values():
            if hasattr(kept, "close"):
                kept.close()
        self.state.clear()


def read_task(source: Source, task: Task, files: BlockFiles) -> RowBlock:
    """The rows of one task (a :class:`DataError` names file and line of a bad line). Sources
    other than text and npy days read their own blocks (``source.read(task, files)``: Parquet,
    in-process batches), one-hot as a ``RowBlock`` or multi-hot as
    :class:`~compress.data.jagged_rows.JaggedRows`."""
    started = time.perf_counter()
    if isinstance(source, TextSource):
        block = _read_text(source, task, files)
    elif isinstance(source, NpySource):
        block = _read_npy(source, task)
    else:
        block = source.read(task, files)
    return replace(block, seconds=time.perf_counter() - started)


def _read_text(source: TextSource, task: Task, files: BlockFiles) -> RowBlock:
    block = source.blocks[task.block]
    path = source.files[block.file]
    layout = source.layout
    first = block.first_line + task.lo
    if block.overlong:
        if not source.skip_bad_lines:
            raise DataError(f"{path}:{first}: {overlong_message(layout)}")
        return _empty(layout, skipped=1)
    try:
        data = files.read(path, block.start, block.size)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(
            f"{path}: cannot be read after line {block.first_line - 1} ({e or type(e).__name__})"
        ) from None
    if len(data) != block.size or (block.terminated and not data.endswith(b"\n")):
        raise _changed(path, block)
    if not block.terminated:
        data += b"\n"
    if task.lo or task.hi < block.lines:
        ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
        if ends.size != block.lines:
            raise _changed(path, block)
        a = 0 if task.lo == 0 else int(ends[task.lo - 1]) + 1
        data = data[a : int(ends[task.hi - 1]) + 1]
    parsed = parse_block(data, layout)
    if parsed.num_lines != task.hi - task.lo:
        raise _changed(path, block)
    if parsed.bad_lines.size and not source.skip_bad_lines:
        index = int(parsed.bad_lines[0])
        raise DataError(f"{path}:{first + index}: {describe_bad_line(data, index, layout)}")
    modulus = np.asarray(source.num_embeddings, dtype=np.uint64)
    return RowBlock(
        labels=parsed.labels.astype(np.float32),
        dense=transform_dense(parsed.dense, source.dense_transform),  # type: ignore[arg-type]
        ids=(parsed.sparse % modulus).astype(np.int64),
        skipped=int(parsed.bad_lines.size),
    )


def _read_npy(source: NpySource, task: Task) -> RowBlock:
    block = source.blocks[task.block]
    # mapped for this block only: pages of a day read long ago do not stay in this process
    day = open_npy_day(
        source.directory, source.days[block.day], len(source.feature_names), source.num_dense
    )
    start, stop = block.start + task.lo, block.start + task.hi
    if stop > day.rows:
        raise DataError(f"{day.paths['dense']}: changed while being read (fewer rows)")
    ids, dense = npy_rows_arrays(day, start, stop, source.num_embeddings, source.feature_names)
    labels = np.asarray(day.labels[start:stop], dtype=np.float32)
    return RowBlock(labels=labels, dense=dense, ids=ids)


def _empty(layout: CriteoLayout, skipped: int = 0) -> RowBlock:
    return RowBlock(
        labels=np.zeros(0, np.float32),
        dense=np.zeros((0, layout.num_dense), np.float32),
        ids=np.zeros((0, layout.num_sparse), np.int64),
        skipped=skipped,
    )


def _changed(path: Path, block: TextBlock) -> DataError:
    return DataError(
        f"{path}: changed while being read (lines {block.first_line}-"
        f"{block.first_line + block.lines - 1} differ from the first pass)"
    )


def _arrays(day) -> tuple[np.ndarray, ...]:
    return day.dense, day.sparse, day.labels


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while data := fh.read(BLOCK_BYTES):
            digest.update(data)
    return digest.hexdigest()
