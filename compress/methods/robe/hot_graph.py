"""The hot-row lookup of a shared ROBE-Z table as ONNX nodes (numpy only).

A group with hot rows (:mod:`compress.methods.robe.hot_rows`) stores their global rows sorted
(``hot_ids``, int32 or int64 ``[H]``) and their values (INT8 codes ``[H, D]`` with fp16 scale and
bias ``[H]``, or fp16 ``[H, D]``). For ids ``i`` of table ``t`` (global row ``g = i + O_t``) the
graph finds each row's place among the hot ids, one of two ways:

- **dense remap** when the hot ids are all below :data:`DENSE_REMAP_MAX_ROWS`: an int32 table
  ``remap[g]`` = slot or -1 (one more entry, -1, for every ``g`` past the largest hot id), one
  ``Gather``; the table is built at export and held by the graph (at most 256 KB);
- **binary search** otherwise, over the stored ids read in place: the ids padded to ``2^k``
  entries with ``INT64_MAX`` (ONNX Runtime folds that at load time), then ``k`` rounds of
  ``c += b if sorted[c + b - 1] <= g`` (``b`` = ``2^(k-1) .. 1``), so ``c`` counts the hot ids
  ``<= g`` and ``g`` is hot when ``sorted[c - 1] == g``.

Then ``Where(hot, hot rows, array rows)``: hot rows dequantized as the row-wise tables are
(``code * scale + bias`` in float32, or ``Cast`` of fp16), the others read from the array as
before. Exact: the same rows as the PyTorch module (:meth:`~compress.methods.robe.module.
RobeEmbeddingBagCollection._rows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from exporters.onnx.lookup import RowsRequest

#: Hot ids all below this use a dense remap table (int32, so at most 256 KB); above, a search.
DENSE_REMAP_MAX_ROWS = 1 << 16
_INT64_MAX = np.iinfo(np.int64).max
#: ``onnx.TensorProto.INT64`` (compress builds graphs without importing onnx).
_ONNX_INT64 = 7


def hot_ids_problem(ids: np.ndarray, rows_total: int) -> str | None:
    """Why stored hot ids (int ``[H]``, H > 0) cannot be served, else ``None``: they must be
    strictly increasing global rows in ``[0, rows_total)`` (the binary search reads them as
    stored, so unsorted or repeated ids would select wrong rows silently)."""
    ids = np.asarray(ids, dtype=np.int64)
    if int(ids[0]) < 0 or int(ids[-1]) >= rows_total or bool((ids[1:] <= ids[:-1]).any()):
        return f"hot ids must be strictly increasing global rows in [0, {rows_total})"
    return None


@dataclass(frozen=True)
class HotRowsTable:
    """Hot rows of a group as stored: sorted global ``ids`` ``[H]``, ``data`` (uint8 codes or
    fp16 values ``[H, D]``), fp16 ``scale``/``bias`` ``[H]`` for INT8 (else ``None``)."""

    ids: np.ndarray
    data: np.ndarray
    scale: np.ndarray | None = None
    bias: np.ndarray | None = None

    @property
    def num_rows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def dense_remap(self) -> bool:
        """Whether the graph finds slots by a dense remap table (else by binary search)."""
        return self.num_rows > 0 and int(self.ids[-1]) < DENSE_REMAP_MAX_ROWS

    def validate(self, dim: int, rows_total: int, what: str) -> None:
        h = self.num_rows
        if self.ids.dtype not in (np.int32, np.int64) or self.ids.ndim != 1 or h == 0:
            raise ValueError(f"{what}: hot ids must be int32 or int64 [H], H > 0")
        problem = hot_ids_problem(self.ids, rows_total)
        if problem:
            raise ValueError(f"{what}: {problem}")
        if self.data.dtype == np.uint8:
            for arr, name in ((self.scale, "scale"), (self.bias, "bias")):
                if arr is None or arr.dtype != np.float16 or arr.shape != (h,):
                    raise ValueError(f"{what}: INT8 hot rows need a float16 {name} [{h}]")
        elif self.data.dtype != np.float16 or self.scale is not None or self.bias is not None:
            raise ValueError(f"{what}: hot rows must be uint8 codes (with scale, bias) or float16")
        if self.data.shape != (h, dim):
            raise ValueError(f"{what}: hot rows {list(self.data.shape)}, expected [{h}, {dim}]")

    def remap(self) -> np.ndarray:
        """int32 ``[max id + 2]``: slot of each global row, -1 for a row that is not hot."""
        ids = np.asarray(self.ids, dtype=np.int64)
        out = np.full(int(ids[-1]) + 2, -1, dtype=np.int32)
        out[ids] = np.arange(ids.shape[0], dtype=np.int32)
        return out


def add_hot_slots(request: RowsRequest, hot: HotRowsTable, name: str, rows: str) -> tuple[str, str]:
    """``(hit, slot)`` for global rows ``rows`` (int64 ``[N]``): bool ``[N]`` and int64 ``[N]``
    (0 where not hot). Initializers ``robe.<name>.hot_*`` are shared by the group's tables."""
    gb = request.gb
    i64 = gb.const("zero_i64", 0, np.int64)
    if hot.dense_remap:
        remap = hot.remap()
        table = gb.initializer(f"robe.{name}.hot_remap", remap)
        last = gb.const("hot_remap_last", remap.shape[0] - 1, np.int64)
        at = gb.op("Gather", [table, gb.op("Min", [rows, last], "hot_row")], "hot_remap", axis=0)
        found = gb.op("Cast", [at], "hot_slot_found", to=_ONNX_INT64)
        hit = gb.op("GreaterOrEqual", [found, i64], "hot_hit")
        return hit, gb.op("Max", [found, i64], "hot_slot")
    stored = gb.initializer(f"robe.{name}.hot_ids", hot.ids)
    ids = (
        stored if hot.ids.dtype == np.int64 else gb.op("Cast", [stored], "hot_ids", to=_ONNX_INT64)
    )
    size = 1 << hot.num_rows.bit_length()  # a power of two > H: every probe stays inside
    pad = gb.op(
        "Expand",
        [gb.const("int64_max", _INT64_MAX, np.int64), gb.const("hot_pad", [size - hot.num_rows])],
        "hot_pad_ids",
    )
    padded = gb.op("Concat", [ids, pad], "hot_ids_padded", axis=0)
    count = None
    step = size >> 1
    while step:
        probe = gb.const("hot_probe", step - 1, np.int64)
        if count is None:  # first round: one probe for every row
            value = gb.op("Gather", [padded, probe], "hot_probe_id", axis=0)
            below = gb.op("LessOrEqual", [value, rows], "hot_le")
            count = gb.op("Where", [below, gb.const("hot_step", step, np.int64), i64], "hot_c")
        else:
            at = gb.op("Add", [count, probe], "hot_at")
            value = gb.op("Gather", [padded, at], "hot_probe_id", axis=0)
            below = gb.op("LessOrEqual", [value, rows], "hot_le")
            more = gb.op("Add", [count, gb.const("hot_step", step, np.int64)], "hot_c_more")
            count = gb.op("Where", [below, more, count], "hot_c")
        step >>= 1
    one = gb.const("one_i64", 1, np.int64)
    slot = gb.op("Max", [gb.op("Sub", [count, one], "hot_slot_raw"), i64], "hot_slot")
    same = gb.op("Equal", [gb.op("Gather", [padded, slot], "hot_found", axis=0), rows], "hot_same")
    hit = gb.op("And", [gb.op("Greater", [count, i64], "hot_any"), same], "hot_hit")
    return hit, slot


def add_hot_rows(request: RowsRequest, hot: HotRowsTable, name: str, slot: str) -> str:
    """float32 ``[N, D]``: the hot rows at ``slot`` as stored, dequantized."""
    gb = request.gb
    data = gb.initializer(f"robe.{name}.hot_data", hot.data)
    rows = request.to_float(gb.op("Gather", [data, slot], "hot_rows_stored", axis=0), "hot_f32")
    if hot.scale is None:
        return rows
    params = []
    for role, values in (("hot_scale", hot.scale), ("hot_bias", hot.bias)):
        init = gb.initializer(f"robe.{name}.{role}", values.reshape(-1, 1))
        params.append(request.to_float(gb.op("Gather", [init, slot], role, axis=0), role))
    return gb.op("Add", [gb.op("Mul", [rows, params[0]], "hot_scaled"), params[1]], "hot_rows")


def add_hot_select(request: RowsRequest, hot: HotRowsTable, name: str, rows: str, tail: str) -> str:
    """``Where(hot, hot rows, tail)`` for global rows ``rows`` (int64 ``[N]``) whose array rows
    are ``tail`` (float32 ``[N, D]``)."""
    gb = request.gb
    hit, slot = add_hot_slots(request, hot, name, rows)
    axes = gb.const("axes_last", np.asarray([-1], dtype=np.int64))
    hit = gb.op("Unsqueeze", [hit, axes], "hot_hit_2d")
    return gb.op("Where", [hit, add_hot_rows(request, hot, name, slot), tail], "rows")
