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
"""

from __future__ import annotations

from onnx import TensorProto, helper

from exporters.onnx.ops import (
    FeatureInputs,
    add_branch,
    add_valid_ids,
    concat,
    int64,
    interleave_codes,
)
from exporters.onnx.pooling import chunk_pad, one_hot_condition, pool_group, pool_multi
from exporters.onnx.spec import GraphBuilder, TableLookup, sanitize_name

#: The arrays of a stacked table as the graph names them (``emb.<table>.<role>``), in the order
#: of :func:`table_initializers`.
ROLES = ("packed", "scale", "bias")


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

    cond = one_hot_condition(gb, num_ids, lengths)
    return gb.op(
        "If",
        [cond],
        "pooled_group",
        then_branch=add_branch(gb, batch_major_rows),
        else_branch=add_branch(gb, lambda sub: general(sub, known_multi=True)),
    )
