"""Benchmark: converting a big table to packed row-wise INT4, FBGEMM's op vs the convert path.

Quantizes a ``rows x dim`` float32 table (default 2M x 16) with
``torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf`` and with
:func:`compress.quant.fbgemm_rowwise.rowwise_quantize_packed`, the function convert calls for
every row-wise table with min/max ranges (default chunk), asserts the bytes are equal, and prints
throughput in GB/s of float32 input, the ratio ours/FBGEMM, and each one's peak memory beyond the
input table (measured in fresh processes).

Then the same table with L2 ranges (:func:`compress.quant.l2_ranges.rowwise_quantize_packed_l2`,
what ``ranges = "l2"`` converts with): PyTorch's search (bytes checked against
``torch.ops.quantized.embedding_bag_{4,2}bit_prepack(optimized_qparams=True)`` on the first rows,
and that op's own speed on them) and the default search of ``ranges = "l2"`` at these bits, each
as a time ratio to the min/max quantizer.

Run: ``.venv/bin/python benchmarks/bench_quantize_pack.py [--rows N] [--dim D] [--bits B]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fbgemm_gpu  # noqa: E402,F401  (registers torch.ops.fbgemm)

from benchmarks.common import python_child  # noqa: E402
from compress.quant.fbgemm_rowwise import rowwise_quantize_packed  # noqa: E402
from compress.quant.l2_ranges import (  # noqa: E402
    DEFAULT_SEARCH,
    PYTORCH_SEARCH,
    rowwise_quantize_packed_l2,
)

#: Rows checked against (and timed with) PyTorch's prepack op, which runs at about 10 MB/s.
PREPACK_ROWS = 20_000

_CHILD = """
import sys
sys.path.insert(0, {root!r})
import torch, fbgemm_gpu
from compress.quant.fbgemm_rowwise import rowwise_quantize_packed
w = torch.randn({rows}, {dim}, generator=torch.Generator().manual_seed(0))
{call}
"""
CALLS = {
    "table only": "pass",
    "fbgemm": "torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(w, {bits})",
    "ours": "rowwise_quantize_packed(w, {bits})",
}


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _fused(packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """FBGEMM's fused rows ``[packed][fp16 scale][fp16 bias]`` of the three stored parts."""
    parts = (packed, scale.view(torch.uint8).view(-1, 2), bias.view(torch.uint8).view(-1, 2))
    return torch.cat(parts, dim=1)


def _peaks(rows: int, dim: int, bits: int) -> dict[str, int]:
    root = str(Path(__file__).resolve().parents[1])
    return {
        name: python_child(
            _CHILD.format(root=root, rows=rows, dim=dim, call=call.format(bits=bits))
        )[1]
        for name, call in CALLS.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--bits", type=int, default=4, choices=(8, 4, 2))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(args.rows, args.dim, generator=gen)
    gb = w.numel() * 4 / 1e9

    ref = torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(w, args.bits)
    assert torch.equal(ref, _fused(*rowwise_quantize_packed(w, args.bits))), "differs from FBGEMM"

    t_fbgemm = _best_of(
        lambda: torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(w, args.bits), args.repeats
    )
    t_ours = _best_of(lambda: rowwise_quantize_packed(w, args.bits), args.repeats)
    peaks = _peaks(args.rows, args.dim, args.bits)
    extra = {k: (v - peaks["table only"]) / 1e6 for k, v in peaks.items() if k != "table only"}

    print(
        f"{args.rows} x {args.dim} float32 -> INT{args.bits} rows ({gb:.3f} GB in), "
        f"torch threads {torch.get_num_threads()}"
    )
    print(
        f"FBGEMM FloatToFusedNBitRowwiseQuantizedSBHalf: {t_fbgemm * 1e3:8.1f} ms "
        f"{gb / t_fbgemm:6.2f} GB/s  peak beyond the table {extra['fbgemm']:7.1f} MB"
    )
    print(
        f"rowwise_quantize_packed (convert path):        {t_ours * 1e3:8.1f} ms "
        f"{gb / t_ours:6.2f} GB/s  peak beyond the table {extra['ours']:7.1f} MB"
    )
    print(f"ratio ours/FBGEMM throughput: {t_fbgemm / t_ours:.2f}x; bytes equal: True")
    if args.bits in (4, 2):
        _l2_lines(w, args.bits, args.repeats, t_ours, gb)
    return 0


def _l2_lines(w: torch.Tensor, bits: int, repeats: int, t_minmax: float, gb: float) -> None:
    """The L2-range lines: bytes against PyTorch's prepack op, times against min/max."""
    prepack = getattr(torch.ops.quantized, f"embedding_bag_{bits}bit_prepack")
    head = w[:PREPACK_ROWS]
    t_op = _best_of(lambda: prepack(head, optimized_qparams=True), 1) * w.shape[0] / head.shape[0]
    same = torch.equal(
        prepack(head, optimized_qparams=True),
        _fused(*rowwise_quantize_packed_l2(head, bits, search=PYTORCH_SEARCH)),
    )
    assert same, "PyTorch's search differs from embedding_bag_prepack"
    t_torch = _best_of(lambda: rowwise_quantize_packed_l2(w, bits, search=PYTORCH_SEARCH), repeats)
    t_l2 = _best_of(lambda: rowwise_quantize_packed_l2(w, bits), repeats)
    print(
        f"L2 ranges, PyTorch's search (nbins=200, ratio=0.16): {t_torch * 1e3:8.1f} ms "
        f"{gb / t_torch:6.2f} GB/s  (embedding_bag_{bits}bit_prepack: {gb / t_op:.3f} GB/s, "
        f"bytes equal on {head.shape[0]:,} rows: True)"
    )
    print(
        f'L2 ranges, ranges = "l2" ({DEFAULT_SEARCH}): {t_l2 * 1e3:8.1f} ms {gb / t_l2:6.2f} GB/s'
    )
    print(
        f"ratio L2/min-max time: {t_torch / t_minmax:.1f}x (PyTorch's search), "
        f'{t_l2 / t_minmax:.1f}x (ranges = "l2"); PyTorch\'s op: {t_op / t_minmax:.0f}x'
    )


if __name__ == "__main__":
    raise SystemExit(main())
