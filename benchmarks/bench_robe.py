"""Benchmark: ROBE-Z shared array vs the FP32 ``nn.EmbeddingBag(sparse=True)`` tables it replaces.

Four tables of ``rows x dim`` (default 1M x 16), batch 2048, one id a bag (uniform ids). For the
plain tables and for a :class:`compress.methods.robe.module.RobeEmbeddingBagCollection` at 100x and 1000x
compression, measures

- a training step: forward + backward + ``torch.optim.Adagrad`` step (sparse gradients),
- lookup throughput: forward under ``torch.no_grad`` in million ids per second,

and prints each as a ratio to the plain tables (time ratio > 1: ROBE is slower). ``dense-g`` rows
use dense gradients for the (small) shared array (``sparse=False``) instead of sparse ones. Median of
``--steps`` timed runs after warm-up, the variants timed round-robin. Runs in well under a minute on
2 cores; pass ``--threads 1`` when other processes load the cores.

Run: ``.venv/bin/python benchmarks/bench_robe.py [--rows N] [--dim D] [--batch B] [--steps S]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

from compress.io.model_spec import TableSpec  # noqa: E402
from compress.methods.robe.module import RobeConfig, RobeEmbeddingBagCollection  # noqa: E402

N_TABLES = 4


class PlainTables(nn.Module):
    """The baseline: one FP32 ``nn.EmbeddingBag(sparse=True)`` a feature, outputs concatenated."""

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.bags = nn.ModuleList(
            nn.EmbeddingBag(rows, dim, mode="sum", sparse=True, include_last_offset=True)
            for _ in range(N_TABLES)
        )

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        feats = kjt.to_dict()
        return torch.cat(
            [
                bag(feats[f].values(), feats[f].offsets())
                for bag, f in zip(self.bags, kjt.keys(), strict=True)
            ],
            dim=1,
        )


class RobeTables(nn.Module):
    """The ROBE module with the same ``[B, F * D]`` tensor output as :class:`PlainTables`."""

    def __init__(
        self, rows: int, dim: int, compression: float, block_size: int, sparse: bool = True
    ) -> None:
        super().__init__()
        specs = [TableSpec(f"t{i}", rows, dim, (f"f{i}",)) for i in range(N_TABLES)]
        config = RobeConfig.for_tables(specs, block_size=block_size, compression=compression)
        self.robe = RobeEmbeddingBagCollection(specs, config, sparse=sparse)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.robe(kjt).values()


def make_batches(rows: int, batch: int, count: int) -> list[KeyedJaggedTensor]:
    g = torch.Generator().manual_seed(0)
    return [
        KeyedJaggedTensor.from_lengths_sync(
            keys=[f"f{i}" for i in range(N_TABLES)],
            values=torch.randint(0, rows, (N_TABLES * batch,), generator=g),
            lengths=torch.ones(N_TABLES * batch, dtype=torch.int64),
        )
        for _ in range(count)
    ]


class Variant:
    """One module under test with its Adagrad optimizer and the times measured so far (ms)."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        self.opt = torch.optim.Adagrad(module.parameters(), lr=0.01)
        self.step_ms: list[float] = []
        self.lookup_ms: list[float] = []

    @property
    def megabytes(self) -> float:
        return sum(p.numel() * p.element_size() for p in self.module.parameters()) / 1e6

    def train_step(self, kjt: KeyedJaggedTensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.module(kjt).pow(2).sum().backward()
        self.opt.step()

    def lookup(self, kjt: KeyedJaggedTensor) -> None:
        with torch.no_grad():
            self.module(kjt)


def timed_ms(fn: Callable[[KeyedJaggedTensor], None], kjt: KeyedJaggedTensor) -> float:
    t0 = time.perf_counter()
    fn(kjt)
    return 1000 * (time.perf_counter() - t0)


def run(variants: list[Variant], batches: list[KeyedJaggedTensor], steps: int) -> None:
    """Warm up, then time the variants round-robin (a burst of load hits all of them alike)."""
    for v in variants:
        for kjt in batches[:3]:
            v.train_step(kjt)
            v.lookup(kjt)
    for i in range(steps):
        kjt = batches[i % len(batches)]
        for v in variants:
            v.step_ms.append(timed_ms(v.train_step, kjt))
            v.lookup_ms.append(timed_ms(v.lookup, kjt))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default); 1 is steadier "
        "when other processes share the cores (OpenMP waits for a busy core on every op)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Sparse invariant checks")

    batches = make_batches(args.rows, args.batch, 8)
    ids = N_TABLES * args.batch
    print(
        f"{N_TABLES} tables x {args.rows} rows x {args.dim} dims, batch {args.batch}, one id a "
        f"bag, {torch.get_num_threads()} threads, Z={args.block_size}"
    )
    torch.manual_seed(0)
    variants = [Variant("fp32 EmbeddingBag", PlainTables(args.rows, args.dim))]
    for c in (100, 1000):
        variants.append(Variant(f"robe {c}x", RobeTables(args.rows, args.dim, c, args.block_size)))
    for c in (100, 1000):
        dense = RobeTables(args.rows, args.dim, c, args.block_size, sparse=False)
        variants.append(Variant(f"robe {c}x dense-g", dense))
    run(variants, batches, args.steps)

    base_step = statistics.median(variants[0].step_ms)
    base_lookup = statistics.median(variants[0].lookup_ms)
    header = f"{'variant':<18} {'MB':>8} {'step ms':>8} {'x base':>7} {'lookup ms':>9} "
    print(header + f"{'Mids/s':>7} {'x base':>7}")
    for v in variants:
        t_step, t_lookup = statistics.median(v.step_ms), statistics.median(v.lookup_ms)
        print(
            f"{v.name:<18} {v.megabytes:8.1f} {t_step:8.2f} {t_step / base_step:7.2f} "
            f"{t_lookup:9.2f} {ids / t_lookup / 1000:7.1f} {t_lookup / base_lookup:7.2f}"
        )
    print("x base: time relative to the fp32 tables (> 1: slower); Mids/s: lookup throughput;")
    print("dense-g: dense gradient for the shared array (sparse=False), same forward")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
