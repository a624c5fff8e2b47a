"""Benchmark: serving a compressed DLRM with ONNX Runtime vs TorchRec/FBGEMM vs FP32 PyTorch.

A Criteo-Kaggle-shaped DLRM scaled to fit: 26 tables of dim 16 with the Kaggle row counts capped at
``--max-rows`` (default 1M: the six largest tables get 1M rows, 5.4M rows in all), bottom MLP
13-512-256-64-16, top MLP 367-512-256-1. Batches of ``--batch`` (2048) samples; ``--multi-hot``
features (default 8) hold bags of 1..5 ids (mean 3), the others one id; ids uniform.

The model is compressed with INT4 row-wise tables (FBGEMM's format) and INT4 per-channel MLPs and
written as an artifact directory with its ONNX graphs (parity is checked while writing). Timed:

* ``ort int4 (mlp int4)``: ``model.onnx`` from the artifacts (what ``Predictor`` serves).
* ``ort int4 (mlp fp32)``: the same tables, MLPs as float32 ``MatMul`` (built in memory).
* ``torchrec fbgemm int4``: TorchRec's quantized ``EmbeddingBagCollection`` (FBGEMM INT4 kernels,
  built from the artifacts) inside the TorchRec DLRM with float32 PyTorch MLPs.
* ``pytorch fp32``: the original TorchRec DLRM.

plus the same split in two parts (embedding lookups + pooling alone; dense+interaction+over alone),
so it is clear where the time goes. Two ways of serving a 2-core machine are timed:

* *Latency* (one stream): one process runs one batch at a time with ``--threads`` intra-op threads
  (torch and ORT alike, ORT with worker spinning off); variants are timed round-robin with a pause
  between them (ORT's idle workers otherwise spin on, slowing the next variant: see
  ``session.intra_op.allow_spinning`` in ONNX Runtime's threading docs,
  https://onnxruntime.ai/docs/performance/tune-performance/threading.html) and the median time
  per batch is reported as samples/s.
* *Throughput* (``--streams`` processes at once, ``--stream-threads`` threads each; default 2 x 1):
  every process rebuilds the same seeded models and batches (``spawn``, nothing inherited), then
  all run ``--stream-per-round`` batches of one variant together; a round's samples/s is all
  their samples over the slowest process's time, and the variants take turns within each round.
  This is how a CPU server gets the most samples/s out of its cores, for PyTorch as well: its FP32
  model serves 128-138k samples/s this way against 117-128k with one 2-thread stream.

The export gets the features that are one-hot in the benchmark's data as a layout hint (what the
pipeline finds in ``--data``): they are looked up apart from the multi-hot ones.

Measured 2026-11-22 (2 vCPUs, ORT 1.31, torch 2.13; ratios from the same run, ``--rounds 8``;
8 multi-hot features unless said):

* Throughput (2 processes x 1 thread), ORT INT4 vs PyTorch FP32: 1.03-1.06x over 7 runs (ORT
  134-144k samples/s; round by round 0.90-1.38x, 48 of 56 rounds above 1); vs TorchRec FBGEMM
  INT4: 1.01-1.07x. One-hot bags (``--multi-hot 0``): 1.14x and 1.12x.
* Latency (1 process x 2 threads), ORT INT4 vs PyTorch FP32: 0.98-1.07x over 16 runs (a tie;
  median ~1.02x), 1 thread 1.09x, one-hot bags 1.18x; vs FBGEMM: 0.97-1.26x.

Per batch at 2 threads: ~16-17 ms for all three. ORT's MLPs (folded FP32 GEMMs at ~80% of this
CPU's FP32 peak: dense 3.2 ms, interaction + over 7.8 ms) beat PyTorch's (~14 ms), its lookups
(~5-5.6 ms of standard ONNX ops: one stacked Gather a bit width, unpack, dequantize, chunked
float32 pooling) are ~4x FBGEMM's fused kernel (~1.3-1.6 ms). Most of ORT's lookup time is a few
dozen mid-size element-wise passes that a second thread barely speeds up (a 590k-element ``Add``:
47 us with two threads, 52 us with one; the lookups: 5.0 ms vs 7.0 ms), so one thread a process
uses the cores better: ORT gains more than PyTorch from throughput mode.
Earlier in the day, before stacking and chunked pooling, ORT was at 0.65-0.80x (lookups ~9-17 ms).

Run: ``.venv/bin/python benchmarks/bench_serving.py [--max-rows N] [--batch B] [--rounds R]
[--threads T] [--streams S] [--stream-threads T] [--json]`` (``--streams 0``: latency only)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchrec.models.dlrm import DLRM  # noqa: E402
from torchrec.modules.embedding_configs import EmbeddingBagConfig  # noqa: E402
from torchrec.modules.embedding_modules import EmbeddingBagCollection  # noqa: E402

from benchmarks.common import KAGGLE_ROWS  # noqa: E402
from compress.data.dataset import Dataset  # noqa: E402
from compress.io.architecture import infer_spec  # noqa: E402
from compress.io.model_spec import DLRMSpec  # noqa: E402
from compress.methods.apply_plan import convert_model, prepare_model  # noqa: E402
from compress.pipeline import CompressionResult, one_hot_features  # noqa: E402
from compress.plan import make_plan  # noqa: E402
from compress.recipe.parse import parse_recipe  # noqa: E402
from exporters.artifacts.read import load_artifacts  # noqa: E402
from exporters.export import export  # noqa: E402
from exporters.onnx.from_model import graph_spec_from_artifacts  # noqa: E402
from exporters.onnx.lookup import add_sparse_arch  # noqa: E402
from exporters.onnx.model import build_full_model, feature_input_names  # noqa: E402
from exporters.onnx.parity import serving_session  # noqa: E402
from exporters.onnx.spec import DLRMGraphSpec, GraphBuilder, Linear  # noqa: E402
from exporters.runtime.predictor import dataset_feeds  # noqa: E402
from exporters.runtime.torchrec_ebc import quantized_ebc_from_artifacts  # noqa: E402

DIM = 16
DENSE_IN = 13
BOTTOM = (512, 256, 64, DIM)
TOP = (512, 256, 1)
RECIPE = """
name = "int4_rows_int4_mlp"
[[tables]]
match = ["*"]
method = "ptq"
bits = 4
granularity = "row"
[mlp]
method = "ptq"
bits = 4
"""
PAUSE_S = 0.2


# ---------------------------------------------------------------------------------------------
# Model and data


def build_model(max_rows: int, seed: int = 0) -> tuple[DLRM, DLRMSpec]:
    """The FP32 TorchRec DLRM (Kaggle shapes, tables capped at ``max_rows``) and its spec."""
    torch.manual_seed(seed)
    configs = [
        EmbeddingBagConfig(
            name=f"t_cat_{i}",
            embedding_dim=DIM,
            num_embeddings=min(r, max_rows),
            feature_names=[f"cat_{i}"],
        )
        for i, r in enumerate(KAGGLE_ROWS)
    ]
    ebc = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
    model = DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=DENSE_IN,
        dense_arch_layer_sizes=list(BOTTOM),
        over_arch_layer_sizes=list(TOP),
    )
    gen = torch.Generator().manual_seed(seed)
    for cfg in configs:  # small uniform weights like TorchRec's default init, without its slow path
        w = torch.empty(cfg.num_embeddings, DIM).uniform_(-0.05, 0.05, generator=gen)
        ebc.embedding_bags[cfg.name].weight = torch.nn.Parameter(w)
    model.eval()
    return model, infer_spec(model.state_dict(), source="bench")


def make_batches(spec: DLRMSpec, n: int, batch: int, multi_hot: int, seed: int) -> list[Dataset]:
    """``n`` batches; the first ``multi_hot`` features' bags hold 1..5 ids, the rest one."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        values, offsets = {}, {}
        for i, f in enumerate(spec.feature_names):
            lengths = rng.integers(1, 6, batch) if i < multi_hot else np.ones(batch, np.int64)
            offsets[f] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            values[f] = rng.integers(
                0, spec.table_of_feature(f).num_embeddings, int(offsets[f][-1])
            )
        dense = np.log(rng.integers(0, 1000, (batch, DENSE_IN)) + 3.0).astype(np.float32)
        out.append(
            Dataset(dense=dense, labels=np.zeros(batch, np.float32), values=values, offsets=offsets)
        )
    return out


def compress_and_export(
    model: DLRM, spec: DLRMSpec, out: Path, one_hot: tuple[str, ...] = ()
) -> CompressionResult:
    """INT4 row-wise tables + INT4 MLPs (the pipeline's prepare/convert), written with graphs;
    ``one_hot``: the features the data shows one-hot (what the pipeline passes the exporter)."""
    recipe = parse_recipe(RECIPE)
    plan = make_plan(recipe, spec)
    prepared, shared = prepare_model(model, spec, plan)
    converted = convert_model(prepared)
    result = CompressionResult(
        spec=spec,
        recipe=recipe,
        plan=plan,
        model=converted,
        metrics={"baseline": None, "quantized": None, "compressed": None},
        train=None,
        shared=shared,
        source="bench",
        data={},
        one_hot_features=one_hot,
    )
    export(result, out)
    return result


def float_mlps(gspec: DLRMGraphSpec) -> DLRMGraphSpec:
    """``gspec`` with every quantized linear replaced by its dequantized float32 weight."""

    def f(layers: tuple[Linear, ...]) -> tuple[Linear, ...]:
        return tuple(
            Linear(bias=lin.bias, weight=lin.dequantized().astype(np.float32)) for lin in layers
        )

    return dataclasses.replace(gspec, dense_arch=f(gspec.dense_arch), over_arch=f(gspec.over_arch))


def build_lookup_graph(gspec: DLRMGraphSpec):
    """ORT graph of the embedding part alone: jagged inputs -> pooled ``[B, F*D]``."""
    from onnx import TensorProto

    from exporters.onnx.model import check_model

    gb = GraphBuilder("lookups")
    lookups = []
    for f, (values, lengths) in feature_input_names(gspec).items():
        gb.add_input(values, TensorProto.INT64, [f"n_{f}"])
        gb.add_input(lengths, TensorProto.INT64, ["batch"])
        lookups.append((gspec.table_of(f), values, lengths))
    one_hot = [f in gspec.one_hot_features for f in feature_input_names(gspec)]
    pooled = add_sparse_arch(  # [B, F, D], as in the full model
        gb, lookups, gspec.embedding_dim, one_hot=one_hot
    )
    gb.add_output(
        pooled, "pooled", TensorProto.FLOAT, ["batch", len(gspec.features), gspec.embedding_dim]
    )
    return check_model(gb.make_model())


def fbgemm_dlrm(model: DLRM, qebc: torch.nn.Module) -> DLRM:
    """A copy of ``model`` whose sparse arch is TorchRec's quantized ``qebc`` (FBGEMM kernels)."""
    out = copy.deepcopy(model)
    out.sparse_arch.embedding_bag_collection = qebc
    return out.eval()


@torch.no_grad()
def run_dlrm(model: DLRM, batch) -> torch.Tensor:  # noqa: ANN001 - compress.data.dataset Batch
    """Logits of a TorchRec DLRM for one batch of :meth:`Dataset.to_batch`."""
    return model(batch.dense, batch.sparse)


# ---------------------------------------------------------------------------------------------
# Timing


@dataclasses.dataclass
class Variant:
    name: str
    run: Callable[[int], object]  # batch index -> output
    times: list[float] = dataclasses.field(default_factory=list)

    def samples_per_s(self, batch: int) -> float:
        return batch / statistics.median(self.times)


def time_round_robin(
    variants: list[Variant], n_batches: int, rounds: int, per_round: int, warmup: int
) -> None:
    for v in variants:
        for i in range(warmup):
            v.run(i % n_batches)
    for r in range(rounds):
        for v in variants:
            time.sleep(PAUSE_S)  # let spinning worker threads of the previous variant go idle
            for k in range(per_round):
                i = (r * per_round + k) % n_batches
                t0 = time.perf_counter()
                v.run(i)
                v.times.append(time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# Throughput: several single-threaded serving processes at once

#: The whole-model variants timed in throughput mode (the MLP-as-float32 ORT graph is left out).
STREAM_VARIANTS = ("ort int4 (mlp int4)", "torchrec fbgemm int4", "pytorch fp32")
STREAM_TIMEOUT_S = 600.0


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """What a serving process needs to rebuild the benchmark's models and batches by itself."""

    artifacts: str
    max_rows: int
    batch: int
    multi_hot: int
    batches: int
    threads: int
    warmup: int


def stream_variants(cfg: StreamConfig) -> dict[str, Callable[[int], object]]:
    """The :data:`STREAM_VARIANTS` in this process: the same seeded FP32 model and batches as the
    parent's, the ORT session and the FBGEMM EmbeddingBagCollection from the parent's artifacts."""
    torch.set_num_threads(cfg.threads)
    model, spec = build_model(cfg.max_rows)
    data = make_batches(spec, cfg.batches, cfg.batch, cfg.multi_hot, seed=1)
    arts = load_artifacts(Path(cfg.artifacts))
    inputs = feature_input_names(graph_spec_from_artifacts(arts))
    feeds = [dataset_feeds(d, inputs) for d in data]
    batches = [d.to_batch(spec.feature_names) for d in data]
    session = serving_session(Path(cfg.artifacts) / "model.onnx", threads=cfg.threads)
    fbgemm_model = fbgemm_dlrm(model, quantized_ebc_from_artifacts(arts))
    return {
        "ort int4 (mlp int4)": lambda i: session.run(None, feeds[i]),
        "torchrec fbgemm int4": lambda i: run_dlrm(fbgemm_model, batches[i]),
        "pytorch fp32": lambda i: run_dlrm(model, batches[i]),
    }


def _stream_worker(cfg: StreamConfig, commands, results, barrier) -> None:  # noqa: ANN001 - mp
    """A serving process: on ``(variant, n)`` warm up, wait for the others, run ``n`` batches
    and report the seconds; ``None`` ends it. A failure is reported as ``("error", text)``."""
    try:
        variants = stream_variants(cfg)
        results.put("ready")
        for name, n in iter(commands.get, None):
            run = variants[name]
            for i in range(cfg.warmup):
                run(i % cfg.batches)
            barrier.wait(timeout=STREAM_TIMEOUT_S)
            t0 = time.perf_counter()
            for k in range(n):
                run(k % cfg.batches)
            results.put(time.perf_counter() - t0)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises
        results.put(("error", f"{type(e).__name__}: {e}"))
        barrier.abort()


def _stream_result(results) -> object:  # noqa: ANN001 - mp queue
    got = results.get(timeout=STREAM_TIMEOUT_S)
    if isinstance(got, tuple) and got[0] == "error":
        raise RuntimeError(f"a serving process failed: {got[1]}")
    return got


def time_streams(
    cfg: StreamConfig, streams: int, rounds: int, per_round: int
) -> dict[str, list[float]]:
    """samples/s of every :data:`STREAM_VARIANTS` entry, one value a round: ``streams`` processes
    (``spawn``: no thread pool inherited) each run ``per_round`` batches of one variant at the
    same time; a round's rate is all their samples over the slowest one's time. Variants take
    turns within each round, with a pause between them, as in :func:`time_round_robin`."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(streams), ctx.Queue()
    commands = [ctx.Queue() for _ in range(streams)]
    procs = [
        ctx.Process(target=_stream_worker, args=(cfg, q, results, barrier), daemon=True)
        for q in commands
    ]
    for proc in procs:
        proc.start()
    rates: dict[str, list[float]] = {name: [] for name in STREAM_VARIANTS}
    try:
        for _ in procs:
            _stream_result(results)
        for _ in range(rounds):
            for name in STREAM_VARIANTS:
                time.sleep(PAUSE_S)
                for q in commands:
                    q.put((name, per_round))
                elapsed = [float(_stream_result(results)) for _ in procs]
                rates[name].append(streams * per_round * cfg.batch / max(elapsed))
    finally:
        for q in commands:
            q.put(None)
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-rows", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--multi-hot", type=int, default=8, help="features with bags of 1..5 ids")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batches", type=int, default=8, help="distinct input batches cycled")
    parser.add_argument(
        "--streams",
        type=int,
        default=2,
        help="serving processes at once in throughput mode (0: skip it)",
    )
    parser.add_argument("--stream-threads", type=int, default=1, help="threads per process")
    parser.add_argument("--stream-per-round", type=int, default=8, help="batches per process")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model, spec = build_model(args.max_rows)
    data = make_batches(spec, args.batches, args.batch, args.multi_hot, seed=1)
    names = spec.feature_names
    with tempfile.TemporaryDirectory(prefix="bench_serving.") as tmp:
        out = Path(tmp) / "int4"
        one_hot = one_hot_features(data[0], names)  # as the pipeline finds them in --data
        compress_and_export(model, spec, out, one_hot)
        setup_s = time.perf_counter() - t0
        arts = load_artifacts(out)
        gspec = graph_spec_from_artifacts(arts)  # with the one-hot hint the export recorded
        inputs = feature_input_names(gspec)
        feeds = [dataset_feeds(d, inputs) for d in data]
        batches = [d.to_batch(names) for d in data]

        ort_int4 = serving_session(out / "model.onnx", threads=args.threads)
        ort_fp32_mlp = serving_session(build_full_model(float_mlps(gspec)), threads=args.threads)
        ort_lookups = serving_session(build_lookup_graph(gspec), threads=args.threads)
        ort_dense = serving_session(out / "onnx" / "dense_arch.onnx", threads=args.threads)
        ort_over = serving_session(out / "onnx" / "over_arch.onnx", threads=args.threads)
        qebc = quantized_ebc_from_artifacts(arts)
        fbgemm_model = fbgemm_dlrm(model, qebc)

        sparse_feeds = [{k: v for k, v in f.items() if k != "dense"} for f in feeds]
        pooled = [ort_lookups.run(None, s)[0] for s in sparse_feeds]

        @torch.no_grad()
        def torch_dense_over(m, i):
            emb = m.dense_arch(batches[i].dense)
            return m.over_arch(m.inter_arch(emb, torch.from_numpy(pooled[i])))

        full = [
            Variant("ort int4 (mlp int4)", lambda i: ort_int4.run(None, feeds[i])),
            Variant("ort int4 (mlp fp32)", lambda i: ort_fp32_mlp.run(None, feeds[i])),
            Variant("torchrec fbgemm int4", lambda i: run_dlrm(fbgemm_model, batches[i])),
            Variant("pytorch fp32", lambda i: run_dlrm(model, batches[i])),
        ]
        parts = [
            Variant("lookups: ort int4", lambda i: ort_lookups.run(None, sparse_feeds[i])),
            Variant("lookups: fbgemm int4", lambda i: qebc(batches[i].sparse).values()),
            Variant(
                "lookups: pytorch fp32",
                lambda i: model.sparse_arch.embedding_bag_collection(batches[i].sparse).values(),
            ),
            Variant(
                "dense+over: ort (mlp int4)",
                lambda i: ort_over.run(
                    None,
                    {
                        "dense_embedding": ort_dense.run(None, {"dense": feeds[i]["dense"]})[0],
                        "sparse_embedding": pooled[i],
                    },
                ),
            ),
            Variant("dense+over: pytorch fp32", lambda i: torch_dense_over(model, i)),
        ]
        with torch.no_grad():
            time_round_robin(full, len(data), args.rounds, args.per_round, args.warmup)
            time_round_robin(parts, len(data), args.rounds, args.per_round, args.warmup)
        stream_rates = {}
        if args.streams > 0:
            cfg = StreamConfig(
                artifacts=str(out),
                max_rows=args.max_rows,
                batch=args.batch,
                multi_hot=args.multi_hot,
                batches=args.batches,
                threads=args.stream_threads,
                warmup=args.warmup,
            )
            stream_rates = time_streams(cfg, args.streams, args.rounds, args.stream_per_round)

    rate = {v.name: v.samples_per_s(args.batch) for v in full + parts}
    ratios = {
        "ort_int4_vs_pytorch_fp32": rate["ort int4 (mlp int4)"] / rate["pytorch fp32"],
        "ort_int4_vs_fbgemm_int4": rate["ort int4 (mlp int4)"] / rate["torchrec fbgemm int4"],
        "ort_int4_fp32mlp_vs_pytorch_fp32": rate["ort int4 (mlp fp32)"] / rate["pytorch fp32"],
        "ort_int4_fp32mlp_vs_fbgemm_int4": rate["ort int4 (mlp fp32)"]
        / rate["torchrec fbgemm int4"],
    }
    report = {
        "config": {
            **vars(args),
            "rows": sum(t.num_embeddings for t in spec.tables),
            "tables": len(spec.tables),
            "setup_seconds": round(setup_s, 1),
        },
        "samples_per_s": {k: round(v) for k, v in rate.items()},
        "ms_per_batch": {v.name: round(1e3 * statistics.median(v.times), 2) for v in full + parts},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets": {
            "ort_int4 >= pytorch_fp32": ratios["ort_int4_vs_pytorch_fp32"] >= 1.0,
            "ort_int4 within 1.5x of fbgemm": ratios["ort_int4_vs_fbgemm_int4"] >= 1 / 1.5,
        },
    }
    if stream_rates:
        report["throughput"] = throughput_report(stream_rates, args.streams, args.stream_threads)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    cfg = report["config"]
    print(
        f"DLRM {cfg['tables']} tables x dim {DIM}, {cfg['rows']:,} rows, batch {args.batch}, "
        f"{args.multi_hot} multi-hot features (mean 3 ids), {args.threads} threads; setup {setup_s:.0f}s"
    )
    print(f"{'variant':<30}{'ms/batch':>10}{'samples/s':>12}")
    for v in full + parts:
        print(
            f"{v.name:<30}{report['ms_per_batch'][v.name]:>10.2f}{report['samples_per_s'][v.name]:>12,}"
        )
    for k, v in report["ratios"].items():
        print(f"{k:<36}{v:>6.2f}x")
    for k, ok in report["targets"].items():
        print(f"target {k}: {'met' if ok else 'NOT met'}")
    if stream_rates:
        print_throughput(report["throughput"])
    return 0


def throughput_report(
    rates: dict[str, list[float]], streams: int, threads: int
) -> dict[str, object]:
    """Medians, ratios (of medians, and round by round) and targets of :func:`time_streams`."""
    ort, fbgemm, fp32 = STREAM_VARIANTS
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratios = {
        "ort_int4_vs_pytorch_fp32": med[ort] / med[fp32],
        "ort_int4_vs_fbgemm_int4": med[ort] / med[fbgemm],
    }
    return {
        "streams": streams,
        "threads_per_stream": threads,
        "samples_per_s": {k: round(v) for k, v in med.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "ort_int4_vs_pytorch_fp32_by_round": [
            round(o / p, 3) for o, p in zip(rates[ort], rates[fp32], strict=True)
        ],
        "targets": {
            "ort_int4 >= pytorch_fp32": ratios["ort_int4_vs_pytorch_fp32"] >= 1.0,
            "ort_int4 within 1.5x of fbgemm": ratios["ort_int4_vs_fbgemm_int4"] >= 1 / 1.5,
        },
    }


def print_throughput(tp: dict) -> None:
    print(f"throughput: {tp['streams']} processes x {tp['threads_per_stream']} thread(s) at once")
    print(f"{'variant':<30}{'samples/s':>22}")
    for k, v in tp["samples_per_s"].items():
        print(f"{k:<30}{v:>22,}")
    for k, v in tp["ratios"].items():
        print(f"{k:<36}{v:>6.2f}x")
    rounds = ", ".join(f"{r:.2f}" for r in tp["ort_int4_vs_pytorch_fp32_by_round"])
    print(f"ort_int4_vs_pytorch_fp32 by round: {rounds}")
    for k, ok in tp["targets"].items():
        print(f"target (throughput) {k}: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    raise SystemExit(main())
