"""Ranges that minimize the L2 quantization error (recipe ``ranges = "l2"``), row-wise and table-wise.

**Row-wise.** FBGEMM's row-wise format stores a row as ``bits``-bit codes with an fp16 ``scale``
and ``bias`` (:mod:`compress.quant.fbgemm_rowwise`). Its own quantizer takes the row's min and max
as the range; one outlier then widens every step of the row. Here each row's parameters come from
two stages:

1. the greedy range search of Guan et al. 2019 ("Post-training 4-bit quantization on embedding
   tables", arXiv 1911.02079), as PyTorch implements it (``choose_qparams_optimized``, what
   ``torch.ops.quantized.embedding_bag_4bit_prepack`` / ``_2bit_prepack`` run with
   ``optimized_qparams=True``): ``step = (max - min) / bins``; from ``[min, max]``, while the range
   is wider than ``int(bins * (1 - ratio))`` steps, evaluate moving the min up one step and the max
   down one step, keep the current range when it is a local optimum better than any kept so far,
   and take the better move (a tie moves the max). The loss of a range ``[a, b]`` is the L2 norm,
   in float32 and summed over the columns in order, of the row minus its round trip at
   ``bias = fp16(a)``, ``scale = fp16((b - bias) / (2^bits - 1))``. With PyTorch's settings
   (:data:`PYTORCH_SEARCH`: ``bins=200, ratio=0.16``) the stored codes, scales and biases equal
   that op's bytes, for every row;
2. ``refine`` least-squares steps (HQQ-style alternating minimization): for the codes at the
   current parameters, the scale and bias of least squared error in closed form, rounded to fp16,
   kept for a row only when its error (float64) falls.

So no row's error is above PyTorch's choice, nor (up to the float32 rounding of the search's own
loss) above min/max (:data:`DEFAULT_SEARCH`). A longer walk (a larger ``ratio`` at the same
``bins``) takes the same first steps, so it keeps every range PyTorch's walk keeps and only
replaces it by a strictly better one (``RangeSearch(ratio=0.3)``: INT2 rows' best range is often
narrower than the 16% PyTorch's walk reaches). The stored rows are FBGEMM's rows: every loader, the
ONNX graphs and TorchRec's kernels serve them unchanged.

Conversion works chunk by chunk like the min/max quantizer (:func:`rowwise_quantize_packed_l2`),
in compiled kernels (:mod:`compress.quant.native`: 16 rows a vector, split over threads) where
they are available, else in the PyTorch reference (:func:`l2_params_reference`, the same values).
The walk costs about 65 evaluations of a row, so conversion takes several times the min/max
quantizer's time (``benchmarks/bench_quantize_pack.py`` prints the ratio).

**Table-wise.** :func:`tablewise_l2_scale`: DQRM's one symmetric scale per table, chosen for the
table's L2 error (values beyond the range clip) instead of from ``max|W|``.

Example::

    >>> w = torch.randn(1000, 16)
    >>> p, s, b = rowwise_quantize_packed_l2(w, 4, search=PYTORCH_SEARCH)  # PyTorch's bytes
    >>> p, s, b = rowwise_quantize_packed_l2(w, 4)  # then refined: no row's error is larger
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from compress.quant.fbgemm_rowwise import _NOT_FINITE, rowwise_codes_float
from compress.quant.packing import Chunks, check_bits, check_float_table, quantize_in_chunks

__all__ = [
    "DEFAULT_SEARCH",
    "PYTORCH_SEARCH",
    "RangeSearch",
    "fake_quantize_rowwise_l2_",
    "greedy_ranges",
    "l2_params",
    "l2_params_reference",
    "quant_loss",
    "refine_params",
    "rowwise_quantize_packed_l2",
    "stored_error",
    "stored_params",
    "tablewise_error",
    "tablewise_l2_scale",
]

#: A walk stops after at most ``bins * MAX_STEPS_PER_BIN`` steps: where float steps stop moving
#: the range (a step below the precision of the row's values), PyTorch's loop would not end. A
#: walk that moves takes ``bins * ratio + 1`` steps.
MAX_STEPS_PER_BIN = 4


@dataclass(frozen=True)
class RangeSearch:
    """Settings of the search: ``bins`` steps span the row's full range, and the walk goes on
    while the range is wider than ``int(bins * (1 - ratio))`` steps (``ratio`` is used as the
    float32 number nearest to it, as PyTorch casts it); then ``refine`` least-squares steps."""

    bins: int = 200
    ratio: float = 0.16
    refine: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.bins, int) and 1 <= self.bins <= 1 << 20):
            raise ValueError(f"bins must be an integer in [1, 2^20], got {self.bins!r}")
        if not 0.0 <= float(self.ratio) < 1.0:
            raise ValueError(f"ratio must lie in [0, 1), got {self.ratio!r}")
        if not (isinstance(self.refine, int) and 0 <= self.refine <= 100):
            raise ValueError(f"refine must be an integer in [0, 100], got {self.refine!r}")

    @property
    def ratio32(self) -> float:
        return float(np.float32(self.ratio))

    @property
    def min_bins(self) -> int:
        """``int(bins * (1 - float32(ratio)))``, computed in double as PyTorch does."""
        return int(self.bins * (1.0 - self.ratio32))


#: PyTorch's search (``nbins=200, ratio=0.16``), no refinement: the bytes of
#: ``embedding_bag_4bit_prepack(w, optimized_qparams=True)`` and ``_2bit_``.
PYTORCH_SEARCH = RangeSearch()
#: Least-squares steps after the walk (more change less than 0.1% of the error on trained tables).
REFINE_STEPS = 3
#: What ``ranges = "l2"`` runs: PyTorch's walk, then :data:`REFINE_STEPS` refinements, so that
#: every row's error is at most that of ``embedding_bag_*bit_prepack(w, optimized_qparams=True)``
#: (and of min/max). At INT2 a walk on down to 70% of the row's range (``ratio=0.3``) lowered
#: the error further but not the AUC (+0.0001 on ``benchmarks/bench_ranges_quality.py``'s case, for
#: 1.85x the time), so every width takes this one.
DEFAULT_SEARCH = RangeSearch(refine=REFINE_STEPS)


def _first_min(x: torch.Tensor) -> torch.Tensor:
    """Row minima ``[R]`` of ``[R, D]``, a zero minimum with the sign of the row's first minimal
    element (``std::min_element``, as PyTorch's search reads it)."""
    mn = x.amin(dim=1)
    rows = (mn == 0).nonzero().squeeze(1)
    if rows.numel():
        part = x.index_select(0, rows)
        first = (part == 0).to(torch.uint8).argmax(dim=1, keepdim=True)
        mn[rows] = part.gather(1, first).squeeze(1)
    return mn


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(torch.float32)


def quant_loss(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """The search's loss ``[R]`` of ranges ``lo``/``hi`` ``[R]`` for rows ``x`` ``[R, D]``: the L2
    norm of ``x`` minus its round trip at ``bias = fp16(lo)``, ``scale = fp16((hi - bias) /
    (2^bits - 1))`` (1 when ``hi - bias`` is 0; ``1/scale`` is 1 when the scale rounds to 0), summed
    over the columns in order in float32 (PyTorch's ``calculate_quant_loss``, value for value)."""
    qmax = float((1 << bits) - 1)
    bias = _fp16(lo)
    span = hi - bias
    scale = torch.where(span == 0, 1.0, _fp16(span / qmax))
    inv = torch.where(scale == 0, 1.0, torch.reciprocal(scale))
    norm = torch.zeros_like(lo)
    for j in range(x.shape[1]):
        col = x[:, j]
        q = torch.sub(col, bias).mul_(inv).clamp_(0.0, qmax).round_()
        d = col - q.mul_(scale).add_(bias)
        norm.add_(d.mul_(d))
    return norm.sqrt_()


def greedy_ranges(
    x: torch.Tensor, bits: int, search: RangeSearch = PYTORCH_SEARCH
) -> tuple[torch.Tensor, torch.Tensor]:
    """The greedy walk's range ``(lo, hi)`` (float32 ``[R]``) of every row of float32 ``x``
    ``[R, D]``, in PyTorch, all rows at once: PyTorch's ``choose_qparams_optimized`` row by row
    (``search.refine`` is not used here)."""
    bits = check_bits(bits)
    xmin, xmax = _first_min(x), x.amax(dim=1)
    step = (xmax - xmin) / float(search.bins)
    thr = float(search.min_bins) * step
    loss = quant_loss(x, xmin, xmax, bits)
    best, lo, hi = loss, xmin, xmax
    cur_min, cur_max, cur_loss = xmin, xmax, loss
    active = (cur_min + thr) < cur_max
    for _ in range(search.bins * MAX_STEPS_PER_BIN):
        if not bool(active.any()):
            break
        up, down = cur_min + step, cur_max - step
        loss1 = quant_loss(x, up, cur_max, bits)
        loss2 = quant_loss(x, cur_min, down, bits)
        local = active & (cur_loss < loss1) & (cur_loss < loss2) & (cur_loss < best)
        best = torch.where(local, cur_loss, best)
        lo = torch.where(local, cur_min, lo)
        hi = torch.where(local, cur_max, hi)
        left = loss1 < loss2
        cur_min = torch.where(active & left, up, cur_min)
        cur_max = torch.where(active & ~left, down, cur_max)
        cur_loss = torch.where(active, torch.where(left, loss1, loss2), cur_loss)
        active = active & ((cur_min + thr) < cur_max)
    return lo, hi


def stored_params(
    lo: torch.Tensor, hi: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """FBGEMM's stored ``(scale, bias)`` (float32 holding fp16 values) of row ranges ``[lo, hi]``:
    ``bias = fp16(lo)``, ``scale = fp16((hi - bias) / (2^bits - 1))``, 1 when the range or the
    rounded scale is 0 (:func:`compress.quant.fbgemm_rowwise.rowwise_quantize_packed`'s rule)."""
    qmax = float((1 << bits) - 1)
    bias = _fp16(lo)
    span = hi - bias
    scale = _fp16(torch.where(span == 0, 1.0, span / qmax))
    scale = torch.where(scale == 0, 1.0, scale)
    return scale, bias


def stored_error(
    x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The float64 squared error ``[R]`` of rows ``x`` stored at per-row ``scale``/``bias``
    (values ``q * scale + bias``, ``q = clamp(rint((x - bias) * (1/scale)), 0, 2^bits - 1)``), and
    the sums of ``q``, ``q^2`` and ``x * q``, each summed over the columns in order (as the
    compiled kernel sums them)."""
    qmax = float((1 << bits) - 1)
    inv = torch.reciprocal(scale)
    err, sq, sqq, sxq = (torch.zeros(x.shape[0], dtype=torch.float64) for _ in range(4))
    for j in range(x.shape[1]):
        col = x[:, j]
        q = torch.sub(col, bias).mul_(inv).clamp_(0.0, qmax).round_()
        d = col.double() - (q * scale + bias).double()
        err.add_(d * d)
        qd = q.double()
        sq.add_(qd)
        sqq.add_(qd * qd)
        sxq.add_(col.double() * qd)
    return err, sq, sqq, sxq


def refine_params(
    x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, bits: int, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` least-squares refinements of stored ``scale``/``bias`` (float32 ``[R]`` holding
    fp16 values) of rows ``x``, HQQ-style alternating minimization: for the codes at the current
    parameters, the scale and bias minimizing the squared error in closed form (float64), rounded
    to fp16, kept for a row only when its error (:func:`stored_error`) falls; a row stops at its
    first step that does not improve it. So no row's error grows."""
    n = float(x.shape[1])
    sx = torch.zeros(x.shape[0], dtype=torch.float64)
    for j in range(x.shape[1]):
        sx.add_(x[:, j].double())
    err, sq, sqq, sxq = stored_error(x, scale, bias, bits)
    live = torch.ones(x.shape[0], dtype=torch.bool)
    for _ in range(steps):
        den = n * sqq - sq * sq
        has = den > 0
        slope = torch.where(has, (n * sxq - sq * sx) / torch.where(has, den, 1.0), 0.0)
        icpt = (sx - slope * sq) / n
        cs, cb = _fp16(slope.float()), _fp16(icpt.float())
        inv = torch.reciprocal(cs)
        ok = live & has & (cs > 0) & torch.isfinite(cs) & torch.isfinite(cb) & torch.isfinite(inv)
        if not bool(ok.any()):
            break
        ns, nb = torch.where(ok, cs, scale), torch.where(ok, cb, bias)
        err2, sq2, sqq2, sxq2 = stored_error(x, ns, nb, bits)
        take = ok & (err2 < err)
        scale, bias = torch.where(take, ns, scale), torch.where(take, nb, bias)
        err, sq = torch.where(take, err2, err), torch.where(take, sq2, sq)
        sqq, sxq = torch.where(take, sqq2, sqq), torch.where(take, sxq2, sxq)
        live = take
        if not bool(live.any()):
            break
    return scale, bias


def l2_params_reference(
    x: torch.Tensor, bits: int, search: RangeSearch = PYTORCH_SEARCH
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row stored ``(scale, bias)`` (float32 ``[R]`` holding fp16 values) of float32 ``x``
    ``[R, D]``: :func:`greedy_ranges`, :func:`stored_params`, then :func:`refine_params`; in
    PyTorch, the reference of the compiled kernel (the same values)."""
    scale, bias = stored_params(*greedy_ranges(x, bits, search), bits)
    if search.refine:
        scale, bias = refine_params(x, scale, bias, bits, search.refine)
    return scale, bias


def l2_params(
    x: torch.Tensor, bits: int, search: RangeSearch | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`l2_params_reference` of float32 ``x`` ``[R, D]``, in the compiled kernels where they
    are available. ``search`` defaults to :data:`DEFAULT_SEARCH`.

    Raises:
        ValueError: a row holds a NaN or an inf.
    """
    from compress.quant import native  # (native imports fake_quant, which imports fbgemm_rowwise)

    bits = check_bits(bits)
    search = DEFAULT_SEARCH if search is None else search
    if x.dim() != 2 or x.dtype != torch.float32:
        raise ValueError(f"x must be float32 [rows, dim], got {x.dtype} {tuple(x.shape)}")
    if x.shape[0] == 0:
        return torch.empty(0), torch.empty(0)
    compiled = native.l2_params(x, bits, search.bins, search.ratio32, search.refine)
    if compiled is not None:
        return compiled
    finite = torch.isfinite(x).all(dim=1)
    if not bool(finite.all()):
        raise ValueError(f"row {int((~finite).nonzero()[0, 0])} holds a NaN or an infinite value")
    return l2_params_reference(x, bits, search)


def rowwise_quantize_packed_l2(
    w: torch.Tensor,
    bits: int,
    chunk: int | None = None,
    *,
    chunks: Chunks | None = None,
    search: RangeSearch | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a table row-wise with L2 ranges into packed codes and per-row fp16 scale and bias,
    one chunk of rows at a time: the same outputs, layout and memory bound as
    :func:`compress.quant.fbgemm_rowwise.rowwise_quantize_packed`, at each row's searched
    parameters instead of its min and max.

    With :data:`PYTORCH_SEARCH`, ``[packed][scale bytes][bias bytes]`` is byte for byte
    ``torch.ops.quantized.embedding_bag_4bit_prepack(w, optimized_qparams=True)`` (``_2bit_`` at
    2 bits).

    Args:
        w: ``[R, D]`` float tensor; ``D`` a positive multiple of ``8 // bits``.
        bits: 8, 4 or 2.
        chunk: rows per chunk; default :func:`compress.quant.packing.chunk_rows` of ``D``.
        chunks: where the rows come from (default: views of ``w``).
        search: the search's settings; default :data:`DEFAULT_SEARCH`.

    Returns:
        ``(packed [R, D*bits/8] uint8, scale [R] float16, bias [R] float16)``.

    Raises:
        ValueError: bad shape, dtype or bits, a row holding a NaN or an inf, or a row whose scale
            or bias is not a finite fp16 value.
    """
    from compress.quant import native

    rows, _ = check_float_table(w, bits)
    search = DEFAULT_SEARCH if search is None else search
    scale = torch.empty(rows, dtype=torch.float16)
    bias = torch.empty(rows, dtype=torch.float16)

    def compiled(x: torch.Tensor, out: torch.Tensor, where: slice) -> bool:
        params = native.l2_params(x, bits, search.bins, search.ratio32, search.refine)
        if params is None:
            return False
        bad = native.rowwise_quantize_params_into(x, bits, *params, out, scale[where], bias[where])
        if bad is not None and bad >= 0:
            raise ValueError(_NOT_FINITE)
        return bad is not None

    def codes(x: torch.Tensor, work: torch.Tensor, where: slice) -> torch.Tensor:
        s32, b32 = l2_params(x, bits, search)
        s16, b16 = s32.to(torch.float16), b32.to(torch.float16)
        if not bool(torch.isfinite(s16).all() and torch.isfinite(b16).all()):
            raise ValueError(_NOT_FINITE)
        scale[where] = s16
        bias[where] = b16
        return rowwise_codes_float(x, b32, torch.reciprocal(s32), bits, work)

    packed = quantize_in_chunks(w, bits, chunk, codes, compiled=compiled, chunks=chunks)
    return packed, scale, bias


def fake_quantize_rowwise_l2_(
    w: torch.Tensor, bits: int, search: RangeSearch | None = None
) -> torch.Tensor:
    """The round trip of float32 ``w`` ``[R, D]`` through :func:`rowwise_quantize_packed_l2`, in
    place (the QAT lookup of a ``ranges = "l2"`` table): a row's value depends on that row alone,
    so fake-quantizing gathered rows equals gathering from the converted table."""
    from compress.quant import native

    if w.shape[0] == 0:
        return w
    scale, bias = l2_params(w.detach(), bits, search)
    if native.fake_quantize_rowwise_params_(w, bits, scale, bias):
        return w
    rowwise_codes_float(w, bias, torch.reciprocal(scale), bits, w)
    return w.mul_(scale.unsqueeze(1)).add_(bias.unsqueeze(1))


# --------------------------------------------------------------------------------------------------
# Table-wise: one symmetric scale per table (DQRM's format), chosen for the table's L2 error


#: Candidate scales of :func:`tablewise_l2_scale`: ``max|W| / (2^(b-1) - 1)`` times factors from
#: 1 down to ``1 / TABLE_SHRINK``, geometrically spaced.
TABLE_CANDIDATES = 256
TABLE_SHRINK = 64.0


def _histogram_bins(bits: int) -> int:
    """Bins over ``[-max|W|, max|W|]``: 512 per quantization step at the max|W| scale."""
    return 1 << (check_bits(bits) + 9)


def tablewise_error(chunks: Chunks, scale: float, bits: int) -> float:
    """Squared error (float64) of a table stored table-wise at ``scale``: the sum over every
    value of ``(w - clamp(rint(w / s), -2^(b-1), 2^(b-1) - 1) * s)^2``, chunk by chunk."""
    from compress.quant.tablewise import symmetric_range

    lo, hi = symmetric_range(bits)
    total = 0.0
    for _, _, x in chunks:
        x = x.to(torch.float32)
        q = torch.div(x, scale).round_().clamp_(lo, hi).mul_(scale)
        total += float(torch.sub(x, q).double().square_().sum())
    return total


def tablewise_l2_scale(read: Callable[[], Chunks], bits: int) -> float:
    """A table-wise scale (an fp16 value, as :func:`compress.quant.tablewise.table_scale`'s) that
    minimizes the table's L2 error instead of never clipping: codes beyond the range clip.

    Three passes over the table's chunks (``read()`` gives them anew each time): ``max|W|``, then
    a histogram of the values (``2^(bits+9)`` bins over ``[-max|W|, max|W|]``), on which the
    error of :data:`TABLE_CANDIDATES` scales from ``max|W| / (2^(b-1) - 1)`` down to
    ``1 / TABLE_SHRINK`` of it is estimated (each bin's values at its centre); then the exact error
    of the best candidate is compared with the exact error of the max|W| scale, and the smaller
    one wins. So the table's error is never above DQRM's max|W| rule.

    Raises:
        ValueError: the table holds inf or NaN, or its scale exceeds the fp16 range.
    """
    from compress.quant.tablewise import chunks_absmax, scale_from_absmax, symmetric_range

    bits = check_bits(bits)
    amax = chunks_absmax(read())
    base = scale_from_absmax(amax, bits)  # raises for inf/NaN and beyond fp16
    if amax == 0.0:
        return base
    nbins = _histogram_bins(bits)
    counts = torch.zeros(nbins, dtype=torch.int64)
    width = 2.0 * amax / nbins
    for _, _, x in read():
        idx = torch.add(x.reshape(-1).to(torch.float64), amax).div_(width).floor_()
        counts += torch.bincount(idx.clamp_(0, nbins - 1).to(torch.int64), minlength=nbins)
    centres = -amax + (torch.arange(nbins, dtype=torch.float64) + 0.5) * width
    factors = torch.logspace(0.0, -np.log10(TABLE_SHRINK), TABLE_CANDIDATES, dtype=torch.float64)
    candidates = _fp16_scales(base * factors)
    lo, hi = symmetric_range(bits)
    weight = counts.to(torch.float64)
    errors = torch.empty(candidates.numel(), dtype=torch.float64)
    block = max(1, (1 << 21) // nbins)  # candidates a step: [block, bins] float64 temporaries
    for start in range(0, candidates.numel(), block):
        s = candidates[start : start + block, None]
        q = torch.div(centres, s).round_().clamp_(lo, hi).mul_(s)
        errors[start : start + block] = (q.sub_(centres).square_() * weight).sum(dim=1)
    best = float(candidates[int(torch.argmin(errors))])
    if best == base:
        return base
    return (
        best if tablewise_error(read(), best, bits) < tablewise_error(read(), base, bits) else base
    )


def _fp16_scales(values: torch.Tensor) -> torch.Tensor:
    """``values`` (float64, positive) rounded to fp16 values, at least the smallest positive fp16
    (``2^-24``), as float64."""
    rounded = values.to(torch.float16).to(torch.float64)
    return rounded.clamp_(min=2.0**-24)
