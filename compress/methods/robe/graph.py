"""The ROBE-Z lookup as ONNX nodes: a table's graph table and the int64 hash of (row, dim).

:class:`RobeTable` is what the exporter holds for a table reading a shared array (the array as
stored: float32, float16, or int8 with one scale); :func:`onnx_rows` hashes every element the ids
read with int64 ``Add``/``Mul``/``Mod`` exactly as :mod:`compress.methods.robe.hashing` does,
gathers it from the array and dequantizes only what it gathered (``Cast``, then ``Mul`` by the
scale for int8: the same float32 values as dequantizing the whole array first), so a saved graph
can read the stored file in place (:meth:`compress.methods.robe.method.RobeMethod.onnx_rows`).
A table whose group keeps hot rows (``hot``) then reads those from their own table
(:mod:`compress.methods.robe.hot_graph`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from compress.methods.robe.config import METHOD
from compress.methods.robe.hashing import (
    DEFAULT_SEED,
    MAX_TOTAL_ROWS,
    ROBE_PRIME,
    robe_constants,
)
from compress.methods.robe.hot_graph import HotRowsTable, add_hot_select

if TYPE_CHECKING:
    from exporters.onnx.lookup import RowsRequest


@dataclass(frozen=True)
class RobeTable:
    """Graph table: the ROBE-Z view of a shared ``array`` [M] (float32, float16, or int8 whose
    values are ``q * scale``); element ``(i, d)`` =
    ``array[((i + O)*R3 + (d // Z)*R2 + R1) mod P mod (M - Z + 1) + d mod Z]``.

    Tables that share one array must pass the same ``array_name`` (and the same array); the graph
    then holds it once. ``num_rows`` is the table's virtual row count, ``table_offset`` the sum of
    the row counts of the tables before it in the shared array. ``hot``: the group's hot rows
    (the same for every table of the group), read in place of the array's.
    """

    array: np.ndarray
    num_rows: int
    block_size: int
    table_offset: int
    seeds: tuple[int, int, int] = tuple(robe_constants(DEFAULT_SEED))
    prime: int = ROBE_PRIME
    array_name: str = "robe_array"
    scale: float | None = None
    hot: HotRowsTable | None = None
    METHOD: ClassVar[str] = METHOD

    def validate(self, dim: int, what: str) -> None:
        if self.array.dtype not in (np.float32, np.float16, np.int8) or self.array.ndim != 1:
            raise ValueError(f"{what}: ROBE array must be float32, float16 or int8 [M]")
        if (self.scale is not None) != (self.array.dtype == np.int8):
            raise ValueError(f"{what}: an int8 ROBE array needs one scale (other arrays none)")
        if not 1 <= self.block_size <= self.array.shape[0]:
            raise ValueError(f"{what}: block size {self.block_size} does not fit the array")
        if self.table_offset < 0 or self.num_rows < 0 or min(self.seeds) < 0:
            raise ValueError(f"{what}: ROBE offsets and seeds must be non-negative")
        hi = (self.table_offset + self.num_rows) * max(self.seeds[2], 1)
        hi += (dim // self.block_size + 1) * self.seeds[1] + self.seeds[0]
        if hi >= 2**63:
            raise ValueError(f"{what}: ROBE hash overflows int64")
        if self.hot is not None:
            self.hot.validate(dim, MAX_TOTAL_ROWS, what)

    def special_ids(self) -> np.ndarray:
        """The table's hot rows (ids inside it, int64): the export's parity check samples them
        (:mod:`exporters.onnx.parity_ids`); none without hot rows."""
        if self.hot is None:
            return np.zeros(0, dtype=np.int64)
        ids = np.asarray(self.hot.ids, dtype=np.int64) - self.table_offset
        return ids[(ids >= 0) & (ids < self.num_rows)]


def robe_index_constants(kind: RobeTable, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-dim int64 constants ``[1, D]``: ``(d // Z)*R2 + R1`` and ``d mod Z``."""
    d = np.arange(dim, dtype=np.int64)
    r1, r2, _ = kind.seeds
    return ((d // kind.block_size) * r2 + r1)[None, :], (d % kind.block_size)[None, :]


def onnx_rows(request: RowsRequest) -> str:
    """int64 ``Add``/``Mul``/``Mod`` hash of (row, dim), ``Gather`` from the array as stored,
    then ``Cast`` to float32 (and ``Mul`` by the scale) when it is not float32; with hot rows,
    ``Where`` each row is hot, its row from the hot table."""
    gb, kind, dim = request.gb, request.table.kind, request.table.dim
    array = gb.initializer(f"robe.{request.sanitize(kind.array_name)}", kind.array)
    dim_key, dim_off = robe_index_constants(kind, dim)
    offset = gb.const("robe_offset", kind.table_offset, np.int64)
    global_row = gb.op("Add", [request.ids, offset], "robe_row")
    row = gb.op("Mul", [global_row, gb.const("robe_r3", kind.seeds[2], np.int64)], "robe_row_key")
    axes = gb.const("axes_last", np.asarray([-1], dtype=np.int64))
    row = gb.op("Unsqueeze", [row, axes], "robe_row_key_2d")
    key = gb.op("Add", [row, gb.const("robe_dim_key", dim_key)], "robe_key")  # [N, D]
    key = gb.op("Mod", [key, gb.const("robe_prime", kind.prime, np.int64)], "robe_hash", fmod=0)
    span = kind.array.shape[0] - kind.block_size + 1
    key = gb.op("Mod", [key, gb.const("robe_span", span, np.int64)], "robe_block", fmod=0)
    index = gb.op("Add", [key, gb.const("robe_dim_offset", dim_off)], "robe_index")
    if kind.array.dtype == np.float32:
        rows = gb.op("Gather", [array, index], "rows", axis=0)
    else:
        rows = request.to_float(gb.op("Gather", [array, index], "robe_cells", axis=0), "robe_f32")
        if kind.scale is not None:
            rows = gb.op("Mul", [rows, gb.const("robe_scale", np.float32(kind.scale))], "rows")
    if kind.hot is None:
        return rows
    return add_hot_select(request, kind.hot, request.sanitize(kind.array_name), global_row, rows)
