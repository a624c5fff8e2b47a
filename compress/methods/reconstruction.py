"""How far each stored table is from the checkpoint's: relative RMSE, plain and frequency-weighted.

For table ``W`` (the checkpoint's rows, as loaded) and ``V`` (the rows the compressed model looks
up: dequantized codes, the fp16 values, or a shared array's virtual rows; after fine-tuning when
the recipe fine-tunes, so the number also holds what fine-tuning moved)::

    relative_rmse          = sqrt(sum_i |V_i - W_i|^2 / sum_i |W_i|^2)
    relative_rmse_weighted = sqrt(sum_i c_i |V_i - W_i|^2 / sum_i c_i |W_i|^2)

with ``c_i`` how often row ``i`` occurs in the training data (``None`` when the counts are not
known, or no row of the table occurs). ``rmse`` is the plain root mean squared difference per
value. A table kept as it is (a method that does not change tables, ``keep``) is exact. The plain
figures of a table of more than 2 * :data:`SAMPLE_ROWS` rows are measured on every k-th row
(``rows_measured`` says how many; the cost of the pass stays bounded on 10M-row tables); the
weighted one on every row that occurs, so it is exact.

:func:`measure_tables` reads the checkpoint once, in chunks
(:func:`compress.io.table_stream.row_chunks`: a memory-mapped checkpoint costs a chunk, never its
pages), and on the way computes the sha256 of the weights as loaded, the same digest as
:func:`compress.io.fingerprint.sha256_state_dict` (keys sorted; a table's bytes are fed chunk by
chunk). Differences are taken in float32 and summed per row, the rows in float64; the figures
keep :data:`DIGITS` significant digits, so the chunk size does not change them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from compress.io.dlrm_classes.base import table_of_key
from compress.io.fingerprint import array_header, as_bytes
from compress.io.model_spec import DLRMSpec
from compress.io.table_stream import progress_bytes, row_chunks
from compress.methods import registry
from compress.methods.apply_plan import embedding_parts
from compress.methods.qat_embedding import QuantizedEmbeddingBagCollection
from compress.plan import Plan

#: Significant digits kept of each figure.
DIGITS = 6
#: Tables of more rows than twice this have their plain error measured on a sample of at least
#: this many rows, every k-th row (the error of a quantizer varies little from row to row; its
#: estimate from 262,144 rows is within a fraction of a percent).
SAMPLE_ROWS = 1 << 18

RowReader = Callable[[torch.Tensor], torch.Tensor]  # ids [N] -> float32 rows [N, D]


@dataclass(frozen=True)
class TableError:
    """One table's reconstruction error (see the module docstring); ``exact``: the table is
    stored as it was, so every error is 0; ``measured``: ``False`` when the table's method offers
    no row lookup to compare (the figures are then ``None``); ``rows_measured``: the rows the
    plain figures are over (every row, or every k-th of a large table: :func:`sample_stride`)."""

    name: str
    rmse: float | None
    relative_rmse: float | None
    relative_rmse_weighted: float | None
    rows_seen: int | None
    exact: bool = False
    measured: bool = True
    rows_measured: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rmse": self.rmse,
            "relative_rmse": self.relative_rmse,
            "relative_rmse_weighted": self.relative_rmse_weighted,
            "rows_seen": self.rows_seen,
            "exact": self.exact,
            "measured": self.measured,
            "rows_measured": self.rows_measured,
        }


@dataclass(frozen=True)
class TableMeasurements:
    """Every table's error, in table order, and the sha256 of the weights as loaded (``None``
    when the caller had it already)."""

    errors: tuple[TableError, ...]
    checkpoint_sha256: str | None


def sample_stride(rows: int) -> int:
    """The plain error of a table of ``rows`` rows is measured on every k-th row: k = 1 up to
    2 * :data:`SAMPLE_ROWS` rows, else ``rows // SAMPLE_ROWS`` (at least that many rows)."""
    return max(1, rows // SAMPLE_ROWS)


class _ErrorSums:
    """Running sums of one table's squared differences and squared values: plain over the rows
    :func:`sample_stride` picks, weighted over every row the counts say occurs (the others weigh
    nothing), so only those rows are looked up."""

    def __init__(self, rows: int, counts: torch.Tensor | None) -> None:
        self.stride = sample_stride(rows)
        self.counts = None if counts is None else counts.detach().to(torch.float64).numpy()
        self.err = self.norm = self.err_w = self.norm_w = 0.0
        self.measured = self.values = 0

    def _rows(self, start: int, n: int) -> np.ndarray:
        """Chunk-local rows to look up: the sampled ones and those that occur."""
        picked = np.arange((-start) % self.stride, n, self.stride)
        if self.counts is not None and self.stride > 1:
            picked = np.union1d(picked, np.flatnonzero(self.counts[start : start + n]))
        return picked

    def add(self, start: int, chunk: torch.Tensor, read: RowReader) -> None:
        n = chunk.shape[0]
        local = self._rows(start, n)
        ids = torch.from_numpy(local + start)
        orig = chunk if local.size == n else chunk.index_select(0, torch.from_numpy(local))
        orig = orig.to(torch.float32)
        d = read(ids).to(torch.float32) - orig
        err_rows = (d * d).sum(dim=1).to(torch.float64).numpy()
        norm_rows = (orig * orig).sum(dim=1).to(torch.float64).numpy()
        plain = (local + start) % self.stride == 0
        self.err += float(err_rows[plain].sum())
        self.norm += float(norm_rows[plain].sum())
        self.measured += int(plain.sum())
        self.values += int(plain.sum()) * d.shape[1]
        if self.counts is not None:
            c = self.counts[local + start]
            self.err_w += float(c @ err_rows)
            self.norm_w += float(c @ norm_rows)

    def result(self, name: str) -> TableError:
        seen = None if self.counts is None else int(np.count_nonzero(self.counts))
        return TableError(
            name=name,
            rmse=_round(float(np.sqrt(self.err / self.values))) if self.values else 0.0,
            relative_rmse=_ratio(self.err, self.norm),
            relative_rmse_weighted=_ratio(self.err_w, self.norm_w) if seen else None,
            rows_seen=seen,
            rows_measured=self.measured,
        )


def _round(x: float) -> float:
    return float(f"{x:.{DIGITS}g}")


def _ratio(err: float, norm: float) -> float | None:
    return None if norm <= 0.0 else _round(float(np.sqrt(err / norm)))


def table_error(
    name: str, weight: torch.Tensor, read: RowReader, counts: torch.Tensor | None = None
) -> TableError:
    """The :class:`TableError` of the stored table ``read`` reads against ``weight`` ``[R, D]``
    (the checkpoint's), weighted by ``counts [R]`` when given."""
    sums = _ErrorSums(weight.shape[0], counts)
    with torch.no_grad():
        for start, _, rows in row_chunks(weight):
            sums.add(start, rows, read)
    return sums.result(name)


def row_readers(model: nn.Module, shared: Sequence[Any]) -> dict[str, RowReader]:
    """``{table: ids -> rows}`` of a converted model: each converted table's lookup, and a
    sharing group's virtual rows (its module's ``lookup_rows``) for the groups that offer them."""
    readers: dict[str, RowReader] = {}
    for part in embedding_parts(model):
        if isinstance(part, QuantizedEmbeddingBagCollection):
            readers.update({name: table.lookup for name, table in part.quantized.items()})
    for group in shared:
        lookup = getattr(group.module, "lookup_rows", None)
        if lookup is not None:
            readers.update({t: (lambda ids, t=t, f=lookup: f(t, ids)) for t in group.tables})
    return readers


def measure_tables(
    original: nn.Module,
    converted: nn.Module,
    spec: DLRMSpec,
    plan: Plan,
    shared: Sequence[Any] = (),
    counts: Mapping[str, torch.Tensor] | None = None,
    *,
    fingerprint: bool = True,
) -> TableMeasurements:
    """Every table's :class:`TableError`: ``converted`` (the compressed model, with its prepared
    sharing groups ``shared``) against ``original`` (the loaded checkpoint, which compressing
    leaves untouched), and with ``fingerprint`` the sha256 of ``original``'s weights, in one pass
    over the checkpoint (see the module docstring)."""
    state = original.state_dict()
    readers = row_readers(converted, shared)
    exact = {t.name for t in plan.tables if not registry.for_config(t.config).changes_tables}
    errors: dict[str, TableError] = {}
    for t in spec.tables:
        if t.name in exact:
            seen = None if counts is None else int(torch.count_nonzero(counts[t.name]))
            errors[t.name] = TableError(t.name, 0.0, 0.0, 0.0 if seen else None, seen, exact=True)
        elif t.name not in readers:
            errors[t.name] = TableError(t.name, None, None, None, None, measured=False)
    h = hashlib.sha256() if fingerprint else None
    keys = sorted(state)
    read_keys = [k for k in keys if h is not None or table_of_key(k) not in (None, *errors)]
    total = sum(state[k].numel() * state[k].element_size() for k in read_keys)
    with progress_bytes(total, "checkpoint sha256, table error"), torch.no_grad():
        for key in read_keys:
            name, tensor = table_of_key(key), state[key]
            if h is not None:
                h.update(array_header(key, tensor))
            if name is None:  # a dense tensor: read only to fingerprint (see read_keys)
                h.update(as_bytes(tensor))
                continue
            sums = None
            if name not in errors:
                sums = _ErrorSums(tensor.shape[0], None if counts is None else counts[name])
            for start, _, rows in row_chunks(tensor):
                if h is not None:
                    h.update(as_bytes(rows))
                if sums is not None:
                    sums.add(start, rows, readers[name])
            if sums is not None:
                errors[name] = sums.result(name)
    unread = TableError("", None, None, None, None, measured=False)  # no weight key found
    return TableMeasurements(
        errors=tuple(errors.get(t.name, replace(unread, name=t.name)) for t in spec.tables),
        checkpoint_sha256=None if h is None else h.hexdigest(),
    )
