"""Embedding lookups as ONNX subgraphs: gather the rows of a batch's ids, then jagged sum pooling.

Each builder appends nodes to a :class:`~exporters.onnx.spec.GraphBuilder` and returns the name of
the value it produced. At run time only the gathered rows are dequantized; small row-wise tables are
dequantized whole once, when ONNX Runtime creates the session (constant folding).

* **Rows** of one table (:func:`add_gather`, ids int64 ``[N]`` -> float32 ``[N, D]``): the table's
  method builds them (:meth:`compress.methods.registry.TableMethod.onnx_rows`, given a
  :class:`RowsRequest`): ``Gather`` (+ ``Cast``) for float tables, ``GatherBlockQuantized`` or
  unpack + ``code*scale + bias`` for row-wise ones, unpack + ``DequantizeLinear`` for table-wise
  ones, an int64 hash + ``Gather`` for shared (ROBE-Z) arrays.
* **Out-of-range ids** (:data:`OUT_OF_RANGE_IDS`): an id outside ``[0, rows)`` of its table reads
  row 0 of its own table, as FBGEMM's bounds check does (``BoundsCheckMode.WARNING``), in every
  layout (:func:`~exporters.onnx.ops.add_valid_ids`, :mod:`exporters.onnx.stacked_rows` too):
  never a neighbour table's row, a wrapped negative index or an arbitrary hashed cell.
* **Pooling** (:mod:`exporters.onnx.pooling`): running sums, deterministic at any thread count.
* **All features at once** (:func:`add_sparse_arch`, what the full model uses): features are
  grouped by how their rows are computed and each group runs one chain of ops over all its ids:
  row-wise tables of one bit width are gathered table by table from their stored arrays and
  dequantized in one pass (:mod:`exporters.onnx.stacked_rows`; tables whose float32 copy takes at
  most 1 MiB are dequantized whole once, by ONNX Runtime's constant folding at session load, and
  gathered as float32 rows), other tables are gathered feature by feature and pooled together. No table initializer is derived from a stored array (a saved
  graph reads the table files in place, :mod:`exporters.onnx.stored_arrays`). Features the data shows one-hot form groups of their own (a layout hint only: any
  batch is served exactly).

Example::

    gb = GraphBuilder("lookup")
    ids = gb.add_input("ids", TensorProto.INT64, ["n"])
    rows = add_gather(gb, table, ids)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto

from compress.methods import registry
from exporters.onnx.ops import FeatureInputs, add_unpack, add_valid_ids, concat
from exporters.onnx.pooling import add_cumsum_pool, pool_group
from exporters.onnx.spec import (
    BATCH,
    MS_DOMAIN,
    GraphBuilder,
    TableLookup,
    sanitize_name,
)
from exporters.onnx.stacked_rows import (
    add_dequantized_group,
    add_stacked_group,
    dequantize_at_load,
)

#: How row-wise tables are looked up (:func:`compress.methods.rowwise.resolve_rowwise_impl`):
#: ``gbq`` (``com.microsoft::GatherBlockQuantized``), ``standard`` ops, or ``auto`` (by bit width;
#: the full model groups them by bit width unless ``gbq``, which adds float32 scales and zero
#: points computed from the stored arrays).
RowwiseImpl = Literal["auto", "gbq", "standard"]
#: The pooling every graph uses, recorded in the manifest's ``onnx.export`` section.
POOLING = "cumsum"
#: What a lookup does with an id outside ``[0, rows)``, recorded in the manifest's ``onnx`` section.
OUT_OF_RANGE_IDS = "row0_of_own_table"


@dataclass(frozen=True)
class RowsRequest:
    """What a method's ONNX row builder gets: the graph, the table (its ``kind`` the method's
    graph table), its ids (int64 ``[N]``, inside the table), the row-wise option, and helpers
    that keep initializer names and node shapes the same for every method."""

    gb: GraphBuilder
    table: TableLookup
    ids: str
    rowwise_impl: RowwiseImpl = "auto"

    def sanitize(self, name: str) -> str:
        """``name`` as an identifier (for initializer names)."""
        return sanitize_name(name)

    def initializer(self, suffix: str, value: np.ndarray) -> str:
        """The table's initializer ``emb.<table>.<suffix>`` (added once per table)."""
        return self.gb.initializer(f"emb.{sanitize_name(self.table.name)}.{suffix}", value)

    def unpack(self, packed_rows: str, bits: int) -> str:
        """uint8 ``[N, D*bits/8]`` packed rows of the ids -> uint8 codes ``[N, D]``."""
        return add_unpack(self.gb, packed_rows, self.ids, bits, self.table.dim)

    def row_param(self, suffix: str, values: np.ndarray) -> str:
        """A per-row parameter ``values [R]`` (initializer ``emb.<table>.<suffix>``, ``[R, 1]``)
        gathered at the ids as float32 ``[N, 1]``."""
        init = self.initializer(suffix, values.reshape(-1, 1))
        rows = self.gb.op("Gather", [init, self.ids], "row_param", axis=0)
        if values.dtype == np.float32:
            return rows
        return self.to_float(rows, "row_param_f32")

    def to_float(self, value: str, hint: str) -> str:
        """``Cast`` to float32."""
        return self.gb.op("Cast", [value], hint, to=TensorProto.FLOAT)

    def ms_op(self, op_type: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        """A node of the ``com.microsoft`` domain."""
        return self.gb.op(op_type, inputs, hint, domain=MS_DOMAIN, **attrs)


def add_gather(
    gb: GraphBuilder, table: TableLookup, ids: str, rowwise_impl: RowwiseImpl = "auto"
) -> str:
    """Rows of ``table`` for int64 ``ids`` ``[N]`` as float32 ``[N, D]``, built by the table's
    method. Its arrays become initializers named ``emb.<table>.*`` (a shared array: its own
    name), added once however many features look the table up. Ids outside ``[0, rows)`` read
    row 0 (:func:`~exporters.onnx.ops.add_valid_ids`)."""
    ids = add_valid_ids(gb, ids, table.num_rows)
    method = registry.get(table.kind.METHOD)
    return method.onnx_rows(RowsRequest(gb, table, ids, rowwise_impl))


def add_feature_lookup(
    gb: GraphBuilder,
    table: TableLookup,
    values: str,
    lengths: str,
    rowwise_impl: RowwiseImpl = "auto",
) -> str:
    """Sum-pooled embedding of one jagged feature: float32 ``[B, D]``."""
    rows = add_gather(gb, table, values, rowwise_impl)
    return add_cumsum_pool(gb, rows, lengths, table.dim)


def build_gather_model(table: TableLookup, rowwise_impl: RowwiseImpl = "auto") -> onnx.ModelProto:
    """Stand-alone graph ``ids`` int64 ``[n]`` -> ``rows`` float32 ``[n, D]`` (tests, benchmarks)."""
    table.validate()
    gb = GraphBuilder(f"gather_{sanitize_name(table.name)}")
    ids = gb.add_input("ids", TensorProto.INT64, ["n"])
    rows = add_gather(gb, table, ids, rowwise_impl)
    gb.add_output(rows, "rows", TensorProto.FLOAT, ["n", table.dim])
    return gb.make_model()


def build_pool_model(table: TableLookup, rowwise_impl: RowwiseImpl = "auto") -> onnx.ModelProto:
    """Stand-alone graph ``values`` ``[n]``, ``lengths`` ``[batch]`` -> ``pooled`` ``[batch, D]``."""
    table.validate()
    gb = GraphBuilder(f"pool_{sanitize_name(table.name)}")
    values = gb.add_input("values", TensorProto.INT64, ["n"])
    lengths = gb.add_input("lengths", TensorProto.INT64, [BATCH])
    pooled = add_feature_lookup(gb, table, values, lengths, rowwise_impl)
    gb.add_output(pooled, "pooled", TensorProto.FLOAT, [BATCH, table.dim])
    return gb.make_model()


# ---------------------------------------------------------------------------------------------
# All features at once (what the full model uses)


def _group_key(table: TableLookup, rowwise_impl: RowwiseImpl) -> tuple:
    """Features whose tables share a group key are dequantized and pooled together: tables that
    join the grouped FBGEMM-row lookup by bit width (small ones apart: dequantized at session
    load, :func:`~exporters.onnx.stacked_rows.dequantize_at_load`), every other table in one
    group."""
    bits = registry.get(table.kind.METHOD).stacked_bits(table.kind, rowwise_impl)
    if bits is None:
        return ("rows",)
    return ("dequantized" if dequantize_at_load(table, table.dim) else "stacked", bits)


def _add_group(
    gb: GraphBuilder,
    key: tuple,
    features: list[FeatureInputs],
    dim: int,
    rowwise_impl: RowwiseImpl,
    merged: dict[int, list[TableLookup]],
) -> str:
    """Pooled embeddings ``[B, F_g, D]`` of one group of features (``merged``: the tables
    dequantized at load, by bit width, which share one array)."""
    lengths = concat(gb, [ln for _, _, ln in features], "lengths_all")  # [F_g * B]
    if key[0] == "stacked":
        return add_stacked_group(gb, features, lengths, key[1], dim, one_hot=key[-1])
    if key[0] == "dequantized":
        return add_dequantized_group(gb, features, lengths, key[1], dim, merged[key[1]])
    rows = _generic_rows(gb, features, dim, rowwise_impl)
    return pool_group(gb, rows, lengths, dim, len(features))


def _generic_rows(
    gb: GraphBuilder, features: list[FeatureInputs], dim: int, rowwise_impl: RowwiseImpl
) -> str:
    """Rows ``[N + 1, D]`` gathered feature by feature (:func:`add_gather`) plus a zero row."""
    parts = [add_gather(gb, t, v, rowwise_impl) for t, v, _ in features]
    parts.append(gb.const("zero_row_f32", np.zeros((1, dim), np.float32)))
    return gb.op("Concat", parts, "rows_all", axis=0)


def add_sparse_arch_parts(
    gb: GraphBuilder,
    features: list[FeatureInputs],
    dim: int,
    rowwise_impl: RowwiseImpl = "auto",
    one_hot: Sequence[bool] | None = None,
) -> tuple[list[str], list[int]]:
    """Sum-pooled embeddings of every feature, group by group: float32 ``[B, F_g, D]`` values
    and ``order`` (the feature index of each position when they are concatenated), for callers
    that can use the features in group order (the DLRM interaction permutes its triangle
    indices instead: no reordering copy).

    Features are grouped by how their rows are computed, and each group is gathered, dequantized
    and pooled with one chain of ops over all its ids (concatenated feature-major), like FBGEMM's
    table-batched kernels. A graph of 26 features thus runs a few dozen nodes instead of
    hundreds. A group whose bags all hold one id (a runtime ``If``) is not pooled at all.

    ``one_hot`` (one flag a feature) marks the features expected to be one-hot: they form groups
    of their own, so that the multi-hot features of a batch do not make them pay for pooling
    (in a Criteo-shaped model with 8 of 26 features multi-hot: 5.3 ms instead of 6.3 ms at batch
    2048). A flag is a layout hint only: a batch that breaks it is pooled, and served exactly.
    """
    flags = list(one_hot) if one_hot is not None else [False] * len(features)
    if len(flags) != len(features):
        raise ValueError(f"one_hot has {len(flags)} flags for {len(features)} features")
    groups: dict[tuple, list[tuple[int, FeatureInputs]]] = {}
    for i, feature in enumerate(features):
        key = (*_group_key(feature[0], rowwise_impl), bool(flags[i]))
        groups.setdefault(key, []).append((i, feature))
    merged: dict[int, list[TableLookup]] = {}
    for key, members in groups.items():
        if key[0] == "dequantized":
            merged.setdefault(key[1], []).extend(t for _, (t, _, _) in members)
    pooled = [
        _add_group(gb, key, [f for _, f in members], dim, rowwise_impl, merged)
        for key, members in groups.items()
    ]
    order = [i for members in groups.values() for i, _ in members]
    return pooled, order


def add_sparse_arch(
    gb: GraphBuilder,
    features: list[FeatureInputs],
    dim: int,
    rowwise_impl: RowwiseImpl = "auto",
    one_hot: Sequence[bool] | None = None,
) -> str:
    """Sum-pooled embeddings of every feature: float32 ``[B, F, D]`` in the order given (TorchRec
    ``SparseArch``'s output). See :func:`add_sparse_arch_parts` for how they are computed."""
    return concat_in_order(gb, *add_sparse_arch_parts(gb, features, dim, rowwise_impl, one_hot))


def concat_in_order(gb: GraphBuilder, parts: list[str], order: list[int]) -> str:
    """Group outputs ``[B, F_g, D]`` (features in ``order``, as :func:`add_sparse_arch_parts`
    returns them) as one ``[B, F, D]`` in feature order: a Concat, and a Gather on the feature
    axis only when the groups interleave."""
    stacked = concat(gb, parts, "pooled_groups", axis=1)  # [B, F, D] in group order
    if order != sorted(order):
        inverse = np.argsort(np.asarray(order, dtype=np.int64))
        stacked = gb.op(
            "Gather", [stacked, gb.const("feature_order", inverse)], "pooled_ordered", axis=1
        )
    return stacked
