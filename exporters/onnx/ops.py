"""Small ONNX node helpers the lookup builders share (:mod:`exporters.onnx.lookup`,
:mod:`exporters.onnx.pooling`, :mod:`exporters.onnx.stacked_rows`, and the methods' own lookups
through :class:`exporters.onnx.lookup.RowsRequest`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from exporters.onnx.spec import GraphBuilder, TableLookup

#: A feature to look up: its table and the names of its jagged inputs (values, lengths).
FeatureInputs = tuple[TableLookup, str, str]


def int64(values: list[int] | int) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def add_valid_ids(gb: GraphBuilder, ids: str, num_rows: int) -> str:
    """``ids`` (int64 ``[N]``) with every id outside ``[0, num_rows)`` replaced by 0.

    One comparison covers both ends: as uint64, a negative id is larger than any row count
    (``Cast`` + ``Less`` + ``Where``, a few us per feature at batch 2048).
    """
    as_unsigned = gb.op("Cast", [ids], "ids_u64", to=TensorProto.UINT64)
    bound = gb.const(f"num_rows_{num_rows}", num_rows, np.uint64)
    valid = gb.op("Less", [as_unsigned, bound], "ids_in_range")
    return gb.op("Where", [valid, ids, gb.const("zero_id", 0, np.int64)], "ids_valid")


def concat(gb: GraphBuilder, parts: list[str], hint: str, axis: int = 0) -> str:
    return parts[0] if len(parts) == 1 else gb.op("Concat", parts, hint, axis=axis)


def interleave_codes(gb: GraphBuilder, packed: str, bits: int, axis: int) -> str:
    """Split every packed byte into its ``8 // bits`` codes (low bits first) along a new ``axis``.

    Each code position is one ``BitShift`` and ``BitwiseAnd`` by a *scalar* (ORT's vectorized fast
    path; a broadcast ``[per_byte]`` shift vector ran 4-8x slower), then one ``Concat``.
    """
    per_byte = 8 // bits
    mask = gb.const("unpack_mask", (1 << bits) - 1, np.uint8)
    axes = gb.const("axes_last" if axis == -1 else f"axes{axis}", int64([axis]))
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
    codes = interleave_codes(gb, packed_rows, bits, axis=-1)  # [N, D*bits/8, per_byte]
    if ids is None:
        shape = gb.const("rows_shape", int64([-1, dim]))
    else:
        shape = gb.op("Concat", [gb.op("Shape", [ids]), gb.const("dim", int64([dim]))], axis=0)
    return gb.op("Reshape", [codes, shape], "codes")


def add_branch(gb: GraphBuilder, build: Callable[[GraphBuilder], str]) -> onnx.GraphProto:
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


def batch_major(gb: GraphBuilder, x: str, num_features: int, hint: str) -> str:
    """``[F * B, ...]`` in feature-major order -> ``[B, F, ...]``."""
    shape = gb.const("feature_major", int64([num_features, -1]))
    rank2 = gb.op("Reshape", [x, shape], f"{hint}_fb")
    return gb.op("Transpose", [rank2], hint, perm=[1, 0])
