"""Data-parallel fine-tuning (``--nproc``): bytes per step against a dense FP32 all-reduce and the
INT8 floor, step time with 1 and 2 workers at the same global batch, the INT8 against the FP32
exchange, per-row against per-table (DQRM) INT8 gradient scales; with ``--quality``, AUC on the
demo for one process and for 2 workers with FP32 and INT8 exchange.

    flock /tmp/bigmem.lock .venv/bin/python benchmarks/bench_distributed.py --shape kaggle
    .venv/bin/python benchmarks/bench_distributed.py --quality        # needs `make demo`

The Kaggle shape is the DQRM paper's model (26 tables, 2.16 GB, random weights, 25% zero rows:
``benchmarks/bench_scale.py``'s checkpoint in ``benchmarks/.cache``, written once and kept), fine-
tuned as ``int4_qat`` does (table-wise INT4 QAT, INT4 MLPs, SGD) at global batch 2048 on synthetic
Zipf-distributed ids (exponent 1.05 over each table's rows). Each configuration runs in fresh
processes: one process with all CPU threads (and, for reference, with one), or W workers with
CPUs / W threads each, launched with the environment torchrun gives (gloo). Step time is the
median over the steps after the warm-up, the best of ``--rounds`` interleaved runs (timings on a
busy machine are rough: OpenMP threads of a process suffer most when the CPUs are oversubscribed);
bytes are what the workers handed to their collectives (``--json``'s ``distributed``).

Per-row vs per-table scales: one global batch's summed sparse gradients of every table, coded to
INT8 with a scale per row or one per table, against the FP32 gradient: relative L2 error, and the
share of touched rows whose gradient becomes all zero.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = """
name = "bench_dp"
[[tables]]
match = ["*"]
method = "qat"
bits = 4
granularity = "table"
scale_refresh = 200
[mlp]
method = "qat"
bits = 4
[finetune]
steps = {steps}
batch_size = {batch}
optimizer = "sgd"
lr_embedding = 0.3
lr_dense = 0.0005
keep_best = false
embedding_grad_bits = {ebits}
mlp_grad_bits = {mbits}
"""


# --------------------------------------------------------------------------------------------------
# Worker: one process of a configuration
# --------------------------------------------------------------------------------------------------


def worker(job_path: str) -> None:
    import torch

    from compress import pipeline
    from compress.data.npz import load_npz
    from compress.methods.apply_plan import prepare_model
    from compress.train.distributed import context
    from compress.train.distributed.data_parallel import DataParallel
    from compress.train.loop import bce_loss, fit

    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job["threads"])
    loaded = pipeline.load(job["checkpoint"])
    plan = pipeline.plan(loaded, job["recipe"])
    model, _ = prepare_model(loaded.module, loaded.spec, plan, None)
    names = loaded.spec.feature_names
    train = load_npz(job["data"])
    ctx = context.start("cpu") if context.launched() else None
    workers = DataParallel(ctx, plan.recipe.finetune) if ctx is not None else None
    starts: list[float] = []

    def timed_loss(m, batch):
        starts.append(time.perf_counter())
        return bce_loss(m, batch)

    result = fit(model, train, None, names, plan.recipe.finetune, loss_fn=timed_loss,
                 distributed=workers)  # fmt: skip
    steps = [b - a for a, b in zip(starts, starts[1:], strict=False)][job["warmup"] :]
    out = {
        "step_seconds": statistics.median(steps),
        "step_seconds_min": min(steps),
        "steps_timed": len(steps),
        "distributed": result.distributed,
        "communication_per_step": result.communication / max(1, result.steps),
        "peak_rss": _peak_rss(),
    }
    if ctx is None:
        out["scales"] = gradient_scale_errors(model, train, names, job["batch"])
    if ctx is None or ctx.is_main:
        Path(job["out"]).write_text(json.dumps(out))
    context.stop()


def gradient_scale_errors(model, train, names, batch: int) -> dict:
    """Per-row vs per-table INT8 error of one global batch's summed sparse gradients."""
    import torch

    from compress.train.distributed.grad_codec import (
        coalesce,
        dequantize_rows,
        quantize_rows,
        quantize_table,
    )
    from compress.train.loop import bce_loss, split_parameters

    model.train()
    idx = torch.arange(batch).numpy()
    emb, dense = split_parameters(model)
    for p in emb + dense:
        p.grad = None
    bce_loss(model, train.take(idx).to_batch(names)).backward()
    num = {"row": 0.0, "table": 0.0}
    zeroed = {"row": 0, "table": 0}
    norm, rows = 0.0, 0
    for p in emb:
        if p.grad is None or not p.grad.is_sparse:
            continue
        _, values = coalesce(p.grad)
        values = values.reshape(values.shape[0], -1)
        per_row = dequantize_rows(*quantize_rows(values))
        codes, scale = quantize_table(values)
        per_table = codes.float() * scale
        norm += float(values.pow(2).sum())
        rows += values.shape[0]
        for kind, back in (("row", per_row), ("table", per_table)):
            num[kind] += float((back - values).pow(2).sum())
            zeroed[kind] += int(((back == 0).all(dim=1) & (values != 0).any(dim=1)).sum())
    return {
        "rows": rows,
        "rel_error": {k: (v / norm) ** 0.5 for k, v in num.items()},
        "zeroed_rows": {k: v / max(1, rows) for k, v in zeroed.items()},
    }


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    return 0


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def zipf_ids(rows: int, n: int, rng, exponent: float = 1.05):
    """``n`` ids of a table of ``rows`` rows, Zipf-like over popularity ranks, hashed to ids."""
    import numpy as np

    u = rng.random(n)
    top = float(rows + 1) ** (1.0 - exponent)
    rank = np.floor((1.0 + u * (top - 1.0)) ** (1.0 / (1.0 - exponent))).astype(np.int64) - 1
    rank = np.clip(rank, 0, rows - 1)
    return (rank * 2654435761 + 97) % rows


def ensure_data(spec, n: int, path: Path) -> Path:
    import numpy as np

    from compress.data.dataset import Dataset
    from compress.data.npz import save_npz

    if path.exists():
        return path
    rng = np.random.default_rng(7)
    values = {
        f: zipf_ids(spec.table_of_feature(f).num_embeddings, n, rng) for f in spec.feature_names
    }
    offsets = np.arange(n + 1, dtype=np.int64)
    data = Dataset(
        dense=rng.standard_normal((n, spec.dense_in_features), dtype=np.float32),
        labels=(rng.random(n) < 0.25).astype(np.float32),
        values=values,
        offsets={f: offsets for f in spec.feature_names},
    )
    save_npz(data, path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(
    world: int, ebits: int, mbits: int, threads: int, args, ckpt: Path, data: Path, work: Path
) -> dict:
    name = f"w{world}_e{ebits}_m{mbits}_t{threads}"
    recipe = work / f"{name}.toml"
    steps = args.warmup + args.steps + 1
    recipe.write_text(RECIPE.format(steps=steps, batch=args.batch, ebits=ebits, mbits=mbits))
    out = work / f"{name}.json"
    job = {
        "checkpoint": str(ckpt),
        "recipe": str(recipe),
        "data": str(data),
        "warmup": args.warmup,
        "threads": threads,
        "batch": args.batch,
        "out": str(out),
    }
    job_path = work / f"job_{name}.json"
    job_path.write_text(json.dumps(job))
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
        if world > 1:
            env |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}
            env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = [sys.executable, __file__, "--worker", str(job_path)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT))
    codes = [p.wait(timeout=args.timeout) for p in procs]
    if codes != [0] * world:
        raise SystemExit(f"workers of {name} ended with {codes}")
    return json.loads(out.read_text())


def speed(args) -> None:
    from benchmarks.bench_scale import SHAPES, ensure_checkpoint
    from benchmarks.common import cache_dir

    shape = SHAPES[args.shape]
    ckpt = ensure_checkpoint(args.shape, 0.25)
    rows = args.batch * (args.warmup + args.steps + 2)
    data = ensure_data(shape, rows, cache_dir() / f"dist_{args.shape}_{rows}.npz")
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".dist-") as tmp:
        work = Path(tmp)
        cpus = os.cpu_count() or 1
        configs = [(1, 32, 32, cpus), (1, 32, 32, 1)]
        configs += [(2, e, m, max(1, cpus // 2)) for e, m in ((32, 32), (8, 32), (8, 8))]
        configs += [(w, 8, 8, max(1, cpus // w)) for w in args.also_world]
        results = {}
        for round_ in range(args.rounds):  # rounds interleave the configurations (load drifts)
            for world, ebits, mbits, threads in configs:
                print(
                    f"round {round_ + 1}: {world} process(es) x {threads} thread(s), exchange "
                    f"E{ebits}/M{mbits} ...",
                    flush=True,
                )
                r = run_config(world, ebits, mbits, threads, args, ckpt, data, work)
                best = results.get((world, ebits, mbits, threads))
                if best is None or r["step_seconds"] < best["step_seconds"]:
                    results[(world, ebits, mbits, threads)] = r
    one = results[(1, 32, 32, cpus)]["step_seconds"]
    print(
        f"\n{args.shape}: tables {sum(t.num_embeddings for t in shape.tables):,} rows x dim "
        f"{shape.tables[0].embedding_dim}; global batch {args.batch}; "
        f"{args.steps} timed steps after {args.warmup}"
    )
    print(
        f"{'workers':>7} {'thr':>4} {'E/M':>6} {'step ms':>8} {'vs 1':>6} {'comm ms':>8} {'emb ms':>7} "
        f"{'KB/step':>9} "
        f"{'floor KB':>9} {'/floor':>7} {'dense MB':>9} {'dense/sent':>11} {'peak GB':>8}"
    )
    for (world, ebits, mbits, threads), r in results.items():
        d = r["distributed"] or {}
        sent = d.get("bytes_per_step")
        bits = f"{ebits}/{mbits}" if world > 1 else "-"
        print(
            f"{world:>7} {threads:>4} {bits:>6} {r['step_seconds'] * 1e3:>8.1f} "
            f"{r['step_seconds'] / one:>6.2f} {r['communication_per_step'] * 1e3:>8.1f} "
            f"{_num(_per_step(d, 'embedding'), 1e-3, 7)} "
            f"{_num(sent, 1e3, 9)} {_num(d.get('floor_bytes_per_step'), 1e3, 9)} "
            f"{_num(d.get('vs_floor'), 1, 7, '.3f')} {_num(d.get('dense_bytes_per_step'), 1e6, 9)} "
            f"{_num(d.get('dense_over_sent'), 1, 11, ',.0f')} {r['peak_rss'] / 1e9:>8.2f}"
        )
    s = results[(1, 32, 32, cpus)]["scales"]
    print(
        f"\nINT8 gradient scales on one global batch ({s['rows']:,} touched rows): relative L2 "
        f"error per row {s['rel_error']['row']:.4f}, per table (DQRM) {s['rel_error']['table']:.4f}; "
        f"touched rows coded all-zero: per row {s['zeroed_rows']['row']:.2%}, per table "
        f"{s['zeroed_rows']['table']:.2%}"
    )


def _per_step(d: dict, part: str) -> float | None:
    """Seconds per step of one part of the exchange (``None`` for a single process)."""
    if not d:
        return None
    return d["seconds_by_part"][part] / max(1, d["steps"])


def _num(value, scale: float, width: int, fmt: str = ".1f") -> str:
    return f"{'-':>{width}}" if value is None else f"{value / scale:>{width}{fmt}}"


def quality(args) -> None:
    """AUC of the demo's int4_qat run: one process, 2 workers FP32, 2 workers INT8 exchange."""
    demo = ROOT / "demo"
    if not (demo / "dlrm.pt").exists():
        raise SystemExit("no demo: run `make demo` first")
    rows = []
    with tempfile.TemporaryDirectory(prefix="dqrm-dist-") as tmp:
        for label, nproc, bits in (("1 process", 1, 32), ("2 workers", 2, 32), ("2 workers", 2, 8)):
            recipe = Path(tmp) / f"q{bits}.toml"
            text = (ROOT / "recipes" / "int4_qat.toml").read_text()
            recipe.write_text(text + f"embedding_grad_bits = {bits}\nmlp_grad_bits = {bits}\n")
            out = Path(tmp) / f"out{nproc}_{bits}"
            cmd = [sys.executable, "-m", "compress", "--no-progress", "--recipe", str(recipe)]
            cmd += [str(demo / "dlrm.pt"), "--data", str(demo / "train.npz")]
            cmd += ["--valid", str(demo / "valid.npz"), "--out", str(out), "--json"]
            cmd += ["--nproc", str(nproc)]
            start = time.perf_counter()
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(done.stderr[-2000:])
            report = json.loads(done.stdout)
            rows.append((label, nproc, bits, report, time.perf_counter() - start))
    base = rows[0][3]["metrics"]["compressed"]["auc"]
    print("\ndemo, int4_qat (one epoch, batch 2048), AUC on the report slice")
    print(f"{'run':<12}{'bits':>6}{'AUC':>9}{'vs 1 proc':>11}{'finetune s':>12}{'KB/step':>9}")
    for label, nproc, bits, r, _wall in rows:
        d = r["distributed"] or {}
        auc = r["metrics"]["compressed"]["auc"]
        print(
            f"{label:<12}{bits if nproc > 1 else '-':>6}{auc:>9.4f}{auc - base:>+11.4f}"
            f"{r['timings'].get('finetune', 0):>12.1f}{_num(d.get('bytes_per_step'), 1e3, 9)}"
        )


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="kaggle", help="kaggle | kaggle_1pct | terabyte")
    ap.add_argument("--batch", type=int, default=2048, help="global batch")
    ap.add_argument("--steps", type=int, default=30, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="steps not timed")
    ap.add_argument(
        "--also-world", type=int, action="append", default=[], help="more INT8 runs (e.g. 4)"
    )
    ap.add_argument("--quality", action="store_true", help="only the demo AUC comparison")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    ap.add_argument("--rounds", type=int, default=1, help="runs of each configuration (best kept)")
    args = ap.parse_args()
    if args.quality:
        quality(args)
        return
    speed(args)


if __name__ == "__main__":
    main()
