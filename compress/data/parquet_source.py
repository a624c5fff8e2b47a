"""Parquet data (pyarrow): files or directories of them, indexed once and read in row-group parts.

A Parquet input is one ``.parquet``/``.pq`` file (or a file starting with ``PAR1``), or a
directory of them (its other files must be hidden or start with ``_``, as Spark's ``_SUCCESS``
does; files are read in natural order, ``part-2`` before ``part-10``). Which columns hold the label,
the dense features and each sparse feature is a :class:`~compress.data.parquet_columns.ColumnMapping`.

:func:`index_parquet` reads only the files' footers: every file's schema is checked against the
mapping and the model (a missing column or one of the wrong type is an error naming the file and
the column), and every row group is cut into **blocks** of about ``block_bytes`` of decoded rows
(estimated from the footer's uncompressed column sizes). Reading a block decodes its rows
(``ParquetFile.iter_batches`` over its row group; a worker reading the next part of the same row
group goes on where it stopped, and one that skips parts decodes them), with column chunks read
256 KiB at a time and decoded page by page: memory depends on the block size and the file's page
size (1 MiB a column by default), not on the size of the file or of its row groups. Rows are
numbered across the files in order, like lines of Criteo text, so the held-out tail
and the validation slices are ranges of those numbers (:mod:`compress.data.stream`).

A block whose columns are all plain integer ids reads to a one-hot
:class:`~compress.data.stream_source.RowBlock`; when any sparse column holds lists, every block
reads to :class:`~compress.data.jagged_rows.JaggedRows` (bags of any size). Nulls, negative ids,
ids beyond a table (unless the mapping says ``"ids": "hash"``), labels other than 0/1 and NaN/inf
dense values are :class:`DataError` naming the file, the row (counted from 0 in that file) and the
column. pyarrow is an optional dependency (the ``parquet`` extra): without it reading Parquet is
a one-line error that says how to install it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compress.data.criteo_text import natural_key
from compress.data.dataset import take_jagged
from compress.data.dense_transform import DEFAULT_TEXT_TRANSFORM, check_transform
from compress.data.jagged_rows import JaggedRows
from compress.data.parquet_columns import ColumnMapping, ResolvedColumns, resolve_columns
from compress.data.stream_source import BLOCK_BYTES, BlockFiles, RowBlock, Task
from compress.errors import DataError, first_line

if TYPE_CHECKING:
    import pyarrow as pa

PARQUET_SUFFIXES: tuple[str, ...] = (".parquet", ".pq")
PARQUET_MAGIC = b"PAR1"
INSTALL_HINT = "pip install 'dqrm-compress[parquet]' (`make setup` installs it)"
_CURSOR = "parquet-cursor"
#: Bytes of a column chunk read at a time (its pages are decoded as they arrive): without it pyarrow
#: reads a whole column chunk of a row group at once, and memory would grow with row groups.
_READ_BUFFER = 1 << 18


def require_pyarrow(what: str | Path) -> None:
    """:class:`DataError` naming ``what`` and how to install pyarrow when it cannot be imported."""
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:
        raise DataError(
            f"{what}: reading Parquet needs pyarrow, which is not installed ({first_line(e)}): "
            f"{INSTALL_HINT}"
        ) from None


def is_parquet_file(path: Path) -> bool:
    """A file named ``*.parquet``/``*.pq`` or starting with ``PAR1``."""
    if path.suffix.lower() in PARQUET_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(len(PARQUET_MAGIC)) == PARQUET_MAGIC
    except OSError:
        return False


def is_parquet_dir(path: Path) -> bool:
    """A directory holding at least one ``*.parquet``/``*.pq`` file (hidden ones aside)."""
    return any(
        f.is_file() and not _ignored(f) and f.suffix.lower() in PARQUET_SUFFIXES
        for f in path.iterdir()
    )


def parquet_files(path: str | Path) -> list[Path]:
    """``[path]`` for a file; a directory's Parquet files in natural order (see the module
    docstring; another data file there is a :class:`DataError` naming it)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise DataError(f"{p}: no such file or directory")
    files = sorted(
        (f for f in p.iterdir() if f.is_file() and not _ignored(f)),
        key=lambda f: natural_key(f.name),
    )
    if not files:
        raise DataError(f"{p}: directory holds no data files")
    for f in files:
        if not is_parquet_file(f):
            raise DataError(
                f"{f}: not a Parquet file, in a directory of Parquet files (move it, or name it "
                "with a leading _ or .)"
            )
    return files


def _ignored(f: Path) -> bool:
    return f.name.startswith((".", "_"))


@dataclass(frozen=True)
class ParquetBlock:
    """Rows ``start`` to ``stop - 1`` of row group ``row_group`` of file ``files[file]``; its
    first row is row ``first_row`` of the file."""

    file: int
    row_group: int
    start: int
    stop: int
    first_row: int

    @property
    def lines(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ParquetSource:
    """An indexed Parquet input (module docstring); picklable, for worker processes.

    ``stored_transform``: the transform the stored dense values already had (the mapping's), or
    ``None`` when they are raw and ``apply_transform`` is applied while reading. ``sizes``: each
    file's bytes when indexed (a file changed since is an error)."""

    files: tuple[Path, ...]
    columns: ResolvedColumns
    feature_names: tuple[str, ...]
    num_embeddings: tuple[int, ...]
    num_dense: int
    stored_transform: str | None
    apply_transform: str | None
    hash_ids: bool
    blocks: tuple[ParquetBlock, ...]
    sizes: tuple[int, ...]
    row_groups: tuple[tuple[int, ...], ...]
    exact_rows: bool = True
    _digests: list[str] = field(default_factory=list, compare=False, repr=False)

    @property
    def dense_transform(self) -> str:
        """The transform the rows' dense values have once read."""
        return self.stored_transform or self.apply_transform or DEFAULT_TEXT_TRANSFORM

    @property
    def jagged(self) -> bool:
        """Whether blocks read to :class:`JaggedRows` (some sparse column holds lists)."""
        return any(self.columns.multi_hot)

    @property
    def one_hot(self) -> tuple[str, ...]:
        """The features whose column holds one id a row."""
        return tuple(
            f for f, m in zip(self.feature_names, self.columns.multi_hot, strict=True) if not m
        )

    def describe(self) -> dict:
        """What the rows are made of, for fingerprints: content and reading options, not paths."""
        if not self._digests:  # hashed on first use: reads every file once
            self._digests.extend(_file_sha256(p) for p in self.files)
        return {
            "format": "parquet",
            "sha256": list(self._digests),
            "columns": {
                "label": self.columns.label,
                "dense": list(self.columns.dense),
                "sparse": list(self.columns.sparse),
            },
            "stored_transform": self.stored_transform,
            "apply_transform": self.apply_transform,
            "ids": "hash" if self.hash_ids else "rows",
            "num_embeddings": list(self.num_embeddings),
        }

    def read(self, task: Task, files: BlockFiles) -> RowBlock | JaggedRows:
        """The rows of one task (see :func:`compress.data.stream_source.read_task`)."""
        block = self.blocks[task.block]
        start, stop = block.start + task.lo, block.start + task.hi
        cursor = files.state.get(_CURSOR)
        if cursor is None or not cursor.reaches(block.file, block.row_group, start):
            if cursor is not None:
                cursor.close()
            cursor = _Cursor(self, block.file, block.row_group, block.lines)
            files.state[_CURSOR] = cursor
        batches = cursor.read(start, stop)
        return self._rows(batches, self.files[block.file], block.first_row + task.lo)

    def _rows(self, batches: list, path: Path, first_row: int) -> RowBlock | JaggedRows:
        import pyarrow as pa

        table = pa.Table.from_batches(batches)
        cols = self.columns
        labels = _labels(_column(table, cols.label), path, cols.label, first_row)
        dense = self._dense(table, path, first_row)
        parts = [
            _ids(
                _column(table, name),
                path,
                name,
                feature,
                rows,
                self.hash_ids,
                first_row,
            )
            for feature, name, rows in zip(
                self.feature_names, cols.sparse, self.num_embeddings, strict=True
            )
        ]
        n = len(labels)
        if not self.jagged:
            ids = np.empty((n, len(parts)), dtype=np.int64)
            for j, (values, _) in enumerate(parts):
                ids[:, j] = values
            return RowBlock(labels=labels, dense=dense, ids=ids)
        return _row_major(labels, dense, parts)

    def _dense(self, table: pa.Table, path: Path, first_row: int) -> np.ndarray:
        n = table.num_rows
        raw = np.empty((n, len(self.columns.dense)), dtype=np.float64)
        for j, name in enumerate(self.columns.dense):
            arr = _column(table, name)
            _no_nulls(arr, path, name, f"dense feature {j}", first_row)
            raw[:, j] = arr.to_numpy(zero_copy_only=False)
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite results: reported below
            if self.apply_transform is not None:
                _finite(raw, path, self.columns.dense, first_row, "is not finite")
                from compress.data.criteo_text import transform_dense

                dense = transform_dense(raw, self.apply_transform)  # type: ignore[arg-type]
            else:
                dense = raw.astype(np.float32)
        _finite(dense, path, self.columns.dense, first_row, "is not a finite float32", raw)
        return dense


class _Cursor:
    """A reader over one row group that goes on where it stopped (one per reading process)."""

    def __init__(self, source: ParquetSource, file: int, row_group: int, batch_rows: int) -> None:
        import pyarrow.parquet as pq

        path = source.files[file]
        self.file, self.row_group = file, row_group
        self.path = path
        try:
            size = os.stat(path).st_size
            self._pf = pq.ParquetFile(path, buffer_size=_READ_BUFFER, pre_buffer=False)
        except Exception as e:  # pyarrow raises its own errors for a file that is not Parquet
            raise DataError(f"{path}: cannot be read as Parquet ({first_line(e)})") from None
        meta = self._pf.metadata
        groups = tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))
        if size != source.sizes[file] or groups != source.row_groups[file]:
            self.close()
            raise DataError(f"{path}: changed while being read (its row groups differ)")
        self._batches = self._pf.iter_batches(
            batch_size=max(1, batch_rows),
            row_groups=[row_group],
            columns=list(source.columns.names),
            use_threads=False,
        )
        self.position = 0  # row of the row group that ``pending`` starts at
        self.pending: Any = None

    def reaches(self, file: int, row_group: int, start: int) -> bool:
        return (file, row_group) == (self.file, self.row_group) and start >= self.position

    def read(self, start: int, stop: int) -> list:
        """Record batches holding rows ``start`` to ``stop - 1`` of the row group."""
        out = []
        while self.position < stop:
            if self.pending is None:
                try:
                    self.pending = next(self._batches)
                except StopIteration:
                    raise DataError(
                        f"{self.path}: changed while being read (row group {self.row_group} "
                        f"ends before row {stop})"
                    ) from None
                except Exception as e:
                    raise DataError(
                        f"{self.path}: row group {self.row_group} cannot be read ({first_line(e)})"
                    ) from None
            batch, n = self.pending, self.pending.num_rows
            lo, hi = max(0, start - self.position), min(n, stop - self.position)
            if lo < hi:
                out.append(batch.slice(lo, hi - lo))
            if self.position + n <= stop:
                self.position += n
                self.pending = None
            else:
                self.pending = batch.slice(stop - self.position)
                self.position = stop
        return out

    def close(self) -> None:
        self._pf.close()


def index_parquet(
    path: str | Path,
    *,
    feature_names: Sequence[str],
    num_embeddings: Sequence[int],
    num_dense: int,
    columns: ColumnMapping,
    dense_transform: str | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> ParquetSource:
    """Index a Parquet file or directory (module docstring): footers only, nothing decoded.
    ``dense_transform``: what raw dense values are read with (default ``log3``); with a mapping
    that records the stored values' transform, another one is a :class:`DataError`."""
    p = Path(path)
    require_pyarrow(p)
    import pyarrow.parquet as pq

    if dense_transform is not None:
        check_transform(dense_transform, "dense_transform")
    stored, apply = columns.dense_transform, None
    if stored is None:
        apply = dense_transform or DEFAULT_TEXT_TRANSFORM
    elif dense_transform is not None and dense_transform != stored:
        raise DataError(
            f"{p}: dense features are stored {stored!r}-transformed (the column mapping's "
            f"dense_transform), but {dense_transform!r} is asked for (the model's inputs, or "
            "--dense-transform)"
        )
    files = parquet_files(p)
    resolved: ResolvedColumns | None = None
    multi_hot = [False] * len(feature_names)
    blocks: list[ParquetBlock] = []
    sizes, groups = [], []
    for number, file in enumerate(files):
        try:
            size = os.stat(file).st_size
            pf = pq.ParquetFile(file)
        except Exception as e:  # ArrowInvalid, OSError...: not Parquet, truncated, unreadable
            raise DataError(f"{file}: cannot be read as Parquet ({first_line(e)})") from None
        try:
            these = resolve_columns(columns, pf.schema_arrow, feature_names, num_dense, file)
            if resolved is not None and these.dense != resolved.dense:
                raise DataError(
                    f"{file}: its dense columns ({', '.join(these.dense)}) differ from "
                    f"{files[0].name}'s ({', '.join(resolved.dense)}); name them with a column "
                    "mapping"
                )
            resolved = resolved or these
            multi_hot = [a or b for a, b in zip(multi_hot, these.multi_hot, strict=True)]
            meta = pf.metadata
            rows = tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))
            blocks.extend(_file_blocks(number, meta, rows, these.names, block_bytes))
        finally:
            pf.close()
        sizes.append(size)
        groups.append(rows)
    assert resolved is not None
    return ParquetSource(
        files=tuple(files),
        columns=ResolvedColumns(resolved.label, resolved.dense, resolved.sparse, tuple(multi_hot)),
        feature_names=tuple(feature_names),
        num_embeddings=tuple(int(n) for n in num_embeddings),
        num_dense=num_dense,
        stored_transform=stored,
        apply_transform=apply,
        hash_ids=columns.ids == "hash",
        blocks=tuple(blocks),
        sizes=tuple(sizes),
        row_groups=tuple(groups),
    )


def _file_blocks(
    number: int, meta, rows: tuple[int, ...], names: tuple[str, ...], block_bytes: int
) -> list[ParquetBlock]:
    """The blocks of one file: each row group cut into parts of about ``block_bytes`` decoded."""
    wanted = set(names)
    blocks = []
    first = 0
    for g, n in enumerate(rows):
        if n == 0:
            continue
        group = meta.row_group(g)
        size = sum(
            group.column(c).total_uncompressed_size
            for c in range(group.num_columns)
            if group.column(c).path_in_schema.split(".")[0] in wanted
        )
        row_bytes = max(8 * len(names), size // n)
        step = max(1, block_bytes // row_bytes)
        if n <= step + step // 2:  # a part shorter than half a block joins the one before
            step = n
        for s in range(0, n, step):
            stop = n if n - s < step + step // 2 else s + step
            blocks.append(ParquetBlock(number, g, s, stop, first + s))
            if stop == n:
                break
        first += n
    return blocks


def _column(table: pa.Table, name: str):
    return table.column(name).combine_chunks()


def _no_nulls(arr, path: Path, name: str, role: str, first_row: int) -> None:
    if arr.null_count:
        valid = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        row = first_row + int(np.argmin(valid))
        raise DataError(
            f"{path}: row {row}, column {name!r} ({role}): null; every value must be present"
        )


def _labels(arr, path: Path, name: str, first_row: int) -> np.ndarray:
    _no_nulls(arr, path, name, "the label", first_row)
    raw = np.asarray(arr.to_numpy(zero_copy_only=False))
    labels = raw.astype(np.float32)
    bad = (labels != 0) & (labels != 1)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(
            f"{path}: row {first_row + i}, column {name!r} (the label): value {raw[i].item()!r} "
            "is not a label (0 or 1)"
        )
    return labels


def _finite(
    values: np.ndarray,
    path: Path,
    names: Sequence[str],
    first_row: int,
    what: str,
    shown: np.ndarray | None = None,
) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        i, j = (int(x) for x in np.argwhere(bad)[0])
        value = (values if shown is None else shown)[i, j].item()
        raise DataError(
            f"{path}: row {first_row + i}, column {names[j]!r} (dense feature {j}): value "
            f"{value!r} {what}"
        )


def _ids(
    arr,
    path: Path,
    name: str,
    feature: str,
    rows: int,
    hash_ids: bool,
    first_row: int,
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(ids int64, lengths int64 [n] or None for a one-id column)`` of one sparse column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    role = f"feature {feature!r}"
    _no_nulls(arr, path, name, role, first_row)
    lengths = None
    if pa.types.is_integer(arr.type):
        raw = np.asarray(arr.to_numpy(zero_copy_only=False))
        row_of = None
    else:
        flat = arr.flatten()
        lengths = np.asarray(pc.list_value_length(arr).to_numpy(zero_copy_only=False), np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if flat.null_count:
            valid = np.asarray(flat.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
            k = int(np.argmin(valid))
            row = first_row + int(np.searchsorted(offsets, k, side="right")) - 1
            raise DataError(
                f"{path}: row {row}, column {name!r} ({role}): a null id in the list; every id "
                "must be present"
            )
        raw = np.asarray(flat.to_numpy(zero_copy_only=False))
        row_of = offsets
    if raw.dtype.kind == "i" and raw.size and raw.min() < 0:
        k = int(np.argmax(raw < 0))
        raise DataError(
            f"{path}: row {_row(first_row, k, row_of)}, column {name!r} ({role}): id "
            f"{int(raw[k])} is negative; ids must be non-negative"
        )
    if hash_ids:
        ids = (raw.astype(np.uint64) % np.uint64(rows)).astype(np.int64)
    else:
        beyond = raw >= rows
        if beyond.any():
            k = int(np.argmax(beyond))
            raise DataError(
                f"{path}: row {_row(first_row, k, row_of)}, column {name!r} ({role}): id "
                f"{int(raw[k])} is beyond its table's {rows} rows (a column mapping with "
                '"ids": "hash" takes id % rows)'
            )
        ids = raw.astype(np.int64)
    return ids, lengths


def _row(first_row: int, k: int, offsets: np.ndarray | None) -> int:
    """The file row of id ``k`` of a column (``offsets``: the bags' offsets of a list column)."""
    if offsets is None:
        return first_row + k
    return first_row + int(np.searchsorted(offsets, k, side="right")) - 1


def _row_major(
    labels: np.ndarray, dense: np.ndarray, parts: list[tuple[np.ndarray, np.ndarray | None]]
) -> JaggedRows:
    """:class:`JaggedRows` from per-feature ``(ids, lengths)`` (feature-major)."""
    n, f = len(labels), len(parts)
    lengths = np.empty((n, f), dtype=np.int64)
    for j, (_, ln) in enumerate(parts):
        lengths[:, j] = 1 if ln is None else ln
    values = np.concatenate([ids for ids, _ in parts]) if parts else np.zeros(0, np.int64)
    offsets = np.zeros(n * f + 1, dtype=np.int64)
    np.cumsum(lengths.T.reshape(-1), out=offsets[1:])  # feature-major bags
    order = (
        np.arange(n, dtype=np.int64)[:, None] + np.arange(f, dtype=np.int64)[None, :] * n
    ).reshape(-1)
    values, _ = take_jagged(values, offsets, order)
    return JaggedRows(labels=labels, dense=dense, lengths=lengths, values=values)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while data := fh.read(BLOCK_BYTES):
            digest.update(data)
    return digest.hexdigest()
