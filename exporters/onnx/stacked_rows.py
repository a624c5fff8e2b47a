"""Row-wise tables of one bit width looked up together, like FBGEMM's table-batched kernels.

Tables whose method stores FBGEMM's row-wise arrays (``packed`` uint8 codes ``[R, P]``, fp16
``scale`` and ``bias`` ``[R]``: a method's :meth:`~compress.methods.registry.TableMethod.stacked_bits`
says which) form one group per bit width. The graph reads each table's arrays exactly as they are
stored (initializers ``emb.<table>.packed``, ``.scale``, ``.bias``; a table shared by several
features once), so that a saved graph can point its external data at the table files themselves
instead of carrying a copy (:mod:`exporters.onnx.model`): no initializer is derived from a table.

Per feature, ids outside ``[0, R)`` become 0 (:func:`~exporters.onnx.ops.add_valid_ids`: an
id out of range reads row 0 of its own table, never a neighbour's), then three ``Gather`` ops
fetch the packed bytes, the scale and the bias of its ids. The gathered rows of every feature of
the group are concatenated (feature-major), padded with zero rows to a multiple of
:data:`~exporters.onnx.pooling.POOL_CHUNK`, and unpacked and dequantized in one pass, in a
transposed layout ``[D, M]`` where the per-row scale and bias broadcast as row vectors (ORT's fast
path; a ``[M, 1]`` column broadcast ran 4x slower): ``float(code) * float(scale) +
float(bias)``, exactly FBGEMM's ``FusedNBitRowwiseQuantizedSBHalfToFloat``. The zero rows
dequantize to zeros: the chunked pooling's exclusive running sum ends on them.

Features shown one-hot by the data (``one_hot``) put their gathered bytes in batch-major order
while a batch agrees (a runtime ``If``), so their rows come out as ``[B, F_g, D]`` with no pooling.

Cost (``benchmarks/bench_serving.py``, 26 INT4 tables of dim 16, batch 2048): one ``Gather`` a
table array instead of one on a stacked copy of all tables: three cache misses a row instead of
one; what this costs is measured there.

Small tables (:func:`dequantize_at_load`: a float32 copy of at most
:data:`DEQUANTIZED_TABLE_BYTES`) are looked up differently (:func:`add_dequantized_group`): the
graph dequantizes the whole table with nodes whose inputs are all initializers (the stored arrays,
the same ``float(code) * float(scale) + float(bias)``), which ONNX Runtime's constant folding
computes once when the session is created; a lookup is then one ``Gather`` of float32 rows,
bit for bit the rows the per-row path computes. Nothing derived is stored in the graph or on
disk; the copy lives in the session's memory (at most 1 MiB a table, each table once in one
float32 array a bit width, which one ``Gather`` reads for all their features). On the Criteo Kaggle shape
18 of the 26 tables qualify (< 15,000 rows each; 3.4 MB in all).
"""

from __future__ import annotations

import hashlib

import numpy as np
from onnx import TensorProto, helper

from exporters.onnx.ops import (
    FeatureInputs,
    add_unpack,
    add_valid_ids,
    batch_major,
    concat,
    int64,
    interleave_codes,
)
from exporters.onnx.pooling import chunk_pad, one_hot_or_pooled, pool_group, pool_multi
from exporters.onnx.spec import GraphBuilder, TableLookup, sanitize_name

#: The arrays of a stacked table as the graph names them (``emb.<table>.<role>``), in the order
#: of :func:`table_initializers`.
ROLES = ("packed", "scale", "bias")
#: Largest float32 copy (bytes) of a row-wise table that the session dequantizes once at load
#: (:func:`add_dequantized_group`): 1 MiB, 16,384 rows of dim 16.
DEQUANTIZED_TABLE_BYTES = 1 << 20


def dequantize_at_load(table: TableLookup, dim: int) -> bool:
    """Whether ``table`` is looked up from a float32 copy made at session load (its ``[R, D]``
    float32 copy takes at most :data:`DEQUANTIZED_TABLE_BYTES`)."""
    return table.num_rows * dim * 4 <= DEQUANTIZED_TABLE_BYTES


def table_initializers(gb: GraphBuilder, table: TableLookup) -> tuple[str, str, str]:
    """The stored ``packed``, ``scale`` and ``bias`` of ``table`` as initializers
    ``emb.<table>.<role>`` (added once, however many features read the table)."""
    kind = table.kind
    prefix = f"emb.{sanitize_name(table.name)}"
    arrays = (kind.packed, kind.scale, kind.bias)
    return tuple(gb.initializer(f"{prefix}.{r}", a) for r, a in zip(ROLES, arrays, strict=True))


def _gather_stored(gb: GraphBuilder, features: list[FeatureInputs]) -> tuple[str, str, str]:
    """Packed bytes ``[N, P]``, fp16 scales ``[N]`` and biases ``[N]`` of every feature's ids,
    feature-major (ids outside a table read its row 0)."""
    parts: tuple[list[str], list[str], list[str]] = ([], [], [])
    for table, values, _ in features:
        ids = add_valid_ids(gb, values, table.num_rows)
        for out, init, hint in zip(parts, table_initializers(gb, table), ROLES, strict=True):
            out.append(gb.op("Gather", [init, ids], f"{hint}_rows", axis=0))
    packed, scale, bias = (
        concat(gb, p, f"{hint}_all") for p, hint in zip(parts, ROLES, strict=True)
    )
    return packed, scale, bias


def _zeros(gb: GraphBuilder, shape: str, elem_type: int, hint: str) -> str:
    value = helper.make_tensor("zero", elem_type, [1], [0])
    return gb.op("ConstantOfShape", [shape], hint, value=value)


def _pad_rows(
    gb: GraphBuilder, packed: str, scale: str, bias: str, num_ids: str, width: int
) -> tuple[str, str, str]:
    """The gathered arrays followed by ``1..K`` zero rows (``K = POOL_CHUNK``): a multiple of
    ``K`` rows (the chunked pooling's layout), the last one zero."""
    pad = chunk_pad(gb, num_ids)
    shape = gb.op("Concat", [pad, gb.const(f"packed_width{width}", int64([width]))], axis=0)
    return (
        gb.op("Concat", [packed, _zeros(gb, shape, TensorProto.UINT8, "zero_packed")], axis=0),
        gb.op("Concat", [scale, _zeros(gb, pad, TensorProto.FLOAT16, "zero_scale")], axis=0),
        gb.op("Concat", [bias, _zeros(gb, pad, TensorProto.FLOAT16, "zero_bias")], axis=0),
    )


def _dequantize(gb: GraphBuilder, packed: str, scale: str, bias: str, bits: int, dim: int) -> str:
    """float32 rows ``[M, D]`` of packed bytes ``[M, P]`` and fp16 ``scale``/``bias`` ``[M]``,
    computed transposed (``[D, M]``: per-row scale and bias broadcast as row vectors)."""
    packed_t = gb.op("Transpose", [packed], "packed_t", perm=[1, 0])  # [P, M]
    codes = packed_t
    if bits != 8:
        pieces = interleave_codes(gb, packed_t, bits, axis=1)  # [P, per_byte, M]: d = j*per + k
        codes = gb.op("Reshape", [pieces, gb.const("codes_t_shape", int64([dim, -1]))], "codes_t")
    codes = gb.op("Cast", [codes], "codes_f32", to=TensorProto.FLOAT)
    scale = gb.op("Cast", [scale], "scale_f32", to=TensorProto.FLOAT)
    bias = gb.op("Cast", [bias], "bias_f32", to=TensorProto.FLOAT)
    rows_t = gb.op("Add", [gb.op("Mul", [codes, scale], "rows_scaled"), bias], "rows_t")
    return gb.op("Transpose", [rows_t], "rows", perm=[1, 0])  # [M, D]


def _batch_major(gb: GraphBuilder, x: str, num_features: int, row_shape: list[int]) -> str:
    """Feature-major ``[F * B, *row_shape]`` -> batch-major ``[B * F, *row_shape]``."""
    grid = gb.op("Reshape", [x, gb.const("fb_rows", int64([num_features, -1, *row_shape]))])
    perm = [1, 0, *range(2, 2 + len(row_shape))]
    swapped = gb.op("Transpose", [grid], "bf_rows", perm=perm)
    return gb.op("Reshape", [swapped, gb.const("flat_rows", int64([-1, *row_shape]))], "rows_bf")


def add_stacked_group(
    gb: GraphBuilder,
    features: list[FeatureInputs],
    lengths: str,
    bits: int,
    dim: int,
    one_hot: bool,
) -> str:
    """Pooled embeddings ``[B, F_g, D]`` of the row-wise tables of one bit width (module
    docstring). A group expected to be one-hot (``one_hot``) branches before dequantizing: while
    every bag holds one id its gathered bytes are put in batch-major order and dequantized as
    ``[B, F_g, D]`` with no pooling; otherwise it takes the general path (pad, dequantize, pool)."""
    width = dim * bits // 8
    packed, scale, bias = _gather_stored(gb, features)
    num_ids = gb.op("Shape", [scale], "num_ids")
    num_features = len(features)

    def general(sub: GraphBuilder, known_multi: bool) -> str:
        rows = _dequantize(sub, *_pad_rows(sub, packed, scale, bias, num_ids, width), bits, dim)
        if known_multi:
            return pool_multi(sub, rows, lengths, num_features, dim, padded=True)
        return pool_group(sub, rows, lengths, dim, num_features, num_ids, padded=True)

    if not one_hot:
        return general(gb, known_multi=False)

    def batch_major_rows(sub: GraphBuilder) -> str:
        rows = _dequantize(
            sub,
            _batch_major(sub, packed, num_features, [width]),
            _batch_major(sub, scale, num_features, []),
            _batch_major(sub, bias, num_features, []),
            bits,
            dim,
        )  # [B * F_g, D]
        return sub.op("Reshape", [rows, sub.const("bfd", int64([-1, num_features, dim]))], "bfd")

    return one_hot_or_pooled(
        gb, num_ids, lengths, batch_major_rows, lambda sub: general(sub, known_multi=True)
    )


# ---------------------------------------------------------------------------------------------
# Small tables: dequantized once when the session is created


def dequantized_table(gb: GraphBuilder, table: TableLookup, bits: int, dim: int) -> str:
    """float32 ``[R, D]``: every row of ``table`` dequantized from its stored arrays,
    ``float(code) * float(scale) + float(bias)`` (the per-row path's arithmetic). Every input is an
    initializer, so ONNX Runtime folds these nodes into one float32 array when it creates the
    session. Added once per table (value ``emb.<table>.dequantized``)."""
    out = f"emb.{sanitize_name(table.name)}.dequantized"
    # the stored arrays first: two tables whose names sanitize alike are refused there (initializers
    # added twice with different data), as on the per-row path, never read as one another's rows
    packed, scale, bias = table_initializers(gb, table)
    if any(out in node.output for node in gb.nodes):
        return out
    codes = add_unpack(gb, packed, None, bits, dim)  # [R, D]
    codes = gb.op("Cast", [codes], "table_codes_f32", to=TensorProto.FLOAT)
    column = gb.const("column", int64([-1, 1]))
    scale = gb.op("Reshape", [scale, column], "table_scale_col")
    bias = gb.op("Reshape", [bias, column], "table_bias_col")
    scale = gb.op("Cast", [scale], "table_scale_f32", to=TensorProto.FLOAT)
    bias = gb.op("Cast", [bias], "table_bias_f32", to=TensorProto.FLOAT)
    scaled = gb.op("Mul", [codes, scale], "table_scaled")
    gb.nodes.append(helper.make_node("Add", [scaled, bias], [out], name=out))
    return out


def merged_tables(
    gb: GraphBuilder, tables: list[TableLookup], bits: int, dim: int
) -> tuple[str, dict[str, int], int]:
    """float32 ``[sum R + 1, D]``: the distinct ``tables`` dequantized (:func:`dequantized_table`)
    one after another, then a zero row; folded into one array at session load like each table
    (the per-table arrays are then dropped). Added once for the same tables, however many groups
    read it. Returns its name, each table's first row in it, and the zero row's index."""
    offsets: dict[str, int] = {}
    distinct, rows = [], 0
    for table in tables:
        if table.name not in offsets:
            offsets[table.name] = rows
            rows += table.num_rows
            distinct.append(table)
    key = hashlib.sha256("\0".join(t.name for t in distinct).encode()).hexdigest()[:12]
    out = f"emb.dequantized_int{bits}_{key}"
    if not any(out in node.output for node in gb.nodes):
        parts = [dequantized_table(gb, table, bits, dim) for table in distinct]
        zero = gb.const("zero_row_f32", np.zeros((1, dim), np.float32))
        gb.nodes.append(helper.make_node("Concat", [*parts, zero], [out], name=out, axis=0))
    return out, offsets, rows


def add_dequantized_group(
    gb: GraphBuilder,
    features: list[FeatureInputs],
    lengths: str,
    bits: int,
    dim: int,
    tables: list[TableLookup] | None = None,
) -> str:
    """Pooled embeddings ``[B, F_g, D]`` of features whose row-wise tables are dequantized at
    session load, all read from one merged float32 array (:func:`merged_tables`) by one
    ``Gather``: each feature's ids (outside its table: its row 0) shifted to its table's rows,
    concatenated feature-major. While every bag holds one id (a runtime ``If``) the ids are put
    batch-major (``[B, F_g]``, int64: cheaper to move than rows) and the ``Gather`` writes the
    bags as ``[B, F_g, D]``; otherwise the ids are padded with the zero row's index to the
    chunked pooling's layout and the gathered rows pooled
    (:func:`~exporters.onnx.pooling.pool_multi`). ``tables``: every table of the graph merged
    at this bit width (default: the group's own), so that groups of one-hot and multi-hot
    features share one array."""
    merged = tables if tables is not None else [t for t, _, _ in features]
    table_f32, offsets, zero_index = merged_tables(gb, merged, bits, dim)
    ids, counts = [], []
    for table, values, _ in features:
        valid = add_valid_ids(gb, values, table.num_rows)
        if offsets[table.name]:
            shift = gb.const(f"row_offset_{offsets[table.name]}", offsets[table.name], np.int64)
            valid = gb.op("Add", [valid, shift], "merged_ids")
        ids.append(valid)
        counts.append(gb.op("Shape", [values], "num_values"))
    all_ids = concat(gb, ids, "merged_ids_all")  # [N], feature-major
    num_ids = gb.op("ReduceSum", [concat(gb, counts, "value_counts")], "num_ids", keepdims=1)
    num_features = len(features)

    def side_by_side(sub: GraphBuilder) -> str:  # ids [F_g * B] -> [B, F_g] -> rows [B, F_g, D]
        return sub.op(
            "Gather",
            [table_f32, batch_major(sub, all_ids, num_features, "ids_bf")],
            "bags_bfd",
            axis=0,
        )

    def pooled(sub: GraphBuilder) -> str:
        pad = chunk_pad(sub, num_ids)
        zero_ids = sub.op(
            "Expand", [sub.const(f"zero_row_id_{zero_index}", int64([zero_index])), pad], "pad_ids"
        )
        padded = sub.op("Concat", [all_ids, zero_ids], "ids_padded", axis=0)  # [C * K]
        rows = sub.op("Gather", [table_f32, padded], "rows_padded", axis=0)
        return pool_multi(sub, rows, lengths, num_features, dim, padded=True)

    return one_hot_or_pooled(gb, num_ids, lengths, side_by_side, pooled)
