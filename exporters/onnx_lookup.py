"""Embedding lookups as ONNX subgraphs: gather + dequantize rows, then jagged sum pooling.

Each builder appends nodes to a :class:`~exporters.onnx_spec.GraphBuilder` and returns the name of
the value it produced. Only the gathered rows are ever dequantized, never a whole table.

Ops per table kind (ids int64 ``[N]`` -> rows float32 ``[N, D]``):

* ``fp32``: ``Gather``. ``fp16``: ``Gather`` + ``Cast``.
* ``rowwise``, ``impl="gbq"`` (default for 4 and 8 bits): ``com.microsoft::GatherBlockQuantized``
  on the packed uint8 table with float32 scales ``[R, 1]`` (one block per row: the block size is
  the smallest power of two >= max(16, D), a partial block is allowed), explicit zero points 0
  (uint8 data otherwise defaults to ``2^(bits-1)``), then ``+ Cast(Gather(bias))``.
* ``rowwise``, ``impl="standard"`` (default for 2 bits): ``Gather`` packed bytes,
  ``BitShift``/``BitwiseAnd`` unpack (by scalars: :func:`add_unpack`), ``Cast``, ``Mul`` gathered
  scale, ``Add`` gathered bias.
  onnxruntime 1.31's GatherBlockQuantized also takes ``bits=2`` (``impl="gbq"`` works there), but
  older runtimes do not, so the portable path is the default for INT2.
* ``tablewise``: ``Gather`` packed bytes, unpack, ``DequantizeLinear`` with a scalar scale and
  zero point ``2^(bits-1)`` (GatherBlockQuantized would need a scale per row: more storage).
* ``robe``: int64 ``Add``/``Mul``/``Mod`` hash of (row, dim), then ``Gather`` from the shared array.

Pooling (``values`` ``[N]``, ``lengths`` ``[B]`` -> ``[B, D]``) never builds ``[N, B]`` or
padding. Three ways, chosen with ``pooling``:

* ``"cumsum"`` (default): float64 running sum of the rows (``Cast`` + ``CumSum``), a zero row in
  front, then ``P[end_b] - P[start_b]`` with two ``Gather`` ops. Deterministic at any thread count
  and at least as accurate as a sequential float32 sum.
* ``"scatter_nd"``: segment ids (``CumSum`` of ones scattered with ``ScatterElements`` add at the
  bag ends into ``N + 1`` zeros, whose extra slot absorbs trailing empty bags), then
  ``ScatterND(reduction="add")`` into ``[B, D]`` zeros. Fastest, but onnxruntime 1.31's CPU
  ScatterND applies reductions from several threads without synchronisation: with
  ``intra_op_num_threads > 1`` it can lose whole rows of a bag (seen here: 1 run in 200 at 2
  threads; an error of 23.8 at 4 threads). Use only in single-threaded sessions.
* ``"scatter_elements"``: the same segment ids, expanded to ``[N, D]``, and
  ``ScatterElements(axis=0, reduction="add")``. Race-free and bit-identical to a sequential
  float32 sum, but several times slower.

All features at once (:func:`add_sparse_arch`, what the full model uses): features are grouped
by how their rows are computed and each group runs one chain of ops over all its ids, like FBGEMM's
table-batched kernels. Row-wise tables of one bit width share one unpack + dequantize (one
``Gather`` per feature of fused ``[codes | fp16 scale, bias bytes]`` rows, stored as
``emb.<table>.packed`` ``[R, P + 4]`` in these graphs, then standard ops in a transposed layout
where per-row scales broadcast fast); a zero row appended to the rows turns the cumsum pooling into
one exclusive ``CumSum`` and two ``Gather`` ops at the bag ends and starts; an ``If``
skips pooling when every bag of the group holds one id. Measured on a Criteo-Kaggle-shaped model
(26 features, batch 2048, 2 threads): 26 per-feature ``GatherBlockQuantized`` lookups + pooling
took ~15 ms, the batched graph ~10 ms (~4-5 ms when all bags are one-hot).

Example::

    gb = GraphBuilder("lookup")
    ids = gb.add_input("ids", TensorProto.INT64, ["n"])
    rows = add_gather(gb, table, ids)
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper

from exporters.onnx_spec import (
    BATCH,
    MS_DOMAIN,
    Fp16Table,
    Fp32Table,
    GraphBuilder,
    RobeTable,
    RowwiseTable,
    TableLookup,
    TablewiseTable,
    sanitize_name,
)

RowwiseImpl = Literal["auto", "gbq", "standard"]
Pooling = Literal["cumsum", "scatter_nd", "scatter_elements"]
POOLINGS = ("cumsum", "scatter_nd", "scatter_elements")
#: Bit widths that ``auto`` sends to GatherBlockQuantized.
GBQ_AUTO_BITS = (4, 8)


def gbq_block_size(dim: int) -> int:
    """GatherBlockQuantized block size that makes one block per row of ``dim`` values.

    The op needs a power of two >= 16; a last partial block is allowed, so the smallest power of
    two >= max(dim, 16) keeps one scale per row (dims 8 and 12 use 16, 24 uses 32).
    """
    block = 16
    while block < dim:
        block *= 2
    return block


def resolve_rowwise_impl(bits: int, impl: RowwiseImpl = "auto") -> Literal["gbq", "standard"]:
    """Which rowwise path a table of ``bits`` takes."""
    if impl == "auto":
        return "gbq" if bits in GBQ_AUTO_BITS else "standard"
    if impl not in ("gbq", "standard"):
        raise ValueError(f"unknown rowwise impl {impl!r}")
    return impl


def _prefix(table: TableLookup) -> str:
    return f"emb.{sanitize_name(table.name)}"


def _int64(values: list[int] | int) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def _interleave_codes(gb: GraphBuilder, packed: str, bits: int, axis: int) -> str:
    """Split every packed byte into its ``8 // bits`` codes (low bits first) along a new ``axis``.

    Each code position is one ``BitShift`` and ``BitwiseAnd`` by a *scalar* (ORT's vectorized fast
    path; a broadcast ``[per_byte]`` shift vector ran 4-8x slower), then one ``Concat``.
    """
    per_byte = 8 // bits
    mask = gb.const("unpack_mask", (1 << bits) - 1, np.uint8)
    axes = gb.const("axes_last" if axis == -1 else f"axes{axis}", _int64([axis]))
    pieces = []
    for k in range(per_byte):
        piece = packed
        if k:
            shift = gb.const(f"unpack_shift{k * bits}", k * bits, np.uint8)
            piece = gb.op("BitShift", [piece, shift], "shifted", direction="RIGHT")
        if k < per_byte - 1:
            piece = gb.op("BitwiseAnd", [piece, mask], "masked")
        pieces.append(gb.op("Unsqueeze", [piece, axes], "piece"))
    return gb.op("Concat", pieces, "codes_3d", axis=axis)


def add_unpack(gb: GraphBuilder, packed_rows: str, ids: str | None, bits: int, dim: int) -> str:
    """uint8 ``[N, D*bits/8]`` packed rows -> uint8 codes ``[N, D]`` (low bits first).

    The output shape is ``[len(ids), D]``; without ``ids``, ``[-1, D]`` (``N`` must then be > 0).
    """
    if bits == 8:
        return packed_rows
    codes = _interleave_codes(gb, packed_rows, bits, axis=-1)  # [N, D*bits/8, per_byte]
    if ids is None:
        shape = gb.const("rows_shape", _int64([-1, dim]))
    else:
        shape = gb.op("Concat", [gb.op("Shape", [ids]), gb.const("dim", _int64([dim]))], axis=0)
    return gb.op("Reshape", [codes, shape], "codes")


def _gather_fp32(gb: GraphBuilder, table: TableLookup, ids: str) -> str:
    weight = gb.initializer(f"{_prefix(table)}.weight", table.kind.weight)
    return gb.op("Gather", [weight, ids], "rows", axis=0)


def _gather_fp16(gb: GraphBuilder, table: TableLookup, ids: str) -> str:
    weight = gb.initializer(f"{_prefix(table)}.weight_fp16", table.kind.weight)
    half = gb.op("Gather", [weight, ids], "rows_fp16", axis=0)
    return gb.op("Cast", [half], "rows", to=TensorProto.FLOAT)


def _gather_row_param(gb: GraphBuilder, name: str, values: np.ndarray, ids: str) -> str:
    """Gather one per-row parameter stored as ``[R, 1]`` and return float32 ``[N, 1]``."""
    init = gb.initializer(name, values.reshape(-1, 1))
    rows = gb.op("Gather", [init, ids], "row_param", axis=0)
    if values.dtype == np.float32:
        return rows
    return gb.op("Cast", [rows], "row_param_f32", to=TensorProto.FLOAT)


def _gather_rowwise_gbq(gb: GraphBuilder, table: TableLookup, ids: str) -> str:
    kind: RowwiseTable = table.kind
    p = _prefix(table)
    packed = gb.initializer(f"{p}.packed", kind.packed)
    scales = gb.initializer(f"{p}.scale_f32", kind.scale.astype(np.float32).reshape(-1, 1))
    zeros = gb.initializer(f"{p}.zero_point", np.zeros((kind.num_rows, 1), np.uint8))
    scaled = gb.op(
        "GatherBlockQuantized",
        [packed, ids, scales, zeros],
        "rows_scaled",
        domain=MS_DOMAIN,
        bits=kind.bits,
        block_size=gbq_block_size(table.dim),
        gather_axis=0,
        quantize_axis=1,
    )
    bias = _gather_row_param(gb, f"{p}.bias", kind.bias, ids)
    return gb.op("Add", [scaled, bias], "rows")


def _gather_rowwise_standard(gb: GraphBuilder, table: TableLookup, ids: str) -> str:
    kind: RowwiseTable = table.kind
    p = _prefix(table)
    packed = gb.initializer(f"{p}.packed", kind.packed)
    rows = gb.op("Gather", [packed, ids], "packed_rows", axis=0)
    codes = add_unpack(gb, rows, ids, kind.bits, table.dim)
    values = gb.op("Cast", [codes], "codes_f32", to=TensorProto.FLOAT)
    scale = _gather_row_param(gb, f"{p}.scale", kind.scale, ids)
    bias = _gather_row_param(gb, f"{p}.bias", kind.bias, ids)
    return gb.op("Add", [gb.op("Mul", [values, scale], "rows_scaled"), bias], "rows")


def _gather_tablewise(gb: GraphBuilder, table: TableLookup, ids: str) -> str:
    kind: TablewiseTable = table.kind
    p = _prefix(table)
    packed = gb.initializer(f"{p}.packed", kind.packed)
    rows = gb.op("Gather", [packed, ids], "packed_rows", axis=0)
    codes = add_unpack(gb, rows, ids, kind.bits, table.dim)
    scale = gb.initializer(f"{p}.scale", np.asarray(kind.scale, np.float32))
    zero = gb.initializer(f"{p}.code_offset", np.asarray(kind.offset, np.uint8))
    return gb.op("DequantizeLinear", [codes, scale, zero], "rows")


def robe_index_constants(kind: RobeTable, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-dim int64 constants ``[1, D]``: ``(d // Z)*R2 + R1`` and ``d mod Z``."""
    d = np.arange(dim, dtype=np.int64)
    r1, r2, _ = kind.seeds
    return ((d // kind.block_size) * r2 + r1)[None, :], (d % kind.block_size)[None, :]


def _gather_robe(gb: GraphBuilder, table: TableLookup, ids: str) -> str:
    kind: RobeTable = table.kind
    array = gb.initializer(f"robe.{sanitize_name(kind.array_name)}", kind.array)
    dim_key, dim_off = robe_index_constants(kind, table.dim)
    row = gb.op("Add", [ids, gb.const("robe_offset", kind.table_offset, np.int64)], "robe_row")
    row = gb.op("Mul", [row, gb.const("robe_r3", kind.seeds[2], np.int64)], "robe_row_key")
    row = gb.op("Unsqueeze", [row, gb.const("axes_last", _int64([-1]))], "robe_row_key_2d")
    key = gb.op("Add", [row, gb.const("robe_dim_key", dim_key)], "robe_key")  # [N, D]
    key = gb.op("Mod", [key, gb.const("robe_prime", kind.prime, np.int64)], "robe_hash", fmod=0)
    span = kind.array.shape[0] - kind.block_size + 1
    key = gb.op("Mod", [key, gb.const("robe_span", span, np.int64)], "robe_block", fmod=0)
    index = gb.op("Add", [key, gb.const("robe_dim_offset", dim_off)], "robe_index")
    return gb.op("Gather", [array, index], "rows", axis=0)


def add_gather(
    gb: GraphBuilder, table: TableLookup, ids: str, rowwise_impl: RowwiseImpl = "auto"
) -> str:
    """Rows of ``table`` for int64 ``ids`` ``[N]`` as float32 ``[N, D]``.

    The table's arrays become initializers named ``emb.<table>.*`` (ROBE: ``robe.<array_name>``),
    added once however many features look the table up.
    """
    kind = table.kind
    if isinstance(kind, Fp32Table):
        return _gather_fp32(gb, table, ids)
    if isinstance(kind, Fp16Table):
        return _gather_fp16(gb, table, ids)
    if isinstance(kind, RowwiseTable):
        if resolve_rowwise_impl(kind.bits, rowwise_impl) == "gbq":
            return _gather_rowwise_gbq(gb, table, ids)
        return _gather_rowwise_standard(gb, table, ids)
    if isinstance(kind, TablewiseTable):
        return _gather_tablewise(gb, table, ids)
    if isinstance(kind, RobeTable):
        return _gather_robe(gb, table, ids)
    raise TypeError(f"unknown table kind {type(kind).__name__}")


def add_segment_ids(gb: GraphBuilder, values: str, lengths: str) -> str:
    """Bag index of every id: int64 ``[N]`` from ``values`` ``[N]`` and ``lengths`` ``[B]``.

    ``seg[n]`` = number of bags that end at or before ``n``: ones scattered at each bag's end
    offset into ``N + 1`` zeros (index ``N`` catches trailing empty bags), then a running sum.
    """
    n = gb.op("Shape", [values], "num_ids")  # [1]
    n_plus_1 = gb.op("Add", [n, gb.const("one", _int64([1]))], "num_ids_p1")
    zeros = _zeros(gb, n_plus_1, TensorProto.INT64, "seg_zeros")
    axis0 = gb.const("axis0", 0, np.int64)
    ends = gb.op("CumSum", [lengths, axis0], "bag_ends")
    ones = gb.op(
        "ConstantOfShape",
        [gb.op("Shape", [lengths], "num_bags")],
        "bag_ones",
        value=helper.make_tensor("one", TensorProto.INT64, [1], [1]),
    )
    marks = gb.op("ScatterElements", [zeros, ends, ones], "bag_marks", axis=0, reduction="add")
    counts = gb.op("CumSum", [marks, axis0], "bag_counts")
    start = gb.const("start0", _int64([0]))
    return gb.op("Slice", [counts, start, n, gb.const("axes0", _int64([0]))], "segment_ids")


def _zeros(gb: GraphBuilder, shape: str, elem_type: int, hint: str) -> str:
    value = helper.make_tensor("zero", elem_type, [1], [0])
    return gb.op("ConstantOfShape", [shape], hint, value=value)


def add_cumsum_pool(gb: GraphBuilder, rows: str, lengths: str, dim: int) -> str:
    """Bag sums as differences of a float64 running sum: ``P[end_b] - P[start_b]``."""
    axis0 = gb.const("axis0", 0, np.int64)
    wide = gb.op("Cast", [rows], "rows_f64", to=TensorProto.DOUBLE)
    running = gb.op("CumSum", [wide, axis0], "rows_cumsum")  # [N, D]
    zero_row = gb.const("zero_row", np.zeros((1, dim), np.float64))
    prefix = gb.op("Concat", [zero_row, running], "rows_prefix", axis=0)  # [N+1, D]
    ends = gb.op("CumSum", [lengths, axis0], "bag_ends")
    starts = gb.op("Sub", [ends, lengths], "bag_starts")
    upper = gb.op("Gather", [prefix, ends], "prefix_end", axis=0)
    lower = gb.op("Gather", [prefix, starts], "prefix_start", axis=0)
    total = gb.op("Sub", [upper, lower], "pooled_f64")
    return gb.op("Cast", [total], "pooled", to=TensorProto.FLOAT)


def add_scatter_pool(
    gb: GraphBuilder, rows: str, values: str, lengths: str, dim: int, op: str = "ScatterND"
) -> str:
    """Bag sums by scattering rows onto their segment ids (``ScatterND`` or ``ScatterElements``)."""
    segment_ids = add_segment_ids(gb, values, lengths)
    num_bags = gb.op("Shape", [lengths], "num_bags")
    shape = gb.op("Concat", [num_bags, gb.const("dim", _int64([dim]))], "pool_shape", axis=0)
    zeros = _zeros(gb, shape, TensorProto.FLOAT, "pool_zeros")
    index = gb.op("Unsqueeze", [segment_ids, gb.const("axes_last", _int64([-1]))], "seg_2d")
    if op == "ScatterND":
        return gb.op("ScatterND", [zeros, index, rows], "pooled", reduction="add")
    index = gb.op("Expand", [index, gb.op("Shape", [rows], "rows_shape")], "seg_expanded")
    return gb.op("ScatterElements", [zeros, index, rows], "pooled", axis=0, reduction="add")


def add_sum_pool(
    gb: GraphBuilder, rows: str, values: str, lengths: str, dim: int, pooling: Pooling = "cumsum"
) -> str:
    """Sum float32 ``rows`` ``[N, D]`` into their bags: float32 ``[B, D]`` (empty bags are 0)."""
    if pooling == "cumsum":
        return add_cumsum_pool(gb, rows, lengths, dim)
    if pooling == "scatter_nd":
        return add_scatter_pool(gb, rows, values, lengths, dim, "ScatterND")
    if pooling == "scatter_elements":
        return add_scatter_pool(gb, rows, values, lengths, dim, "ScatterElements")
    raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")


def add_feature_lookup(
    gb: GraphBuilder,
    table: TableLookup,
    values: str,
    lengths: str,
    rowwise_impl: RowwiseImpl = "auto",
    pooling: Pooling = "cumsum",
) -> str:
    """Sum-pooled embedding of one jagged feature: float32 ``[B, D]``."""
    rows = add_gather(gb, table, values, rowwise_impl)
    return add_sum_pool(gb, rows, values, lengths, table.dim, pooling)


def build_gather_model(table: TableLookup, rowwise_impl: RowwiseImpl = "auto") -> onnx.ModelProto:
    """Stand-alone graph ``ids`` int64 ``[n]`` -> ``rows`` float32 ``[n, D]`` (tests, benchmarks)."""
    table.validate()
    gb = GraphBuilder(f"gather_{sanitize_name(table.name)}")
    ids = gb.add_input("ids", TensorProto.INT64, ["n"])
    rows = add_gather(gb, table, ids, rowwise_impl)
    gb.add_output(rows, "rows", TensorProto.FLOAT, ["n", table.dim])
    return gb.make_model()


def build_pool_model(
    table: TableLookup, rowwise_impl: RowwiseImpl = "auto", pooling: Pooling = "cumsum"
) -> onnx.ModelProto:
    """Stand-alone graph ``values`` ``[n]``, ``lengths`` ``[batch]`` -> ``pooled`` ``[batch, D]``."""
    table.validate()
    gb = GraphBuilder(f"pool_{sanitize_name(table.name)}")
    values = gb.add_input("values", TensorProto.INT64, ["n"])
    lengths = gb.add_input("lengths", TensorProto.INT64, [BATCH])
    pooled = add_feature_lookup(gb, table, values, lengths, rowwise_impl, pooling)
    gb.add_output(pooled, "pooled", TensorProto.FLOAT, [BATCH, table.dim])
    return gb.make_model()


# ---------------------------------------------------------------------------------------------
# All features at once (what the full model uses)

#: A feature to look up: its table and the names of its jagged inputs (values, lengths).
FeatureInputs = tuple[TableLookup, str, str]


def _batched_group(table: TableLookup, rowwise_impl: RowwiseImpl) -> tuple:
    """Features whose tables share a group key are dequantized and pooled together."""
    kind = table.kind
    if isinstance(kind, RowwiseTable) and rowwise_impl != "gbq":
        return ("rowwise", kind.bits)
    return ("rows",)


def _fused_rows(gb: GraphBuilder, table: TableLookup) -> str:
    """The row-wise table as one uint8 ``[R, P + 4]`` initializer ``emb.<table>.packed``: the
    ``P`` packed code bytes, then the fp16 scale and bias as bytes ``scale_lo, bias_lo, scale_hi,
    bias_hi`` (little-endian), so that one ``Gather`` (one cache miss a row, like FBGEMM's fused
    rows) fetches everything a row needs."""
    name = f"{_prefix(table)}.packed"
    if name not in gb.initializers:
        kind: RowwiseTable = table.kind
        sb = np.stack([kind.scale, kind.bias], axis=1).astype(np.float16).view(np.uint16)
        lo, hi = (sb & 0xFF).astype(np.uint8), (sb >> 8).astype(np.uint8)
        gb.initializer(name, np.concatenate([kind.packed, lo, hi], axis=1))
    return name


def _decode_fp16_bytes(gb: GraphBuilder, lo: str, hi: str) -> str:
    """float32 values of fp16 numbers given as uint8 low and high bytes (same shapes); exact:
    one Gather from a 65536-entry float32 table of every fp16 value."""
    if "fp16_values" not in gb.initializers:
        table = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
        gb.initializer("fp16_values", table.astype(np.float32))
    lo = gb.op("Cast", [lo], "fp16_lo", to=TensorProto.INT32)
    hi = gb.op("Cast", [hi], "fp16_hi", to=TensorProto.INT32)
    bits = gb.op("Add", [gb.op("Mul", [hi, gb.const("i256", 256, np.int32)], "fp16_hi256"), lo])
    return gb.op("Gather", ["fp16_values", bits], "fp16_value", axis=0)


def _concat(gb: GraphBuilder, parts: list[str], hint: str, axis: int = 0) -> str:
    return parts[0] if len(parts) == 1 else gb.op("Concat", parts, hint, axis=axis)


def _unpack_transposed(gb: GraphBuilder, packed_t: str, bits: int, dim: int) -> str:
    """uint8 ``[D*bits/8, M]`` packed bytes (one column per row) -> codes ``[D, M]``."""
    if bits == 8:
        return packed_t
    codes = _interleave_codes(gb, packed_t, bits, axis=1)  # [D*bits/8, per_byte, M]: d = j*per + k
    return gb.op("Reshape", [codes, gb.const("codes_t_shape", _int64([dim, -1]))], "codes_t")


def _rowwise_rows_batched(
    gb: GraphBuilder, features: list[FeatureInputs], bits: int, dim: int
) -> str:
    """Rows ``[N + 1, D]`` of several row-wise tables of ``bits`` plus a trailing zero row.

    One Gather per feature of fused rows (packed codes + fp16 scale and bias bytes,
    :func:`_fused_rows`: one cache miss a row instead of two), then one unpack and dequantize
    (``code * scale + bias`` in float32, exact) for all of them. The dequantize runs transposed
    (``[D, N + 1]``), where the per-row scale and bias broadcast as row vectors: ORT's fast path (a
    ``[N, 1]`` column broadcast ran 4x slower); one Transpose turns the result back. The fp16 scale
    and bias are decoded from their bytes with one Gather from a table of all 65536 fp16 values
    (opset 21 has no bit cast). The zero row (codes, scale and bias 0) rides along in the
    concatenation that happens anyway. On the serving benchmark (26 INT4 tables, batch 2048, 2
    threads) this took the lookup graph from ~10.1 to ~8.7 ms (separate packed and ``[scale, bias]``
    Gathers: 52 random-access Gathers instead of 26).
    """
    nbytes = dim * bits // 8
    zero_row = gb.const("zero_fused_row", np.zeros((1, nbytes + 4), np.uint8))
    fused = [
        gb.op("Gather", [_fused_rows(gb, table), values], "fused_rows", axis=0)
        for table, values, _ in features
    ]
    fused_t = gb.op(
        "Transpose",
        [gb.op("Concat", [*fused, zero_row], "fused_all", axis=0)],
        "fused_t",
        perm=[1, 0],
    )  # [P + 4, N + 1]
    axes = gb.const("axes0", _int64([0]))

    def rows(a: int, b: int, hint: str) -> str:
        bounds = [gb.const(f"row{a}", _int64([a])), gb.const(f"row{b}", _int64([b]))]
        return gb.op("Slice", [fused_t, *bounds, axes], hint)

    packed_t = rows(0, nbytes, "packed_t")
    sb = _decode_fp16_bytes(
        gb, rows(nbytes, nbytes + 2, "sb_lo"), rows(nbytes + 2, nbytes + 4, "sb_hi")
    )  # [2, N + 1]
    codes = gb.op(
        "Cast", [_unpack_transposed(gb, packed_t, bits, dim)], "codes_f32", to=TensorProto.FLOAT
    )
    scale = gb.op(
        "Slice", [sb, gb.const("row0", _int64([0])), gb.const("row1", _int64([1])), axes], "scale"
    )
    bias = gb.op(
        "Slice", [sb, gb.const("row1", _int64([1])), gb.const("row2", _int64([2])), axes], "bias"
    )
    rows_t = gb.op("Add", [gb.op("Mul", [codes, scale], "rows_scaled"), bias], "rows_t")
    return gb.op("Transpose", [rows_t], "rows", perm=[1, 0])


def _generic_rows(
    gb: GraphBuilder, features: list[FeatureInputs], dim: int, rowwise_impl: RowwiseImpl
) -> str:
    """Rows ``[N + 1, D]`` gathered feature by feature (:func:`add_gather`) plus a zero row."""
    parts = [add_gather(gb, t, v, rowwise_impl) for t, v, _ in features]
    parts.append(gb.const("zero_row_f32", np.zeros((1, dim), np.float32)))
    return gb.op("Concat", parts, "rows_all", axis=0)


def _add_branch(gb: GraphBuilder, build) -> onnx.GraphProto:  # noqa: ANN001 - (GraphBuilder) -> str
    """A subgraph (for ``If``) built by ``build(sub) -> value`` on a builder that shares ``gb``'s
    initializers (outer-scope values) and name counter."""
    sub = GraphBuilder(gb.fresh("branch"), initializers=gb.initializers, _count=gb._count)
    value = build(sub)
    out = sub.fresh("branch_out")
    sub.nodes.append(helper.make_node("Identity", [value], [out]))
    gb._count = sub._count
    gb.uses_ms_domain |= sub.uses_ms_domain
    return helper.make_graph(
        sub.nodes, sub.name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)]
    )


def _cumsum_pool_padded(gb: GraphBuilder, rows: str, lengths: str) -> str:
    """Bag sums ``[F_g * B, D]`` from rows ``[N + 1, D]`` whose last row is zero: an exclusive
    float64 running sum ``E`` (``E[N]`` is the total), gathered at every bag's end and start and
    subtracted (two Gathers: ~0.3 ms faster than one Gather at all boundaries + two Slices)."""
    axis0 = gb.const("axis0", 0, np.int64)
    wide = gb.op("Cast", [rows], "rows_f64", to=TensorProto.DOUBLE)
    running = gb.op("CumSum", [wide, axis0], "rows_cumsum", exclusive=1)  # [N + 1, D]
    ends = gb.op("CumSum", [lengths, axis0], "bag_ends")
    starts = gb.op("Sub", [ends, lengths], "bag_starts")
    upper = gb.op("Gather", [running, ends], "prefix_end", axis=0)
    lower = gb.op("Gather", [running, starts], "prefix_start", axis=0)
    total = gb.op("Sub", [upper, lower], "pooled_f64")
    return gb.op("Cast", [total], "pooled", to=TensorProto.FLOAT)


def _one_hot_condition(gb: GraphBuilder, ids: str, lengths: str) -> str:
    """bool ``[1]``: every bag of the group holds exactly one id (``N == bags`` and
    ``sum(lengths^2) == bags``; lengths are non-negative and sum to ``N``)."""
    n = gb.op("Shape", [ids], "num_ids")
    bags = gb.op("Shape", [lengths], "num_bags")
    squares = gb.op("ReduceSumSquare", [lengths], "lengths_sq", keepdims=1)
    same_count = gb.op("Equal", [n, bags], "ids_eq_bags")
    all_ones = gb.op("Equal", [squares, bags], "lengths_all_one")
    return gb.op("And", [same_count, all_ones], "one_hot")


def _first_rows(gb: GraphBuilder, x: str, count_of: str, hint: str) -> str:
    """``x[:len(count_of)]``."""
    n = gb.op("Shape", [count_of], "count")
    return gb.op(
        "Slice", [x, gb.const("start0", _int64([0])), n, gb.const("axes0", _int64([0]))], hint
    )


def _pool_group(
    gb: GraphBuilder, rows: str, ids: str, lengths: str, dim: int, pooling: Pooling
) -> str:
    """Bag sums ``[F_g * B, D]`` of rows ``[N + 1, D]`` (last row zero). With ``cumsum`` pooling,
    an ``If`` skips pooling altogether when every bag holds one id (the rows are the bags)."""
    if pooling != "cumsum":
        return add_sum_pool(gb, _first_rows(gb, rows, ids, "rows_real"), ids, lengths, dim, pooling)
    then_branch = _add_branch(gb, lambda sub: _first_rows(sub, rows, lengths, "bags"))
    else_branch = _add_branch(gb, lambda sub: _cumsum_pool_padded(sub, rows, lengths))
    cond = _one_hot_condition(gb, ids, lengths)
    return gb.op(
        "If", [cond], "pooled_group_flat", then_branch=then_branch, else_branch=else_branch
    )


def _add_group(
    gb: GraphBuilder,
    key: tuple,
    features: list[FeatureInputs],
    dim: int,
    rowwise_impl: RowwiseImpl,
    pooling: Pooling,
) -> str:
    """Pooled embeddings ``[F_g, B, D]`` of one group of features (feature-major)."""
    ids = _concat(gb, [v for _, v, _ in features], "ids_all")
    lengths = _concat(gb, [ln for _, _, ln in features], "lengths_all")  # [F_g * B]
    if key[0] == "rowwise":
        rows = _rowwise_rows_batched(gb, features, key[1], dim)
    else:
        rows = _generic_rows(gb, features, dim, rowwise_impl)
    pooled = _pool_group(gb, rows, ids, lengths, dim, pooling)  # [F_g * B, D]
    shape = gb.const("group_shape", _int64([len(features), -1, dim]))
    return gb.op("Reshape", [pooled, shape], "pooled_group")


def add_sparse_arch(
    gb: GraphBuilder,
    features: list[FeatureInputs],
    dim: int,
    rowwise_impl: RowwiseImpl = "auto",
    pooling: Pooling = "cumsum",
) -> str:
    """Sum-pooled embeddings of every feature: float32 ``[B, F, D]`` in the order given (TorchRec
    ``SparseArch``'s output).

    Features are grouped by how their rows are computed, and each group is gathered, dequantized
    and pooled with one chain of ops over all its ids (concatenated feature-major), like FBGEMM's
    table-batched kernels: row-wise tables of one bit width share one unpack + dequantize
    (``Gather`` of packed bytes and of ``[scale, bias]`` per feature, standard ops, exact); other
    kinds (and row-wise with ``rowwise_impl="gbq"``) gather per feature with :func:`add_gather`.
    A graph of 26 features thus runs a few dozen nodes instead of hundreds. With ``cumsum``
    pooling a group whose bags all hold one id (a runtime ``If``) is not pooled at all: its rows
    are its bags (REFERENCE.md: reducing one-element bags costs more than the lookups).
    """
    groups: dict[tuple, list[tuple[int, FeatureInputs]]] = {}
    for i, feature in enumerate(features):
        groups.setdefault(_batched_group(feature[0], rowwise_impl), []).append((i, feature))
    pooled = [
        _add_group(gb, key, [f for _, f in members], dim, rowwise_impl, pooling)
        for key, members in groups.items()
    ]
    stacked = _concat(gb, pooled, "pooled_groups")  # [F, B, D] in group order
    order = [i for members in groups.values() for i, _ in members]
    if order != list(range(len(features))):
        inverse = np.argsort(np.asarray(order, dtype=np.int64))
        stacked = gb.op(
            "Gather", [stacked, gb.const("feature_order", inverse)], "pooled_ordered", axis=0
        )
    return gb.op("Transpose", [stacked], "sparse_bfd", perm=[1, 0, 2])
