"""Embedding lookups as ONNX subgraphs: gather + dequantize rows, then jagged sum pooling.

Each builder appends nodes to a :class:`~exporters.onnx.spec.GraphBuilder` and returns the name of
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

Out-of-range ids (:data:`OUT_OF_RANGE_IDS`): an id outside ``[0, rows)`` of its table reads row 0
of its own table, in every layout (stacked or not, one-hot or pooled, hashed tables too), as
FBGEMM's bounds check does (``BoundsCheckMode.WARNING``). Stacked row-wise tables clip each
feature's ids to ``[0, rows]`` (one ``Clip``), row ``rows`` being a copy of row 0; the other
kinds replace such ids by 0 (:func:`add_valid_ids`: ``Cast`` to uint64, ``Less``, ``Where``; no
copy of the table needed). Before this, a stacked table served id ``rows`` as the next table's
first row, ``Gather`` wrapped a negative id to the end of the table, and a hashed table hashed
any integer. Cost on the serving benchmark (26 stacked INT4 tables, batch 2048, 2 threads, the
lookup graph alone, with and without the guard in turn): +0.06-0.07 ms (<1% of ~7.5 ms), not
measurable on the whole model (~17 ms); :func:`add_valid_ids` on every stacked feature instead
measured +0.3-0.4 ms.

Pooling (``values`` ``[N]``, ``lengths`` ``[B]`` -> ``[B, D]``) never builds ``[N, B]`` or
padding. Three ways, chosen with ``pooling``:

* ``"cumsum"`` (default): running sums. Per feature (:func:`add_sum_pool`): float64 running sum of
  the rows (``Cast`` + ``CumSum``), a zero row in front, then ``P[end_b] - P[start_b]`` with two
  ``Gather`` ops. In the batched full-model path, chunk-local float32 sums when no bag is longer
  than :data:`POOL_CHUNK` (see below). Deterministic at any thread count and within float32
  rounding of a sequential sum.
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
table-batched kernels. Row-wise tables of one bit width (``rowwise_impl`` ``auto`` or
``standard``) are *stacked*: one uint8 initializer ``emb.rowwise<bits>.fused`` ``[sum (R + 1)
+ 1, P + 4]`` holds every table of the group one after another (a table shared by several
features once), each followed by a copy of its row 0, each row ``[codes | fp16 scale, bias
bytes]`` (FBGEMM's fused row), then one zero row. Each feature's ids are clipped to ``[0, R]``
(one ``Clip``: an id out of range lands on row 0 or its copy), shifted by its table's first row
(one ``Add`` by a scalar) and concatenated, then padded with the zero row's index to a multiple of :data:`POOL_CHUNK`, so ONE
``Gather`` fetches every row of the group. Then one unpack + dequantize in a transposed layout
where per-row scales broadcast fast; the fp16 scale and bias are decoded from their bytes by
``GatherElements`` in a table of all 65536 fp16 values. With ``cumsum`` pooling an ``If`` skips
pooling when every bag of the group holds one id; otherwise bags of at most ``POOL_CHUNK`` ids are
summed in float32 from chunk-local running sums (:func:`_chunked_pool`: three row Gathers, no
float64), and a batch with a longer bag takes the float64 running sum (an ``If``). The bag ends and
starts are put in batch-major order (small int64 Transposes) before the Gathers, which thus write
``[B, F_g, D]`` directly. Features the data shows one-hot (``one_hot``, a layout hint the exporter
takes from the training data) form groups of their own that gather their ids in batch-major order
while a batch agrees (so their rows are ``[B, F_g, D]`` with no pooling at all), and take the
general path when it does not. Other kinds (and row-wise with ``impl="gbq"``) are gathered per
feature (:func:`add_gather`) and pooled the same way.

Measured on the serving benchmark (26 INT4 tables of dim 16, 5.6M rows, batch 2048, 8 features
with bags of 1..5 ids, 2 threads; ``benchmarks/bench_serving.py``, ORT profiler), lookup graph
alone: 26 per-feature Gathers of fused rows ~8.6 ms; stacked, float64 cumsum pooling ~6.8 ms;
chunked float32 pooling ~6.45 ms; one-hot features apart ~5.0-5.3 ms (FBGEMM's fused kernel:
~1.4 ms). Where the time went and what did not help, at that shape:

* 26 per-feature ``Gather`` ops of fused rows: ~2.5 ms; one Gather on the stacked table ~0.75 ms
  (the same 86k rows: ORT's Gather pays per op and per index, ~5-10 ns an index; cold rows of a
  66 MB table ~16 ns).
* fp16 decode: ``Gather`` in the 65536-entry table ~0.75 ms, ``GatherElements`` ~0.1 ms. A second
  random-access Gather of a separate float16 ``[R, 2]`` initializer costs ~0.6 ms (a second cache
  miss a row), so the bytes stay fused. Reading them with opset 26's ``BitCast`` from a uint16
  table measured the same (and needs a newer runtime), so the graphs stay at opset 21.
* A padded ``[bags, maxL]`` index + ``Gather`` + ``ReduceSum`` was slower: maxL = 5 makes 266k row
  gathers for 86k ids (~7 ms at this shape). Chunk-local running sums as one MatMul in the
  transposed layout cost more in Transposes than they saved; so did a single 3-D Transpose of
  ``[D, F, B]`` (3.6 ms: it moves single floats).
* Dequantizing straight to float64 (to skip the Cast before the CumSum): +3 ms, because the
  float64 ``[D, N]`` Transpose is several times slower than the float32 one.
* ``com.microsoft::GatherBlockQuantized`` on the stacked table: ~11 ms for the same 86k rows.
* ``GatherElements`` on the stacked rows as uint32 words: the copy itself is faster than
  ``Gather``'s per-row ``memcpy`` (1.3 vs 2.3 ms for 86k random rows), but building the
  ``[M, W]`` word indices (int64 Mul/Add or Expand) cost more than it saved (full model 0.90-0.93x
  of PyTorch against 0.99-1.02x with ``Gather``).
* Unpacking planar codes (``x = 16 hi + lo`` per byte) with float ``Mul``/``Floor``/``Sub``
  instead of ``BitShift``/``BitwiseAnd`` + interleaving ``Concat``: lookups 15-20% slower (more
  mid-size ops; each float op on 400k elements still costs ~50-100 us at 2 threads).
* Dequantizing in the row layout ``[M, D]`` with the scale and bias spread to ``[M, D]`` by a 0/1
  ``MatMul`` (no Transposes): faster alone (1.54 vs 1.84 ms at 50k rows), 11-16% slower in the
  lookup graph (strided column Slices of the gathered rows).
* Cutting a group's dequantize chain into 2-8 pieces that fit in L2: slower (2.1 ms -> 2.4-2.9 ms).
* ``BitCast`` (opset 26) cannot turn uint8 bytes into uint4 codes or fp16 pairs (equal bit widths
  only); ``session.dynamic_block_base`` 2/4/8: no gain.

Example::

    gb = GraphBuilder("lookup")
    ids = gb.add_input("ids", TensorProto.INT64, ["n"])
    rows = add_gather(gb, table, ids)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper

from exporters.onnx.spec import (
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


#: What a lookup does with an id outside ``[0, rows)``, recorded in the manifest's ``onnx`` section.
OUT_OF_RANGE_IDS = "row0_of_own_table"


def add_valid_ids(gb: GraphBuilder, ids: str, num_rows: int) -> str:
    """``ids`` (int64 ``[N]``) with every id outside ``[0, num_rows)`` replaced by 0.

    FBGEMM's bounds check (``BoundsCheckMode.WARNING``) does the same: an out-of-range index reads
    row 0 of its own table. Without it a stacked table would serve ``num_rows`` as the next
    table's first row, ``Gather`` would wrap a negative id to the end of the table, and a hashed
    (ROBE) table would hash any integer. One comparison covers both ends: as uint64, a negative
    id is larger than any row count (``Cast`` + ``Less`` + ``Where``, a few us per feature at
    batch 2048).
    """
    as_unsigned = gb.op("Cast", [ids], "ids_u64", to=TensorProto.UINT64)
    bound = gb.const(f"num_rows_{num_rows}", num_rows, np.uint64)
    valid = gb.op("Less", [as_unsigned, bound], "ids_in_range")
    return gb.op("Where", [valid, ids, gb.const("zero_id", 0, np.int64)], "ids_valid")


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
    added once however many features look the table up. Ids outside ``[0, rows)`` read row 0
    (:func:`add_valid_ids`).
    """
    kind = table.kind
    ids = add_valid_ids(gb, ids, table.num_rows)
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
        kind: RowwiseTable = table.kind
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
    flat = gb.op("Reshape", [bits, gb.const("flat", _int64([-1]))], "fp16_bits_flat")
    values = gb.op("GatherElements", ["fp16_values", flat], "fp16_value_flat", axis=0)
    return gb.op("Reshape", [values, gb.const("two_rows", _int64([2, -1]))], "fp16_value")


def _concat(gb: GraphBuilder, parts: list[str], hint: str, axis: int = 0) -> str:
    return parts[0] if len(parts) == 1 else gb.op("Concat", parts, hint, axis=axis)


def _unpack_transposed(gb: GraphBuilder, packed_t: str, bits: int, dim: int) -> str:
    """uint8 ``[D*bits/8, M]`` packed bytes (one column per row) -> codes ``[D, M]``."""
    if bits == 8:
        return packed_t
    codes = _interleave_codes(gb, packed_t, bits, axis=1)  # [D*bits/8, per_byte, M]: d = j*per + k
    return gb.op("Reshape", [codes, gb.const("codes_t_shape", _int64([dim, -1]))], "codes_t")


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
    return _concat(gb, parts, "ids_cat")


def _pad_ids(gb: GraphBuilder, ids: str, num_ids: str, zero_row: int) -> str:
    """``ids`` then the zero row's index ``1..K`` times (``K = POOL_CHUNK``): ``[Npad]``, a
    multiple of ``K`` (the chunked pooling's layout)."""
    value = helper.make_tensor("zero_row_id", TensorProto.INT64, [1], [zero_row])
    pad_ids = gb.op("ConstantOfShape", [_chunk_pad(gb, num_ids)], "zero_row_ids", value=value)
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
    return rows_t


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


def _batch_major(gb: GraphBuilder, x: str, num_features: int, hint: str) -> str:
    """``[F * B, ...]`` in feature-major order -> ``[B, F, ...]``."""
    shape = gb.const("feature_major", _int64([num_features, -1]))
    rank2 = gb.op("Reshape", [x, shape], f"{hint}_fb")
    return gb.op("Transpose", [rank2], hint, perm=[1, 0])


def _bag_bounds(gb: GraphBuilder, lengths: str, num_features: int) -> tuple[str, str]:
    """Every bag's end and start row (int64 ``[B, F_g]``, batch-major) from feature-major
    ``lengths`` ``[F_g * B]``: Gathers at these indices write ``[B, F_g, D]`` directly."""
    ends = gb.op("CumSum", [lengths, gb.const("axis0", 0, np.int64)], "bag_ends")
    starts = gb.op("Sub", [ends, lengths], "bag_starts")
    ends_bf = _batch_major(gb, ends, num_features, "bag_ends_bf")
    return ends_bf, _batch_major(gb, starts, num_features, "bag_starts_bf")


def _chunk_pad(gb: GraphBuilder, n: str) -> str:
    """int64 ``[1]``: ``K - n % K`` (``K = POOL_CHUNK``), between 1 and ``K``: what makes ``n``
    a multiple of ``K`` with at least one more (zero) row."""
    chunk = gb.const("pool_chunk", _int64([POOL_CHUNK]))
    return gb.op("Sub", [chunk, gb.op("Mod", [n, chunk], "pool_rem")], "pool_pad")


def _cumsum_pool_padded(gb: GraphBuilder, rows: str, lengths: str, num_features: int) -> str:
    """Bag sums ``[B, F_g, D]`` from rows ``[N + 1, D]`` whose last row is zero: an exclusive
    float64 running sum ``E`` (``E[N]`` is the total), gathered at every bag's end and start and
    subtracted (two Gathers: ~0.3 ms faster than one Gather at all boundaries + two Slices). The
    bag ends and starts are put in batch-major order first (``[B, F_g]`` int64, small), so the
    Gathers write ``[B, F_g, D]`` directly and the pooled embeddings need no Transpose."""
    axis0 = gb.const("axis0", 0, np.int64)
    wide = gb.op("Cast", [rows], "rows_f64", to=TensorProto.DOUBLE)
    running = gb.op("CumSum", [wide, axis0], "rows_cumsum", exclusive=1)  # [N + 1, D]
    ends, starts = _bag_bounds(gb, lengths, num_features)
    upper = gb.op("Gather", [running, ends], "prefix_end", axis=0)
    lower = gb.op("Gather", [running, starts], "prefix_start", axis=0)
    total = gb.op("Sub", [upper, lower], "pooled_f64")
    return gb.op("Cast", [total], "pooled", to=TensorProto.FLOAT)


#: Rows per chunk of the float32 chunked pooling: bags of up to this many ids are pooled from
#: chunk-local running sums (see :func:`_chunked_pool`); a batch with a longer bag takes the
#: float64 running sum instead.
POOL_CHUNK = 32


def _chunked_pool(
    gb: GraphBuilder, rows: str, lengths: str, num_features: int, dim: int, padded: bool = False
) -> str:
    """Bag sums ``[B, F_g, D]`` of rows ``[N + 1, D]`` (last row zero) for bags of at most
    :data:`POOL_CHUNK` ids, all in float32 and no running sum longer than a chunk.

    The rows are cut into chunks of ``K = POOL_CHUNK`` (zero-padded); ``L`` is the exclusive
    running sum inside each chunk and ``T`` each chunk's total. A bag ``[s, e)`` of at most ``K``
    ids lies in one chunk or two neighbours, so its sum is ``L[e] - L[s]``, plus ``T[s // K]``
    when ``e`` is in the next chunk: three float32 Gathers instead of two float64 ones, no
    float64 Cast or CumSum over all rows. Every partial sum spans at most ``K`` rows, so the
    rounding error stays that of summing a bag (a float64 running sum over all rows would be
    needed for a float32 one to stay within 1e-5 of a bag's sum). ``padded``: ``rows`` already
    has a multiple of ``K`` rows (the row-wise groups gather zero rows up to one).
    """
    k = POOL_CHUNK
    if not padded:
        pad = _chunk_pad(gb, gb.op("Shape", [rows], "pool_rows", end=1))
        shape = gb.op(
            "Concat", [pad, gb.const("pool_dim", _int64([dim]))], "pool_pad_shape", axis=0
        )
        value = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
        zeros = gb.op("ConstantOfShape", [shape], "pool_zeros", value=value)
        rows = gb.op("Concat", [rows, zeros], "pool_padded", axis=0)  # [C * K, D]
    chunks = gb.op("Reshape", [rows, gb.const("chunk_shape", _int64([-1, k, dim]))], "chunks")
    axis1 = gb.const("axis1", 1, np.int64)
    local_3d = gb.op("CumSum", [chunks, axis1], "chunk_cumsum", exclusive=1)
    local = gb.op("Reshape", [local_3d, gb.const("flat_rows", _int64([-1, dim]))], "chunk_prefix")

    def last_row(x: str, hint: str) -> str:  # x[:, K-1, :] as [C, D]
        bounds = [gb.const("last", _int64([k - 1])), gb.const("end", _int64([k]))]
        sliced = gb.op("Slice", [x, *bounds, gb.const("axes1", _int64([1]))], hint)
        return gb.op("Squeeze", [sliced, gb.const("axes1", _int64([1]))], f"{hint}_2d")

    # a chunk's total: its exclusive running sum at the last row plus that row (cheaper than a
    # ReduceSum over the chunk, which reads every row again)
    totals = gb.op(
        "Add", [last_row(local_3d, "prefix_last"), last_row(chunks, "row_last")], "chunk_totals"
    )
    zero_row = gb.const("zero_chunk", np.zeros((1, dim), np.float32))
    totals = gb.op("Concat", [totals, zero_row], "chunk_totals_z", axis=0)  # [C + 1, D]
    return _bag_sums(gb, local, totals, lengths, num_features)


def _bag_sums(gb: GraphBuilder, local: str, totals: str, lengths: str, num_features: int) -> str:
    """Bag sums ``[B, F_g, D]`` from chunk-local exclusive running sums ``local`` ``[C*K, D]``
    and chunk totals ``totals`` ``[C + 1, D]`` (last row zero), for bags of at most ``K`` ids
    (see :func:`_chunked_pool`)."""
    kk = gb.const("pool_chunk", _int64([POOL_CHUNK]))
    num_chunks = gb.op("Shape", [totals], "num_chunks_z", end=1)
    num_chunks = gb.op("Sub", [num_chunks, gb.const("one", _int64([1]))], "num_chunks")
    ends, starts = _bag_bounds(gb, lengths, num_features)
    chunk_s = gb.op("Div", [starts, kk], "chunk_of_start")
    spans = gb.op("Greater", [gb.op("Div", [ends, kk], "chunk_of_end"), chunk_s], "bag_spans")
    total_idx = gb.op("Where", [spans, chunk_s, num_chunks], "chunk_total_idx")
    upper = gb.op("Gather", [local, ends], "prefix_end", axis=0)
    lower = gb.op("Gather", [local, starts], "prefix_start", axis=0)
    carry = gb.op("Gather", [totals, total_idx], "chunk_carry", axis=0)
    return gb.op("Add", [gb.op("Sub", [upper, lower], "bag_partial"), carry], "pooled")


def _pool_multi(
    gb: GraphBuilder, rows: str, lengths: str, num_features: int, dim: int, padded: bool = False
) -> str:
    """Bag sums ``[B, F_g, D]``: :func:`_chunked_pool` when no bag is longer than
    :data:`POOL_CHUNK`, else the float64 running sum (:func:`_cumsum_pool_padded`)."""
    longest = gb.op("ReduceMax", [lengths], "lengths_max", keepdims=1)
    too_long = gb.op("Greater", [longest, gb.const("pool_chunk", _int64([POOL_CHUNK]))], "long_bag")
    wide = _add_branch(gb, lambda sub: _cumsum_pool_padded(sub, rows, lengths, num_features))
    short = _add_branch(
        gb, lambda sub: _chunked_pool(sub, rows, lengths, num_features, dim, padded)
    )
    return gb.op("If", [too_long], "pooled_bags", then_branch=wide, else_branch=short)


def _num_rows_but_last(gb: GraphBuilder, rows: str) -> str:
    """int64 ``[1]``: ``len(rows) - 1`` (the ids of a group, without its zero row)."""
    n = gb.op("Shape", [rows], "num_rows", end=1)
    return gb.op("Sub", [n, gb.const("one", _int64([1]))], "num_ids")


def _one_hot_condition(gb: GraphBuilder, num_ids: str, lengths: str) -> str:
    """bool ``[1]``: every bag of the group holds exactly one id (``N == bags`` and no bag is
    empty; lengths are non-negative and sum to ``N``)."""
    bags = gb.op("Shape", [lengths], "num_bags")
    same_count = gb.op("Equal", [num_ids, bags], "ids_eq_bags")
    smallest = gb.op("ReduceMin", [lengths], "lengths_min", keepdims=1)
    none_empty = gb.op("Greater", [smallest, gb.const("zero", _int64([0]))], "no_empty_bag")
    return gb.op("And", [same_count, none_empty], "one_hot")


def _first_rows(gb: GraphBuilder, x: str, n: str, hint: str) -> str:
    """``x[:n]`` for an int64 ``[1]`` value ``n``."""
    return gb.op(
        "Slice", [x, gb.const("start0", _int64([0])), n, gb.const("axes0", _int64([0]))], hint
    )


def _pool_group(
    gb: GraphBuilder,
    rows: str,
    ids: list[str],
    lengths: str,
    dim: int,
    num_features: int,
    pooling: Pooling,
    num_ids: str | None = None,
    padded: bool = False,
) -> str:
    """Bag sums ``[B, F_g, D]`` of rows ``[N + 1, D]`` (zero after the first ``N``; ``ids``: the
    group's id inputs, only their sizes matter; ``num_ids``: ``N``, by default all rows but the
    last; ``padded``: a multiple of :data:`POOL_CHUNK` rows). With ``cumsum`` pooling, an ``If``
    skips pooling altogether when every bag holds one id (the rows are the bags)."""
    num_ids = num_ids or _num_rows_but_last(gb, rows)
    if pooling != "cumsum":
        flat_ids = _concat(gb, ids, "ids_flat")
        real = _first_rows(gb, rows, num_ids, "rows_real")
        pooled = add_sum_pool(gb, real, flat_ids, lengths, dim, pooling)  # [F_g * B, D]
        shape = gb.const("group_shape", _int64([num_features, -1, dim]))
        grouped = gb.op("Reshape", [pooled, shape], "pooled_fbd")
        return gb.op("Transpose", [grouped], "pooled_group", perm=[1, 0, 2])

    def one_hot(sub: GraphBuilder) -> str:
        shape = sub.const("group_shape", _int64([num_features, -1, dim]))
        grouped = sub.op("Reshape", [_first_rows(sub, rows, num_ids, "bags"), shape], "bags_fbd")
        return sub.op("Transpose", [grouped], "pooled_bfd", perm=[1, 0, 2])

    then_branch = _add_branch(gb, one_hot)
    else_branch = _add_branch(
        gb, lambda sub: _pool_multi(sub, rows, lengths, num_features, dim, padded)
    )
    cond = _one_hot_condition(gb, num_ids, lengths)
    return gb.op("If", [cond], "pooled_group", then_branch=then_branch, else_branch=else_branch)


def _add_group(
    gb: GraphBuilder,
    key: tuple,
    features: list[FeatureInputs],
    dim: int,
    rowwise_impl: RowwiseImpl,
    pooling: Pooling,
) -> str:
    """Pooled embeddings ``[B, F_g, D]`` of one group of features."""
    lengths = _concat(gb, [ln for _, _, ln in features], "lengths_all")  # [F_g * B]
    if key[0] == "rowwise":
        return _add_rowwise_group(gb, features, lengths, key[1], dim, pooling, one_hot=key[-1])
    rows = _generic_rows(gb, features, dim, rowwise_impl)
    ids = [v for _, v, _ in features]
    return _pool_group(gb, rows, ids, lengths, dim, len(features), pooling)


def _add_rowwise_group(
    gb: GraphBuilder,
    features: list[FeatureInputs],
    lengths: str,
    bits: int,
    dim: int,
    pooling: Pooling,
    one_hot: bool,
) -> str:
    """Pooled embeddings ``[B, F_g, D]`` of stacked row-wise tables.

    A group expected to be one-hot (``one_hot``, with ``cumsum`` pooling) branches *before* the
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
            return _pool_multi(sub, rows, lengths, num_features, dim, padded=True)
        values = [v for _, v, _ in features]
        return _pool_group(
            sub, rows, values, lengths, dim, num_features, pooling, num_ids, padded=True
        )

    if not (one_hot and pooling == "cumsum"):
        return general(gb, known_multi=False)

    def batch_major(sub: GraphBuilder) -> str:
        fb = sub.op("Reshape", [ids, sub.const("feature_major", _int64([num_features, -1]))])
        bf = sub.op("Transpose", [fb], "ids_bf", perm=[1, 0])
        flat = sub.op("Reshape", [bf, sub.const("flat", _int64([-1]))], "ids_batch_major")
        rows_t = _rowwise_rows_t(sub, table, flat, bits, dim)
        rows = sub.op("Transpose", [rows_t], "rows", perm=[1, 0])  # [B * F_g, D]
        shape = sub.const("bfd", _int64([-1, num_features, dim]))
        return sub.op("Reshape", [rows, shape], "pooled_bfd")

    cond = _one_hot_condition(gb, num_ids, lengths)
    return gb.op(
        "If",
        [cond],
        "pooled_group",
        then_branch=_add_branch(gb, batch_major),
        else_branch=_add_branch(gb, lambda sub: general(sub, known_multi=True)),
    )


def add_sparse_arch_parts(
    gb: GraphBuilder,
    features: list[FeatureInputs],
    dim: int,
    rowwise_impl: RowwiseImpl = "auto",
    pooling: Pooling = "cumsum",
    one_hot: Sequence[bool] | None = None,
) -> tuple[list[str], list[int]]:
    """Sum-pooled embeddings of every feature, group by group: float32 ``[B, F_g, D]`` values
    and ``order`` (the feature index of each position when they are concatenated), for callers
    that can use the features in group order (the DLRM interaction permutes its triangle
    indices instead: no reordering copy).

    Features are grouped by how their rows are computed, and each group is gathered, dequantized
    and pooled with one chain of ops over all its ids (concatenated feature-major), like FBGEMM's
    table-batched kernels: row-wise tables of one bit width are stacked into one initializer and
    share one ``Gather``, unpack and dequantize (standard ops, exact); other kinds (and row-wise
    with ``rowwise_impl="gbq"``) gather per feature with :func:`add_gather`. A graph of 26
    features thus runs a few dozen nodes instead of hundreds. With ``cumsum`` pooling a group
    whose bags all hold one id (a runtime ``If``) is not pooled at all: its rows are its bags.

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
        key = (*_batched_group(feature[0], rowwise_impl), bool(flags[i]))
        groups.setdefault(key, []).append((i, feature))
    pooled = [
        _add_group(gb, key, [f for _, f in members], dim, rowwise_impl, pooling)
        for key, members in groups.items()
    ]
    order = [i for members in groups.values() for i, _ in members]
    return pooled, order


def add_sparse_arch(
    gb: GraphBuilder,
    features: list[FeatureInputs],
    dim: int,
    rowwise_impl: RowwiseImpl = "auto",
    pooling: Pooling = "cumsum",
    one_hot: Sequence[bool] | None = None,
) -> str:
    """Sum-pooled embeddings of every feature: float32 ``[B, F, D]`` in the order given (TorchRec
    ``SparseArch``'s output). See :func:`add_sparse_arch_parts` for how they are computed."""
    return concat_in_order(
        gb, *add_sparse_arch_parts(gb, features, dim, rowwise_impl, pooling, one_hot)
    )


def concat_in_order(gb: GraphBuilder, parts: list[str], order: list[int]) -> str:
    """Group outputs ``[B, F_g, D]`` (features in ``order``, as :func:`add_sparse_arch_parts`
    returns them) as one ``[B, F, D]`` in feature order: a Concat, and a Gather on the feature
    axis only when the groups interleave."""
    stacked = _concat(gb, parts, "pooled_groups", axis=1)  # [B, F, D] in group order
    if order != sorted(order):
        inverse = np.argsort(np.asarray(order, dtype=np.int64))
        stacked = gb.op(
            "Gather", [stacked, gb.const("feature_order", inverse)], "pooled_ordered", axis=1
        )
    return stacked
