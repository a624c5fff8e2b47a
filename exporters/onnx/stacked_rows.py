"""Row-wise tables of one bit width looked up together, like FBGEMM's table-batched kernels.

Tables whose method stores FBGEMM's fused rows (``packed`` codes, fp16 ``scale`` and ``bias``: a
method's :meth:`~compress.methods.registry.TableMethod.stacked_bits` says which) are *stacked*:
one uint8 initializer ``emb.rowwise<bits>.fused`` ``[sum (R + 1) + 1, P + 4]`` holds every table of
the group one after another (a table shared by several features once), each followed by a copy of
its row 0, each row ``[codes | fp16 scale, bias bytes]``, then one zero row. Each feature's ids are
clipped to ``[0, R]`` (one ``Clip``: an id out of range lands on row 0 or its copy), shifted by its
table's first row and concatenated, then padded with the zero row's index to a multiple of
:data:`~exporters.onnx.pooling.POOL_CHUNK`, so ONE ``Gather`` fetches every row of the group. Then
one unpack + dequantize in a transposed layout where per-row scales broadcast fast; the fp16 scale
and bias are decoded from their bytes by ``GatherElements`` in a table of all 65536 fp16 values.

Why this shape (serving benchmark, 26 INT4 tables of dim 16, batch 2048, 2 threads,
``benchmarks/bench_serving.py``): ORT's ``Gather`` pays per op and per index, so one Gather on the
stacked table (~0.75 ms) replaces 26 per-feature ones (~2.5 ms); a second Gather of separate fp16
scale/bias arrays costs a second cache miss a row, so the bytes stay fused; ``GatherElements`` on
1-D data decodes fp16 ~7x faster than ``Gather``; ``com.microsoft::GatherBlockQuantized`` on the
stacked table was far slower (~11 ms). Features shown one-hot by the data (``one_hot``) gather
their ids in batch-major order while a batch agrees, so their rows need no pooling.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from exporters.onnx.ops import FeatureInputs, add_branch, concat, int64, interleave_codes
from exporters.onnx.pooling import chunk_pad, one_hot_condition, pool_group, pool_multi
from exporters.onnx.spec import GraphBuilder, TableLookup


def stacked_row_offsets(tables: list[TableLookup]) -> tuple[dict[str, int], int]:
    """First row of every table (by name; a table listed twice is stacked once) in the stacked
    array of :func:`stacked_fused_rows`, and the index of its trailing zero row (total rows).
    Each table takes ``rows + 1`` rows: its own, then a copy of its row 0."""
    offsets: dict[str, int] = {}
    total = 0
    for table in tables:
        if table.name not in offsets:
            offsets[table.name] = total
            total += table.num_rows + 1
    return offsets, total


def stacked_fused_rows(tables: list[TableLookup]) -> np.ndarray:
    """Row-wise tables of one bit width and dim as one uint8 ``[sum (R + 1) + 1, P + 4]`` array,
    the tables one after another (:func:`stacked_row_offsets`), each followed by a copy of its
    row 0 (where an id clipped to ``[0, R]`` from above lands), then one zero row.

    A row holds the ``P`` packed code bytes, then the fp16 scale and bias as bytes ``scale_lo,
    bias_lo, scale_hi, bias_hi`` (little-endian), so that one ``Gather`` (one cache miss a row,
    like FBGEMM's fused rows) fetches everything a row needs. The zero row (codes, scale and bias
    0) dequantizes to zeros: the exclusive running sum of the pooling ends on it.
    """
    offsets, total = stacked_row_offsets(tables)
    first = tables[0].kind
    out = np.zeros((total + 1, first.packed.shape[1] + 4), np.uint8)
    done: set[str] = set()
    for table in tables:
        if table.name in done:
            continue
        done.add(table.name)
        kind = table.kind  # packed, scale, bias as FBGEMM stores them
        start = offsets[table.name]
        rows = slice(start, start + kind.num_rows)
        nbytes = kind.packed.shape[1]
        out[rows, :nbytes] = kind.packed
        sb = np.stack([kind.scale, kind.bias], axis=1).astype(np.float16).view(np.uint16)
        out[rows, nbytes : nbytes + 2] = sb & 0xFF
        out[rows, nbytes + 2 :] = sb >> 8
        out[start + kind.num_rows] = out[start]  # row 0 again: ids clipped from above
    return out


def _decode_fp16_bytes(gb: GraphBuilder, lo: str, hi: str) -> str:
    """float32 values of fp16 numbers given as uint8 low and high bytes ``[2, M]``; exact: a
    lookup in a 65536-entry float32 table of every fp16 value (opset 21 has no bit cast).

    The lookup is a ``GatherElements`` on the flattened codes: ORT 1.31's ``Gather`` pays ~5 ns
    an index (0.75 ms for 2 x 86k), ``GatherElements`` on 1-D data ~0.6 ns (0.1 ms).
    """
    if "fp16_values" not in gb.initializers:
        table = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
        gb.initializer("fp16_values", table.astype(np.float32))
    lo = gb.op("Cast", [lo], "fp16_lo", to=TensorProto.INT32)
    hi = gb.op("Cast", [hi], "fp16_hi", to=TensorProto.INT32)
    bits = gb.op("Add", [gb.op("Mul", [hi, gb.const("i256", 256, np.int32)], "fp16_hi256"), lo])
    flat = gb.op("Reshape", [bits, gb.const("flat", int64([-1]))], "fp16_bits_flat")
    values = gb.op("GatherElements", ["fp16_values", flat], "fp16_value_flat", axis=0)
    return gb.op("Reshape", [values, gb.const("two_rows", int64([2, -1]))], "fp16_value")


def _unpack_transposed(gb: GraphBuilder, packed_t: str, bits: int, dim: int) -> str:
    """uint8 ``[D*bits/8, M]`` packed bytes (one column per row) -> codes ``[D, M]``."""
    if bits == 8:
        return packed_t
    codes = interleave_codes(gb, packed_t, bits, axis=1)  # [D*bits/8, per_byte, M]: d = j*per + k
    return gb.op("Reshape", [codes, gb.const("codes_t_shape", int64([dim, -1]))], "codes_t")


def _stacked_ids(gb: GraphBuilder, features: list[FeatureInputs], offsets: dict[str, int]) -> str:
    """int64 ``[N]``: every feature's ids plus its table's first row in the stacked array,
    feature-major. Ids are clipped to ``[0, R]`` first: an id outside its table reads the table's
    row 0 (negative ids) or its copy at row ``R`` (:func:`stacked_fused_rows`), never a
    neighbour's row (one op a feature: cheaper than :func:`add_valid_ids`)."""
    parts = []
    for table, values, _ in features:
        offset = offsets[table.name]
        low, high = gb.const("id_min", 0, np.int64), gb.const("id_max", table.num_rows, np.int64)
        values = gb.op("Clip", [values, low, high], "ids_clipped")
        if offset:
            values = gb.op("Add", [values, gb.const("row_offset", offset, np.int64)], "ids_stacked")
        parts.append(values)
    return concat(gb, parts, "ids_cat")


def _pad_ids(gb: GraphBuilder, ids: str, num_ids: str, zero_row: int) -> str:
    """``ids`` then the zero row's index ``1..K`` times (``K = POOL_CHUNK``): ``[Npad]``, a
    multiple of ``K`` (the chunked pooling's layout)."""
    value = helper.make_tensor("zero_row_id", TensorProto.INT64, [1], [zero_row])
    pad_ids = gb.op("ConstantOfShape", [chunk_pad(gb, num_ids)], "zero_row_ids", value=value)
    return gb.op("Concat", [ids, pad_ids], "ids_all", axis=0)


def _stacked_table(gb: GraphBuilder, tables: list[TableLookup], bits: int) -> str:
    """Add the stacked fused-row initializer of ``tables`` (:func:`stacked_fused_rows`)."""
    name, k = f"emb.rowwise{bits}.fused", 1
    while name in gb.initializers:  # another group of the same bit width: its own array
        name, k = f"emb.rowwise{bits}.fused{k}", k + 1
    return gb.initializer(name, stacked_fused_rows(tables))


def _rowwise_rows_t(gb: GraphBuilder, table: str, ids: str, bits: int, dim: int) -> str:
    """Rows of the stacked row-wise ``table`` at ``ids`` ``[M]``, *transposed*: ``[D, M]``.

    The group's tables are one stacked initializer ``emb.rowwise<bits>.fused``
    (:func:`stacked_fused_rows`), so one ``Gather`` fetches the fused rows of every id of every
    feature (ids shifted by their table's first row; 26 per-feature Gathers took ~2.5 ms at batch
    2048, one takes ~0.75 ms), the zero row included. Then one unpack and dequantize
    (``code * scale + bias`` in float32, exact) for all of them. The dequantize runs transposed
    (``[D, Npad]``), where the per-row scale and bias broadcast as row vectors: ORT's fast path (a
    ``[N, 1]`` column broadcast ran 4x slower); the caller transposes the result back (pooling
    straight from ``[D, Npad]`` measured slower: its Transposes cost more than they saved).
    """
    nbytes = dim * bits // 8
    fused = gb.op("Gather", [table, ids], "fused_rows", axis=0)  # [M, P + 4]
    fused_t = gb.op("Transpose", [fused], "fused_t", perm=[1, 0])  # [P + 4, M]
    axes = gb.const("axes0", int64([0]))

    def rows(a: int, b: int, hint: str) -> str:
        bounds = [gb.const(f"row{a}", int64([a])), gb.const(f"row{b}", int64([b]))]
        return gb.op("Slice", [fused_t, *bounds, axes], hint)

    packed_t = rows(0, nbytes, "packed_t")
    sb = _decode_fp16_bytes(
        gb, rows(nbytes, nbytes + 2, "sb_lo"), rows(nbytes + 2, nbytes + 4, "sb_hi")
    )  # [2, N + 1]
    codes = gb.op(
        "Cast", [_unpack_transposed(gb, packed_t, bits, dim)], "codes_f32", to=TensorProto.FLOAT
    )
    scale = gb.op(
        "Slice", [sb, gb.const("row0", int64([0])), gb.const("row1", int64([1])), axes], "scale"
    )
    bias = gb.op(
        "Slice", [sb, gb.const("row1", int64([1])), gb.const("row2", int64([2])), axes], "bias"
    )
    rows_t = gb.op("Add", [gb.op("Mul", [codes, scale], "rows_scaled"), bias], "rows_t")
    return rows_t


def add_stacked_group(
    gb: GraphBuilder,
    features: list[FeatureInputs],
    lengths: str,
    bits: int,
    dim: int,
    one_hot: bool,
) -> str:
    """Pooled embeddings ``[B, F_g, D]`` of stacked row-wise tables.

    A group expected to be one-hot (``one_hot``) branches *before* the
    Gather: while every bag holds one id it gathers the ids in batch-major order, so the rows come
    out as ``[B, F_g, D]`` with no pooling and no 3-D Transpose; otherwise it takes the general
    path (gather feature-major, pool)."""
    tables = [table for table, _, _ in features]
    offsets, zero_row = stacked_row_offsets(tables)
    table = _stacked_table(gb, tables, bits)
    ids = _stacked_ids(gb, features, offsets)
    num_ids = gb.op("Shape", [ids], "num_ids")
    num_features = len(features)

    def general(sub: GraphBuilder, known_multi: bool) -> str:
        rows_t = _rowwise_rows_t(sub, table, _pad_ids(sub, ids, num_ids, zero_row), bits, dim)
        rows = sub.op("Transpose", [rows_t], "rows", perm=[1, 0])  # [Npad, D]
        if known_multi:
            return pool_multi(sub, rows, lengths, num_features, dim, padded=True)
        return pool_group(sub, rows, lengths, dim, num_features, num_ids, padded=True)

    if not one_hot:
        return general(gb, known_multi=False)

    def batch_major_rows(sub: GraphBuilder) -> str:
        fb = sub.op("Reshape", [ids, sub.const("feature_major", int64([num_features, -1]))])
        bf = sub.op("Transpose", [fb], "ids_bf", perm=[1, 0])
        flat = sub.op("Reshape", [bf, sub.const("flat", int64([-1]))], "ids_batch_major")
        rows_t = _rowwise_rows_t(sub, table, flat, bits, dim)
        rows = sub.op("Transpose", [rows_t], "rows", perm=[1, 0])  # [B * F_g, D]
        shape = sub.const("bfd", int64([-1, num_features, dim]))
        return sub.op("Reshape", [rows, shape], "pooled_bfd")

    cond = one_hot_condition(gb, num_ids, lengths)
    return gb.op(
        "If",
        [cond],
        "pooled_group",
        then_branch=add_branch(gb, batch_major_rows),
        else_branch=add_branch(gb, lambda sub: general(sub, known_multi=True)),
    )
