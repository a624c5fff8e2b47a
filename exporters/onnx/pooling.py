"""Jagged sum pooling in ONNX: rows of ids ``[N, D]`` and bag ``lengths`` ``[B]`` -> ``[B, D]``.

Never builds ``[N, B]`` or padding, and runs at any thread count to the same result (running sums,
no scatter with reductions: onnxruntime's CPU ``ScatterND`` applies its reductions from several
threads without synchronisation):

* one feature (:func:`add_cumsum_pool`): a float64 running sum of the rows (``Cast`` +
  ``CumSum``) with a zero row in front, then ``P[end_b] - P[start_b]`` with two ``Gather`` ops.
* a group of features (:func:`pool_group`, what the full model uses): an ``If`` skips pooling when
  every bag holds one id; otherwise bags of at most :data:`POOL_CHUNK` ids are summed in float32
  from chunk-local running sums (:func:`_chunked_pool`: three row Gathers, no float64), and a batch
  with a longer bag takes the float64 running sum (another ``If``). Bag ends and starts are put in
  batch-major order before the Gathers, which thus write ``[B, F_g, D]`` directly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from onnx import TensorProto, helper

from exporters.onnx.ops import add_branch, batch_major, int64
from exporters.onnx.spec import GraphBuilder


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


def _bag_bounds(gb: GraphBuilder, lengths: str, num_features: int) -> tuple[str, str]:
    """Every bag's end and start row (int64 ``[B, F_g]``, batch-major) from feature-major
    ``lengths`` ``[F_g * B]``: Gathers at these indices write ``[B, F_g, D]`` directly."""
    ends = gb.op("CumSum", [lengths, gb.const("axis0", 0, np.int64)], "bag_ends")
    starts = gb.op("Sub", [ends, lengths], "bag_starts")
    ends_bf = batch_major(gb, ends, num_features, "bag_ends_bf")
    return ends_bf, batch_major(gb, starts, num_features, "bag_starts_bf")


def chunk_pad(gb: GraphBuilder, n: str) -> str:
    """int64 ``[1]``: ``K - n % K`` (``K = POOL_CHUNK``), between 1 and ``K``: what makes ``n``
    a multiple of ``K`` with at least one more (zero) row."""
    chunk = gb.const("pool_chunk", int64([POOL_CHUNK]))
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
        pad = chunk_pad(gb, gb.op("Shape", [rows], "pool_rows", end=1))
        shape = gb.op("Concat", [pad, gb.const("pool_dim", int64([dim]))], "pool_pad_shape", axis=0)
        value = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
        zeros = gb.op("ConstantOfShape", [shape], "pool_zeros", value=value)
        rows = gb.op("Concat", [rows, zeros], "pool_padded", axis=0)  # [C * K, D]
    chunks = gb.op("Reshape", [rows, gb.const("chunk_shape", int64([-1, k, dim]))], "chunks")
    axis1 = gb.const("axis1", 1, np.int64)
    local_3d = gb.op("CumSum", [chunks, axis1], "chunk_cumsum", exclusive=1)
    local = gb.op("Reshape", [local_3d, gb.const("flat_rows", int64([-1, dim]))], "chunk_prefix")

    def last_row(x: str, hint: str) -> str:  # x[:, K-1, :] as [C, D]
        bounds = [gb.const("last", int64([k - 1])), gb.const("end", int64([k]))]
        sliced = gb.op("Slice", [x, *bounds, gb.const("axes1", int64([1]))], hint)
        return gb.op("Squeeze", [sliced, gb.const("axes1", int64([1]))], f"{hint}_2d")

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
    kk = gb.const("pool_chunk", int64([POOL_CHUNK]))
    num_chunks = gb.op("Shape", [totals], "num_chunks_z", end=1)
    num_chunks = gb.op("Sub", [num_chunks, gb.const("one", int64([1]))], "num_chunks")
    ends, starts = _bag_bounds(gb, lengths, num_features)
    chunk_s = gb.op("Div", [starts, kk], "chunk_of_start")
    spans = gb.op("Greater", [gb.op("Div", [ends, kk], "chunk_of_end"), chunk_s], "bag_spans")
    total_idx = gb.op("Where", [spans, chunk_s, num_chunks], "chunk_total_idx")
    upper = gb.op("Gather", [local, ends], "prefix_end", axis=0)
    lower = gb.op("Gather", [local, starts], "prefix_start", axis=0)
    carry = gb.op("Gather", [totals, total_idx], "chunk_carry", axis=0)
    return gb.op("Add", [gb.op("Sub", [upper, lower], "bag_partial"), carry], "pooled")


def pool_multi(
    gb: GraphBuilder, rows: str, lengths: str, num_features: int, dim: int, padded: bool = False
) -> str:
    """Bag sums ``[B, F_g, D]``: :func:`_chunked_pool` when no bag is longer than
    :data:`POOL_CHUNK`, else the float64 running sum (:func:`_cumsum_pool_padded`)."""
    longest = gb.op("ReduceMax", [lengths], "lengths_max", keepdims=1)
    too_long = gb.op("Greater", [longest, gb.const("pool_chunk", int64([POOL_CHUNK]))], "long_bag")
    wide = add_branch(gb, lambda sub: _cumsum_pool_padded(sub, rows, lengths, num_features))
    short = add_branch(gb, lambda sub: _chunked_pool(sub, rows, lengths, num_features, dim, padded))
    return gb.op("If", [too_long], "pooled_bags", then_branch=wide, else_branch=short)


def _num_rows_but_last(gb: GraphBuilder, rows: str) -> str:
    """int64 ``[1]``: ``len(rows) - 1`` (the ids of a group, without its zero row)."""
    n = gb.op("Shape", [rows], "num_rows", end=1)
    return gb.op("Sub", [n, gb.const("one", int64([1]))], "num_ids")


def one_hot_condition(gb: GraphBuilder, num_ids: str, lengths: str) -> str:
    """bool ``[1]``: every bag of the group holds exactly one id (``N == bags`` and no bag is
    empty; lengths are non-negative and sum to ``N``)."""
    bags = gb.op("Shape", [lengths], "num_bags")
    same_count = gb.op("Equal", [num_ids, bags], "ids_eq_bags")
    smallest = gb.op("ReduceMin", [lengths], "lengths_min", keepdims=1)
    none_empty = gb.op("Greater", [smallest, gb.const("zero", int64([0]))], "no_empty_bag")
    return gb.op("And", [same_count, none_empty], "one_hot")


def one_hot_or_pooled(
    gb: GraphBuilder,
    num_ids: str,
    lengths: str,
    one_hot: Callable[[GraphBuilder], str],
    pooled: Callable[[GraphBuilder], str],
) -> str:
    """A group's ``[B, F_g, D]`` from an ``If`` on :func:`one_hot_condition`: built by
    ``one_hot`` while every bag holds one id (no pooling), by ``pooled`` otherwise."""
    cond = one_hot_condition(gb, num_ids, lengths)
    return gb.op(
        "If",
        [cond],
        "pooled_group",
        then_branch=add_branch(gb, one_hot),
        else_branch=add_branch(gb, pooled),
    )


def _first_rows(gb: GraphBuilder, x: str, n: str, hint: str) -> str:
    """``x[:n]`` for an int64 ``[1]`` value ``n``."""
    return gb.op(
        "Slice", [x, gb.const("start0", int64([0])), n, gb.const("axes0", int64([0]))], hint
    )


def pool_group(
    gb: GraphBuilder,
    rows: str,
    lengths: str,
    dim: int,
    num_features: int,
    num_ids: str | None = None,
    padded: bool = False,
) -> str:
    """Bag sums ``[B, F_g, D]`` of rows ``[N + 1, D]`` (zero after the first ``N``; ``num_ids``:
    ``N``, by default all rows but the last; ``padded``: a multiple of :data:`POOL_CHUNK` rows).
    An ``If`` skips pooling altogether when every bag holds one id (the rows are the bags)."""
    num_ids = num_ids or _num_rows_but_last(gb, rows)

    def one_hot(sub: GraphBuilder) -> str:
        shape = sub.const("group_shape", int64([num_features, -1, dim]))
        grouped = sub.op("Reshape", [_first_rows(sub, rows, num_ids, "bags"), shape], "bags_fbd")
        return sub.op("Transpose", [grouped], "pooled_bfd", perm=[1, 0, 2])

    return one_hot_or_pooled(
        gb,
        num_ids,
        lengths,
        one_hot,
        lambda sub: pool_multi(sub, rows, lengths, num_features, dim, padded),
    )
