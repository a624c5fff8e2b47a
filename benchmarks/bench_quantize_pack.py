"""Benchmark: row-wise INT4 quantize+pack of a big table, FBGEMM's op vs ``quantize_rows_chunked``.

Quantizes a ``rows x dim`` float32 table (default 2M x 16) into FBGEMM fused rows with
``torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf`` and with
:func:`compress.quant.math.quantize_rows_chunked` (writing into a preallocated buffer), prints
throughput in GB/s of float32 input and the ratio ours/FBGEMM, and asserts the bytes are equal.

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

from compress.quant.math import quantize_rows_chunked, rowwise_bytes  # noqa: E402


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--bits", type=int, default=4, choices=(8, 4, 2))
    parser.add_argument("--chunk-rows", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(args.rows, args.dim, generator=gen)
    gb = w.numel() * 4 / 1e9
    out = torch.empty(args.rows, rowwise_bytes(1, args.dim, args.bits), dtype=torch.uint8)

    ref = torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(w, args.bits)
    quantize_rows_chunked(w, args.bits, out=out, chunk_rows=args.chunk_rows)
    assert torch.equal(ref, out), "quantize_rows_chunked differs from FBGEMM"

    t_fbgemm = _best_of(
        lambda: torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(w, args.bits), args.repeats
    )
    t_ours = _best_of(
        lambda: quantize_rows_chunked(w, args.bits, out=out, chunk_rows=args.chunk_rows),
        args.repeats,
    )
    assert torch.equal(ref, out)

    print(
        f"{args.rows} x {args.dim} float32 -> INT{args.bits} rows ({gb:.3f} GB in), "
        f"torch threads {torch.get_num_threads()}"
    )
    print(
        f"FBGEMM FloatToFusedNBitRowwiseQuantizedSBHalf: {t_fbgemm * 1e3:8.1f} ms "
        f"{gb / t_fbgemm:6.2f} GB/s"
    )
    print(
        f"quantize_rows_chunked (preallocated out):      {t_ours * 1e3:8.1f} ms "
        f"{gb / t_ours:6.2f} GB/s"
    )
    print(f"ratio ours/FBGEMM throughput: {t_fbgemm / t_ours:.2f}x; bytes equal: True")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
