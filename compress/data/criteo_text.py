"""Reader for Criteo's raw text format: one click sample per line.

A line holds tab-separated fields: the label (``0`` or ``1``), ``num_dense`` integer fields and
``num_sparse`` hexadecimal categorical fields; an empty field is a missing value. Criteo Kaggle and
Terabyte use 13 and 26, other counts are allowed. Input is one file (plain or gzip, recognised by its
magic bytes) or a directory of day files read in natural order (``day_2`` before ``day_10``).

Conversion, following TorchRec's ``BinaryCriteoUtils.tsv_to_npys``:

- categorical: ``row = int(field, 16) % num_embeddings`` of the feature's table, missing -> ``0``
  (before the modulo, as TorchRec does). Fields are 1 to 16 hex digits.
- dense: missing -> ``0``; then ``dense_transform="log3"`` (default) gives ``log(max(x, -2) + 3)``.
  TorchRec computes ``log(x - min + 2)`` with ``min`` taken over the whole file; for Criteo that
  minimum is ``-1``, so the trained models expect ``log(x + 3)``. Values below ``-2`` (absent from
  Criteo) would make that ``log`` of a non-positive number; clipping them to ``-2`` keeps the
  result finite. ``dense_transform="none"`` keeps the raw integers (as float32). Dense fields are an
  optional ``-`` and at most 18 decimal digits.
- a line with the wrong number of fields, a label other than ``0``/``1``, a non-integer dense field
  or a non-hex categorical field is a :class:`DataError` naming ``file:line`` (1-based), or with
  ``on_bad_line="skip"`` it is dropped and counted. An empty line is a bad line too, and so is a
  line longer than the longest valid one (:attr:`CriteoLayout.max_line_bytes`; its bytes are
  dropped unread). A file that cannot be read to its end (truncated or corrupt gzip) is a
  :class:`DataError` naming the last line read, whatever ``on_bad_line`` says.

Parsing is vectorized over blocks of ~8 MiB: field boundaries come from the positions of tabs and
newlines, and every column is decoded with numpy lookup tables, with no Python object per field.
"""

from __future__ import annotations

import gzip
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal

import numpy as np

from compress.data.dense_transform import DENSE_TRANSFORMS, DenseTransform
from compress.errors import DataError

if TYPE_CHECKING:  # the block parser stays free of torch: stream workers import only numpy
    from compress.data.dataset import Dataset

OnBadLine = Literal["error", "skip"]
ON_BAD_LINE = ("error", "skip")

CHUNK_BYTES = 8 << 20
MAX_HEX_DIGITS = 16
MAX_DEC_DIGITS = 18
_GZIP_MAGIC = b"\x1f\x8b"
_TAB, _NL, _CR, _MINUS = 9, 10, 13, ord("-")
_BAD = 255


def _digit_table(digits: str) -> np.ndarray:
    table = np.full(256, _BAD, dtype=np.uint8)
    for i, c in enumerate(digits):
        table[ord(c)] = i
        table[ord(c.upper())] = i
    return table


_HEX = _digit_table("0123456789abcdef")
_DEC = _digit_table("0123456789")
# Decimal weights; positions past 18 digits only ever meet lines already rejected.
_POW10 = np.array([10**k if k <= MAX_DEC_DIGITS else 0 for k in range(24)], dtype=np.int64)
_PAD = np.zeros(32, dtype=np.uint8)


@dataclass(frozen=True)
class CriteoLayout:
    """Column counts of a line: label, ``num_dense`` integer fields, ``num_sparse`` hex fields."""

    num_dense: int
    num_sparse: int

    @property
    def num_columns(self) -> int:
        return 1 + self.num_dense + self.num_sparse

    @property
    def max_line_bytes(self) -> int:
        """Length of the longest valid line: every field at its widest (``-`` and 18 digits, 16
        hex digits), the tabs and a ``\\r``. Any longer line is malformed whatever it holds."""
        dense = self.num_dense * (MAX_DEC_DIGITS + 1)
        return 1 + dense + self.num_sparse * MAX_HEX_DIGITS + (self.num_columns - 1) + 1


@dataclass(frozen=True)
class CriteoRead:
    """What :func:`read_criteo` returns: the samples, the files read, and the lines skipped."""

    dataset: Dataset
    files: tuple[Path, ...]
    skipped_lines: int


@dataclass
class ParsedBlock:
    """Decoded lines of one block: ``labels`` [n] uint8, ``dense`` int64 [n, num_dense], ``sparse``
    uint64 [n, num_sparse] (raw hex values), and ``bad_lines``: 0-based indices, within the block, of
    the lines that failed (they are not in the arrays)."""

    labels: np.ndarray
    dense: np.ndarray
    sparse: np.ndarray
    bad_lines: np.ndarray
    num_lines: int


def read_criteo(
    path: str | Path,
    *,
    num_dense: int,
    num_sparse: int,
    feature_names: Sequence[str],
    num_embeddings: Sequence[int],
    on_bad_line: OnBadLine = "error",
    dense_transform: DenseTransform = "log3",
) -> CriteoRead:
    """Read a Criteo text file or directory of day files into a :class:`Dataset`.

    Categorical column ``j`` becomes feature ``feature_names[j]`` (one id per bag) with rows modulo
    ``num_embeddings[j]``. Raises :class:`DataError` on a bad line (unless ``on_bad_line="skip"``),
    when ``num_sparse`` differs from the number of feature names, or when no sample is left.
    """
    if on_bad_line not in ON_BAD_LINE:
        raise ValueError(f"on_bad_line must be one of {ON_BAD_LINE}, got {on_bad_line!r}")
    if dense_transform not in DENSE_TRANSFORMS:
        raise ValueError(
            f"dense_transform must be one of {DENSE_TRANSFORMS}, got {dense_transform!r}"
        )
    if len(feature_names) != num_sparse:
        raise DataError(
            f"{num_sparse} categorical columns but {len(feature_names)} feature names "
            f"({list(feature_names)})"
        )
    if len(num_embeddings) != num_sparse or min(num_embeddings, default=1) < 1:
        raise ValueError("num_embeddings needs one positive row count per categorical column")
    layout = CriteoLayout(num_dense=num_dense, num_sparse=num_sparse)
    files = criteo_files(path)
    modulus = np.asarray(num_embeddings, dtype=np.uint64)
    labels, dense, sparse = [], [], []
    skipped = 0
    for file in files:
        for block in _parse_file(file, layout, skip=on_bad_line == "skip"):
            labels.append(block.labels)
            dense.append(block.dense)
            sparse.append(block.sparse % modulus)
            skipped += int(block.bad_lines.size)
    n = sum(a.shape[0] for a in labels)
    if n == 0:
        what = f" ({skipped} malformed lines skipped)" if skipped else ""
        raise DataError(f"{path}: no samples{what}")
    rows = np.concatenate(sparse).astype(np.int64)
    offsets = np.arange(n + 1, dtype=np.int64)
    from compress.data.dataset import Dataset

    dataset = Dataset(
        dense=transform_dense(np.concatenate(dense), dense_transform),
        labels=np.concatenate(labels).astype(np.float32),
        values={f: np.ascontiguousarray(rows[:, j]) for j, f in enumerate(feature_names)},
        offsets={f: offsets for f in feature_names},
        dense_transform=dense_transform,
    )
    return CriteoRead(dataset=dataset, files=tuple(files), skipped_lines=skipped)


def criteo_files(path: str | Path) -> list[Path]:
    """``[path]`` for a file; a directory's non-hidden regular files in natural order."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = [f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")]
        if not files:
            raise DataError(f"{p}: directory holds no data files")
        return sorted(files, key=lambda f: natural_key(f.name))
    raise DataError(f"{p}: no such file or directory")


def natural_key(name: str) -> list[str | int]:
    """Sort key that orders digit runs by value: ``day_2`` < ``day_10``."""
    return [int(t) if t.isdecimal() else t for t in re.split(r"(\d+)", name)]


def transform_dense(raw: np.ndarray, kind: DenseTransform) -> np.ndarray:
    """float32 dense features from raw integers: ``log(max(x, -2) + 3)`` for ``"log3"``, as-is for
    ``"none"``."""
    if kind == "log3":
        return np.log(np.maximum(raw, -2).astype(np.float64) + 3.0).astype(np.float32)
    if kind == "none":
        return raw.astype(np.float32)
    raise ValueError(f"dense_transform must be one of {DENSE_TRANSFORMS}, got {kind!r}")


def is_gzip(path: Path) -> bool:
    """Whether ``path`` starts with the gzip signature (the suffix does not matter)."""
    with open(path, "rb") as fh:
        return fh.read(2) == _GZIP_MAGIC


def _parse_file(path: Path, layout: CriteoLayout, *, skip: bool) -> Iterator[ParsedBlock]:
    """Parsed blocks of one file; raises :class:`DataError` at the first bad line unless ``skip``.

    A file that cannot be read to its end (a truncated or corrupt ``.gz``) is a :class:`DataError`
    naming the last line read, also with ``skip``: its remaining lines are unknown.
    """
    first_line = 1
    blocks = _read_blocks(path, layout.max_line_bytes)
    while True:
        try:
            block = next(blocks, None)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(
                f"{path}: cannot be read after line {first_line - 1} ({e or type(e).__name__})"
            ) from None
        if block is None:
            return
        if isinstance(block, _OverlongLine):
            if not skip:
                raise DataError(f"{path}:{first_line}: {overlong_message(layout)}")
            first_line += 1
            yield _skipped_line(layout)
            continue
        parsed = parse_block(block, layout)
        if parsed.bad_lines.size and not skip:
            index = int(parsed.bad_lines[0])
            raise DataError(
                f"{path}:{first_line + index}: {describe_bad_line(block, index, layout)}"
            )
        first_line += parsed.num_lines
        yield parsed


@dataclass(frozen=True)
class _OverlongLine:
    """Stands, in :func:`_read_blocks`' output, for one line too long to be valid (its bytes are
    dropped unread, so a huge line without a newline never fills memory)."""


def _read_blocks(path: Path, max_line_bytes: int) -> Iterator[bytes | _OverlongLine]:
    """Blocks of whole lines (each ends with a newline; one is added at the end of the file), and
    an :class:`_OverlongLine` for each line found longer than ``max_line_bytes``. Read errors
    propagate (:func:`_parse_file` names the line)."""
    with open_text(path) as fh:
        rest = b""
        dropping = False  # inside an over-long line: discard up to its newline
        while data := fh.read(CHUNK_BYTES):
            if dropping:
                cut = data.find(b"\n") + 1
                if not cut:
                    continue
                data, dropping = data[cut:], False
            data = rest + data
            cut = data.rfind(b"\n") + 1
            rest = data[cut:]
            if cut:
                yield data[:cut]
            if len(rest) > max_line_bytes:
                rest, dropping = b"", True
                yield _OverlongLine()
        if rest:
            yield rest + b"\n"


def _skipped_line(layout: CriteoLayout) -> ParsedBlock:
    """The :class:`ParsedBlock` of one line that was rejected before parsing."""
    return ParsedBlock(
        labels=np.zeros(0, np.uint8),
        dense=np.zeros((0, layout.num_dense), np.int64),
        sparse=np.zeros((0, layout.num_sparse), np.uint64),
        bad_lines=np.zeros(1, np.int64),
        num_lines=1,
    )


def open_text(path: Path) -> BinaryIO:
    """``path`` opened for binary reading, decompressed when it starts with the gzip signature."""
    if is_gzip(path):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def parse_block(block: bytes, layout: CriteoLayout) -> ParsedBlock:
    """Decode a block of whole lines (ending with ``\\n``) with vectorized numpy."""
    buf = np.frombuffer(block, dtype=np.uint8)
    ncols = layout.num_columns
    seps = np.flatnonzero((buf == _TAB) | (buf == _NL))
    line_end_idx = np.flatnonzero(buf[seps] == _NL)
    num_lines = int(line_end_idx.size)
    fields_per_line = np.diff(line_end_idx, prepend=-1)
    starts = np.empty(seps.size, dtype=np.int64)
    starts[0] = 0
    starts[1:] = seps[:-1] + 1
    ends = seps
    good = fields_per_line == ncols
    if not good.all():
        keep = np.repeat(good, fields_per_line)
        starts, ends = starts[keep], ends[keep]
    starts = starts.reshape(-1, ncols)
    ends = ends.reshape(-1, ncols).copy()
    # Windows line endings: a '\r' before the newline belongs to the separator.
    last_start, last_end = starts[:, -1], ends[:, -1]
    cr = (last_end > last_start) & (buf[np.maximum(last_end - 1, 0)] == _CR)
    ends[cr, -1] -= 1
    lengths = ends - starts

    padded = np.concatenate([_PAD, buf, _PAD])
    starts += _PAD.size
    ends += _PAD.size
    label_ok, labels = _parse_labels(padded, starts[:, 0], lengths[:, 0])
    d = slice(1, 1 + layout.num_dense)
    s = slice(1 + layout.num_dense, ncols)
    dense_ok, dense = _parse_decimal(padded, ends[:, d], lengths[:, d])
    sparse_ok, sparse = _parse_hex(padded, ends[:, s], lengths[:, s])
    ok = label_ok & dense_ok.all(axis=1) & sparse_ok.all(axis=1)

    good_lines = np.flatnonzero(good)
    bad = np.sort(np.concatenate([np.flatnonzero(~good), good_lines[~ok]]))
    return ParsedBlock(
        labels=labels[ok], dense=dense[ok], sparse=sparse[ok], bad_lines=bad, num_lines=num_lines
    )


def _right_windows(padded: np.ndarray, ends: np.ndarray, width: int) -> np.ndarray:
    """The ``width`` bytes before each field end, ``[..., width]``: fields come right-aligned, so
    digit ``k`` of every window has the same positional weight."""
    view = np.lib.stride_tricks.sliding_window_view(padded, width)
    return view[ends - width]


def _any_last(mask: np.ndarray) -> np.ndarray:
    """``mask.any(axis=-1)`` for a last axis of a multiple of 8 booleans, read 8 at a time."""
    words = np.ascontiguousarray(mask).view(np.uint64)
    return (words != 0).any(axis=-1) if words.shape[-1] > 1 else words[..., 0] != 0


def _width(lengths: np.ndarray, cap: int) -> int:
    """Window width: the longest field (at most ``cap``) rounded up to a multiple of 8."""
    longest = int(lengths.max()) if lengths.size else 0
    return max(8, -(-min(longest, cap) // 8) * 8)


def _parse_labels(
    padded: np.ndarray, starts: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    first = padded[starts]
    ok = (lengths == 1) & ((first == ord("0")) | (first == ord("1")))
    return ok, (first - ord("0")).astype(np.uint8)


def _parse_decimal(
    padded: np.ndarray, ends: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(ok, value)`` of optionally negative decimal fields ending at ``ends``; empty -> 0.

    A field longer than the window (``-`` plus 18 digits) is rejected by its length alone: its
    first byte lies outside the window, so only fields that fit are looked at for a sign.
    """
    width = _width(lengths, MAX_DEC_DIGITS + 1)
    chars = _right_windows(padded, ends, width)
    digits = _DEC[chars]
    fits = lengths <= width
    inside = np.arange(width, dtype=np.int64) >= (width - lengths)[..., None]
    first = np.clip(width - lengths, 0, width - 1)[..., None]
    neg = (np.take_along_axis(chars, first, axis=-1)[..., 0] == _MINUS) & (lengths > 0) & fits
    bad = inside & (digits == _BAD)
    bad[neg, width - lengths[neg]] = False  # the sign is not a digit
    ok = fits & ~_any_last(bad) & ~(neg & (lengths == 1)) & (lengths - neg <= MAX_DEC_DIGITS)
    digits[~inside | (digits == _BAD)] = 0  # also clears the sign
    value = digits.astype(np.int64) @ _POW10[width - 1 :: -1]
    return ok, np.where(ok, np.where(neg, -value, value), 0)


def _parse_hex(
    padded: np.ndarray, ends: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(ok, value)`` of hex fields (at most 16 digits) ending at ``ends``, as uint64; empty -> 0."""
    width = _width(lengths, MAX_HEX_DIGITS)
    chars = _right_windows(padded, ends, width)
    nibbles = _HEX[chars]
    outside = np.arange(width, dtype=np.int64) < (width - lengths)[..., None]
    bad = ~outside & (nibbles == _BAD)
    ok = ~_any_last(bad) & (lengths <= MAX_HEX_DIGITS)
    nibbles[outside | bad] = 0
    packed = np.ascontiguousarray((nibbles[..., 0::2] << 4) | nibbles[..., 1::2])
    value = packed.view(f">u{width // 2}")[..., 0].astype(np.uint64)
    return ok, np.where(ok, value, 0).astype(np.uint64)


def describe_bad_line(block: bytes, index: int, layout: CriteoLayout) -> str:
    """Why line ``index`` (0-based) of a block of whole lines is malformed, in words."""
    return diagnose_line(_nth_line(block, index), layout)


def _nth_line(block: bytes, index: int) -> bytes:
    start = 0
    for _ in range(index):
        start = block.index(b"\n", start) + 1
    return block[start : block.index(b"\n", start)]


def diagnose_line(line: bytes, layout: CriteoLayout) -> str:
    """Why one line is malformed, in words (used for the error message of a bad line)."""
    if len(line) > layout.max_line_bytes:
        return overlong_message(layout)
    text = line.decode("utf-8", errors="replace").removesuffix("\r")
    fields = text.split("\t")
    if len(fields) != layout.num_columns:
        return (
            f"expected {layout.num_columns} tab-separated fields (label, {layout.num_dense} "
            f"integer, {layout.num_sparse} hex), found {len(fields)}"
        )
    if fields[0] not in ("0", "1"):
        return f"label must be 0 or 1, got {_show(fields[0])}"
    for j, field in enumerate(fields[1 : 1 + layout.num_dense]):
        if field and not re.fullmatch(rf"-?[0-9]{{1,{MAX_DEC_DIGITS}}}", field):
            what = (
                f"has more than {MAX_DEC_DIGITS} digits"
                if re.fullmatch(r"-?[0-9]+", field)
                else "is not an integer"
            )
            return f"integer field {j + 1} (column {j + 2}) {what}: {_show(field)}"
    for j, field in enumerate(fields[1 + layout.num_dense :]):
        if field and not re.fullmatch(rf"[0-9a-fA-F]{{1,{MAX_HEX_DIGITS}}}", field):
            column = j + 2 + layout.num_dense
            what = (
                f"has more than {MAX_HEX_DIGITS} hex digits (64 bits)"
                if re.fullmatch(r"[0-9a-fA-F]+", field)
                else "is not hexadecimal"
            )
            return f"categorical field {j + 1} (column {column}) {what}: {_show(field)}"
    return "malformed line"


def overlong_message(layout: CriteoLayout) -> str:
    """The reason given for a line longer than any valid one."""
    return (
        f"line longer than {layout.max_line_bytes:,} bytes, the most {layout.num_columns} valid "
        "fields can take"
    )


def _show(field: str, limit: int = 40) -> str:
    return repr(field if len(field) <= limit else field[:limit] + "...")
