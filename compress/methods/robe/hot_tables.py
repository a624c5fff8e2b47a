"""Hot rows of a sharing group as tensors: which rows, the weighted error of a split, storage.

:func:`rank_rows` orders a group's rows by how often ``--data`` reads them (most first, ties by
global row); the first ``N`` are the hot rows. :class:`SplitErrors` computes the
frequency-weighted reconstruction error ``sum_r count_r * ||w_r - w'_r||^2`` of a split (``N``
hot rows, the rest projected onto an array of the cells left) from the rows the data reads (the
others weigh 0, and with ``projection = "frequency"`` they do not move the array either), which
:func:`compress.methods.robe.hot_rows.choose_hot_rows` minimizes. :func:`fake_quantize_hot_`,
:func:`quantize_hot` and :func:`dequantize_hot` are the stored forms (INT8 row-wise with FBGEMM's
rule, :mod:`compress.quant.fbgemm_rowwise`, or fp16): the lookup while fine-tuning, the export,
and the loaders agree on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from compress.io.model_spec import TableSpec
from compress.io.table_stream import row_chunks
from compress.methods.robe.array import ArrayQuantization, fake_quantize_array
from compress.methods.robe.config import table_offsets
from compress.methods.robe.hashing import robe_indices

#: Rows hashed at a time while evaluating a split.
ERROR_CHUNK_ROWS = 1 << 16


def rank_rows(counts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Global rows of a group (tables in order, ``counts[t]`` ``[rows_t]``) ranked by count,
    most first; equal counts by global row, lowest first."""
    flat = torch.cat([c.reshape(-1).to(torch.int64) for c in counts])
    return torch.sort(-flat, stable=True).indices


def hot_ids_and_values(
    tables: Sequence[tuple[TableSpec, torch.Tensor]], ranked: torch.Tensor, hot_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``hot_rows`` first rows of ``ranked`` as sorted global ids (int64 ``[N]``) and their
    trained values (float32 ``[N, D]``)."""
    ids = torch.sort(ranked[:hot_rows]).values
    offsets = table_offsets([s for s, _ in tables])
    dim = tables[0][0].embedding_dim
    values = torch.empty(len(ids), dim, dtype=torch.float32)
    for (spec, weight), offset in zip(tables, offsets, strict=True):
        here = (ids >= offset) & (ids < offset + spec.num_embeddings)
        if bool(here.any()):
            values[here] = weight.detach().index_select(0, ids[here] - offset).float()
    return ids, values


def tail_weights(
    tables: Sequence[tuple[TableSpec, torch.Tensor]],
    weights: Sequence[torch.Tensor] | None,
    hot_ids: torch.Tensor,
) -> list[torch.Tensor]:
    """Row weights of the tail's projection: ``weights`` (counts; ``None``: 1 each) with the hot
    rows at 0, one float64 ``[rows]`` per table."""
    out = []
    offsets = table_offsets([s for s, _ in tables])
    for i, ((spec, _), offset) in enumerate(zip(tables, offsets, strict=True)):
        w = (
            weights[i].reshape(-1).to(torch.float64).clone()
            if weights is not None
            else torch.ones(spec.num_embeddings, dtype=torch.float64)
        )
        here = hot_ids[(hot_ids >= offset) & (hot_ids < offset + spec.num_embeddings)]
        w[here - offset] = 0.0
        out.append(w)
    return out


# --------------------------------------------------------------------------------------------------
# Stored forms


def fake_quantize_hot_(rows: torch.Tensor, hot_dtype: str) -> torch.Tensor:
    """Round float32 ``rows [n, D]`` in place to what the stored hot table gives back."""
    if hot_dtype == "int8":
        from compress.quant import native

        return native.fake_quantize_rowwise_(rows, 8)
    if hot_dtype == "fp16":
        return rows.copy_(rows.half())
    raise ValueError(f"unknown hot_dtype {hot_dtype!r}")


def quantize_hot(weight: torch.Tensor, hot_dtype: str) -> dict[str, torch.Tensor]:
    """The stored arrays of hot rows ``weight [N, D]``: INT8 ``hot_data`` uint8 ``[N, D]`` codes
    with fp16 ``hot_scale``/``hot_bias`` ``[N]`` (FBGEMM's row-wise rule), or fp16 ``hot_data``."""
    w = weight.detach().float().contiguous()
    if hot_dtype == "int8":
        from compress.quant.fbgemm_rowwise import rowwise_quantize_packed

        data, scale, bias = rowwise_quantize_packed(w, 8)
        return {"hot_data": data, "hot_scale": scale, "hot_bias": bias}
    if hot_dtype == "fp16":
        return {"hot_data": w.half()}
    raise ValueError(f"unknown hot_dtype {hot_dtype!r}")


def dequantize_hot(
    data: np.ndarray, scale: np.ndarray | None, bias: np.ndarray | None
) -> np.ndarray:
    """float32 ``[N, D]`` values of stored hot rows: ``code * scale + bias`` (INT8, one rounding,
    as FBGEMM and the graph compute it) or the fp16 values."""
    if data.dtype == np.float16:
        return data.astype(np.float32)
    if scale is None or bias is None:
        raise ValueError("INT8 hot rows need their scale and bias")
    out = data.astype(np.float32) * scale.astype(np.float32)[:, None]
    return out + bias.astype(np.float32)[:, None]


# --------------------------------------------------------------------------------------------------
# The weighted error of a split


@dataclass
class SeenRows:
    """The rows ``--data`` reads (count > 0), ranked: global ``ids`` int64 ``[S]``, ``counts``
    float64 ``[S]``, trained ``values`` float32 ``[S, D]``, and the prefix sums of the hot rows'
    weighted quantization error (``hot_error[n]``: the first ``n`` rows hot)."""

    ids: torch.Tensor
    counts: torch.Tensor
    values: torch.Tensor
    hot_error: torch.Tensor

    @property
    def total_weight(self) -> float:
        return float(self.counts.sum()) * self.values.shape[1]


def seen_rows(
    tables: Sequence[tuple[TableSpec, torch.Tensor]],
    counts: Sequence[torch.Tensor],
    hot_dtype: str,
) -> SeenRows:
    """The rows of ``tables`` with a count above 0, ranked as :func:`rank_rows` ranks them."""
    offsets = table_offsets([s for s, _ in tables])
    ids, weights, values = [], [], []
    for (_, weight), c, offset in zip(tables, counts, offsets, strict=True):
        c = c.reshape(-1).to(torch.int64)
        for start, stop, rows in row_chunks(weight):
            seen = torch.nonzero(c[start:stop] > 0).reshape(-1)
            if seen.numel():
                ids.append(seen + (start + offset))
                weights.append(c[start:stop][seen])
                values.append(rows.index_select(0, seen).float())
    dim = tables[0][0].embedding_dim
    if not ids:
        empty = torch.zeros(0, dtype=torch.float64)
        return SeenRows(
            torch.zeros(0, dtype=torch.int64), empty, torch.zeros(0, dim), torch.zeros(1)
        )
    gid, cnt, val = torch.cat(ids), torch.cat(weights), torch.cat(values)
    order = torch.sort(-cnt, stable=True).indices  # ids ascend within each chunk and table
    gid, cnt, val = gid[order], cnt[order].to(torch.float64), val[order]
    err = (val - fake_quantize_hot_(val.clone(), hot_dtype)).double().pow(2).sum(1) * cnt
    return SeenRows(gid, cnt, val, torch.cat([torch.zeros(1, dtype=torch.float64), err.cumsum(0)]))


class SplitErrors:
    """``error(n)``: the frequency-weighted squared reconstruction error of the group's seen rows
    with the ``n`` first hot and the rest projected (weighted by count) onto the array that
    ``cells_for(n)`` cells give, read back at ``quantization`` (``None``: fp32)."""

    def __init__(
        self,
        rows: SeenRows,
        cells_for,  # noqa: ANN001 - Callable[[int], int]
        block_size: int,
        constants: tuple[int, int, int],
        quantization: ArrayQuantization | None,
    ) -> None:
        self.rows, self.cells_for = rows, cells_for
        self.block_size, self.constants, self.quantization = block_size, constants, quantization

    def __call__(self, n: int) -> float:
        rows = self.rows
        cells = self.cells_for(n)
        dim = rows.values.shape[1]
        num = torch.zeros(cells, dtype=torch.float64)
        den = torch.zeros(cells, dtype=torch.float64)
        chunks = range(n, rows.ids.numel(), ERROR_CHUNK_ROWS)
        for s in chunks:
            idx, v, c = self._chunk(s, cells)
            w = c.unsqueeze(1).expand(-1, dim)
            num.index_add_(0, idx.reshape(-1), (v.double() * w).reshape(-1))
            den.index_add_(0, idx.reshape(-1), w.reshape(-1))
        array = torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
        array = array.to(torch.float32)
        if self.quantization is not None:
            array = fake_quantize_array(array, self.quantization)
        tail = 0.0
        for s in chunks:
            idx, v, c = self._chunk(s, cells)
            tail += float(((v.double() - array[idx].double()).pow(2).sum(1) * c).sum())
        return float(rows.hot_error[n]) + tail

    def _chunk(self, start: int, cells: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        stop = min(start + ERROR_CHUNK_ROWS, self.rows.ids.numel())
        ids = self.rows.ids[start:stop]
        dim = self.rows.values.shape[1]
        idx = robe_indices(ids, 0, dim, self.block_size, cells, self.constants, validate=False)
        return idx, self.rows.values[start:stop], self.rows.counts[start:stop]
