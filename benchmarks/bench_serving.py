"""Benchmark: serving a compressed DLRM with ONNX Runtime vs TorchRec/FBGEMM vs FP32 PyTorch.

A Criteo-Kaggle-shaped DLRM scaled to fit: 26 tables of dim 16 with the Kaggle row counts capped at
``--max-rows`` (default 1M: the six largest tables get 1M rows, 5.4M rows in all), bottom MLP
13-512-256-64-16, top MLP 367-512-256-1. Batches of ``--batch`` (2048) samples; ``--multi-hot``
features (default 8) hold bags of 1..5 ids (mean 3), the others one id; ids uniform.

The model is compressed with INT4 row-wise tables (FBGEMM's format) and INT4 per-channel MLPs
with INT8 activations (``[mlp] activations = "int8"``: ranges calibrated on four batches that are
not timed) and written as an artifact directory with its ONNX graphs (parity is checked while
writing). Timed:

* ``ort int4 (int8 mlp)``: the artifacts served the way users serve them, through
  ``Predictor(artifacts, threads=T).predict_tensors`` (input checks, then ``model.onnx`` in the
  serving session): the MLPs on ONNX Runtime's integer GEMM kernels (``QuantizeLinear`` +
  ``MatMulIntegerToFloat``).
* ``ort int4 (fp32 act)``: the same tables and INT4 weights with float32 activations (the default
  graph: weights folded to float32 ``MatMul``), built in memory.
* ``torchrec fbgemm int4``: TorchRec's quantized ``EmbeddingBagCollection`` (FBGEMM INT4 kernels,
  built from the artifacts) inside the TorchRec DLRM with float32 PyTorch MLPs.
* ``torchrec fbgemm int4 (fp16 mlp)``: the same with TorchRec's own quantized dense modules
  (``torchrec.inference.modules.quantize_dense``: fp16 is the one dtype it offers for them).
* ``pytorch fp32``: the original TorchRec DLRM.

Ratios compare ``ort int4 (int8 mlp)`` with ``pytorch fp32`` and with the faster FBGEMM variant;
targets: at least 1.5x and 1.2x.

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

In latency mode ``Predictor(threads=2)`` cuts each batch into two slices of 1024 scored at the
same time on two pinned worker threads (one single-threaded session): ONNX Runtime's intra-op
threads barely speed this graph up (11.2 ms a batch with 2 threads, 11.7 ms with 1, 6-8 ms as two
slices). The ``ort int4 (fp32 act)`` row and the split parts below are single sessions with
``--threads`` intra-op threads.

Measured 2026-12-03 on the quiet 2-core machine, ``--rounds 8``, ORT INT4 with INT8 MLPs against
PyTorch FP32 / the faster FBGEMM INT4 variant: latency (2 threads) multi-hot 1.59x / 1.76x
(1.59-1.73x against FP32 over four runs), one-hot 2.01x / 1.95x; throughput (2 processes x 1
thread) multi-hot 1.71x / 1.68x, one-hot 2.32x / 2.10x. Where the time goes (single thread, ORT's
profiler, multi-hot): the lookups ~7 ms against FBGEMM's ~2.3 ms, most of it ``Gather`` on the
large tables (three random reads a row: packed codes, fp16 scale, fp16 bias, ~30 ns each, where a
Gather from the small tables' folded float32 array costs ~8 ns a row); the integer MLPs ~3.5 ms,
the dot interaction ~1.6 ms.

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
import types
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
from compress.methods.qat_linear import calibrate_activations  # noqa: E402
from compress.pipeline import CompressionResult, one_hot_features  # noqa: E402
from compress.plan import make_plan  # noqa: E402
from compress.recipe.parse import parse_recipe  # noqa: E402
from exporters.artifacts.read import load_artifacts  # noqa: E402
from exporters.export import export  # noqa: E402
from exporters.onnx.from_model import graph_spec_from_artifacts  # noqa: E402
from exporters.onnx.lookup import add_sparse_arch  # noqa: E402
from exporters.onnx.model import (  # noqa: E402
    build_dense_graph,
    build_full_model,
    build_over_graph,
    feature_input_names,
)
from exporters.onnx.parity import serving_session  # noqa: E402
from exporters.onnx.spec import DLRMGraphSpec, GraphBuilder, Linear  # noqa: E402
from exporters.runtime.predictor import Predictor, dataset_feeds  # noqa: E402
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
activations = "int8"
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
    model: DLRM,
    spec: DLRMSpec,
    out: Path,
    one_hot: tuple[str, ...] = (),
    calibration: list[Dataset] = (),
) -> CompressionResult:
    """INT4 row-wise tables + INT4 MLPs with INT8 activations (the pipeline's prepare, activation
    calibration on ``calibration``, convert), written with graphs; ``one_hot``: the features the
    data shows one-hot (what the pipeline passes the exporter)."""
    recipe = parse_recipe(RECIPE)
    plan = make_plan(recipe, spec)
    prepared, shared = prepare_model(model, spec, plan)
    calibrate_activations(prepared, [d.to_batch(spec.feature_names) for d in calibration])
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


def fp32_activations(gspec: DLRMGraphSpec) -> DLRMGraphSpec:
    """``gspec`` with float32 MLP inputs (the INT4 weights kept): the graph the artifacts held
    before ``[mlp] activations = "int8"``, still the default."""

    def f(layers: tuple[Linear, ...]) -> tuple[Linear, ...]:
        return tuple(dataclasses.replace(x, act_scale=None, act_zero_point=None) for x in layers)

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
    """A copy of ``model`` whose sparse arch is TorchRec's quantized ``qebc`` (FBGEMM kernels);
    the FP32 tables are not copied."""
    sparse = model.sparse_arch
    held = sparse.embedding_bag_collection
    sparse.embedding_bag_collection = torch.nn.Identity()
    try:
        out = copy.deepcopy(model)
    finally:
        sparse.embedding_bag_collection = held
    out.sparse_arch.embedding_bag_collection = qebc
    return out.eval()


def fp16_dense(model: DLRM) -> DLRM:
    """``model`` (in place) with TorchRec's own quantized dense modules: its
    ``torchrec.inference.modules.quantize_dense`` (fp16 is the one dtype it lowers dense modules
    to: ``.half()`` and inputs cast to half), every child but the sparse arch."""
    from torchrec.inference.modules import quantize_dense

    quantize_dense(types.SimpleNamespace(predict_module=model), torch.half)
    return model


@torch.no_grad()
def run_dlrm(model: DLRM, batch) -> torch.Tensor:  # noqa: ANN001 - compress.data.dataset Batch
    """Logits of a TorchRec DLRM for one batch of :meth:`Dataset.to_batch`."""
    return model(batch.dense, batch.sparse)


#: The whole-model variants, timed in both modes.
ORT_INT8 = "ort int4 (int8 mlp)"  # model.onnx: INT4 tables, INT4 weights, INT8 activations
ORT_FP32_ACT = "ort int4 (fp32 act)"  # the same INT4 weights, float32 activations (the default)
FBGEMM = "torchrec fbgemm int4"  # FBGEMM INT4 tables + float32 PyTorch MLPs
FBGEMM_FP16 = "torchrec fbgemm int4 (fp16 mlp)"  # + TorchRec's quantize_dense(torch.half)
FP32 = "pytorch fp32"
WHOLE_VARIANTS = (ORT_INT8, ORT_FP32_ACT, FBGEMM, FBGEMM_FP16, FP32)


@dataclasses.dataclass
class Served:
    """What one serving process holds: feeds and batches by index, the artifacts' graph spec, the
    FBGEMM collection, and the whole-model runs by variant name."""

    feeds: list[dict[str, np.ndarray]]
    batches: list
    gspec: DLRMGraphSpec
    qebc: torch.nn.Module
    fp16: DLRM  # FBGEMM tables, TorchRec's fp16 dense modules
    runs: dict[str, Callable[[int], object]]


def serve(
    artifacts: Path, model: DLRM, spec: DLRMSpec, data: list[Dataset], threads: int
) -> Served:
    """Every :data:`WHOLE_VARIANTS` entry in this process, from the artifacts and ``model``."""
    arts = load_artifacts(artifacts)
    gspec = graph_spec_from_artifacts(arts)  # with the one-hot hint the export recorded
    inputs = feature_input_names(gspec)
    feeds = [dataset_feeds(d, inputs) for d in data]
    batches = [d.to_batch(spec.feature_names) for d in data]
    predictor = Predictor(artifacts, threads=threads)  # what users serve: checks + model.onnx
    tensors = [predictor_inputs(d, spec.feature_names) for d in data]
    ort_fp32_act = serving_session(build_full_model(fp32_activations(gspec)), threads=threads)
    qebc = quantized_ebc_from_artifacts(arts)
    fbgemm = fbgemm_dlrm(model, qebc)
    fbgemm_fp16 = fp16_dense(fbgemm_dlrm(model, quantized_ebc_from_artifacts(arts)))
    runs = {
        ORT_INT8: lambda i: predictor.predict_tensors(*tensors[i]),
        ORT_FP32_ACT: lambda i: ort_fp32_act.run(None, feeds[i]),
        FBGEMM: lambda i: run_dlrm(fbgemm, batches[i]),
        FBGEMM_FP16: lambda i: run_dlrm(fbgemm_fp16, batches[i]),
        FP32: lambda i: run_dlrm(model, batches[i]),
    }
    return Served(feeds, batches, gspec, qebc, fbgemm_fp16, runs)


def predictor_inputs(
    data: Dataset, features: tuple[str, ...]
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``Predictor.predict_tensors`` arguments of one batch: dense, ids and bag lengths a feature."""
    values = {f: data.values[f][data.offsets[f][0] : data.offsets[f][-1]] for f in features}
    lengths = {f: np.diff(data.offsets[f]) for f in features}
    return data.dense, values, lengths


def whole_ratios(rate: dict[str, float]) -> dict[str, float]:
    """ORT (INT8 MLPs, and float32 activations) over FP32 PyTorch and over the faster of the
    two FBGEMM variants."""
    best_fbgemm = max(rate[FBGEMM], rate[FBGEMM_FP16])
    return {
        "ort_int4_vs_pytorch_fp32": rate[ORT_INT8] / rate[FP32],
        "ort_int4_vs_fbgemm_int4": rate[ORT_INT8] / best_fbgemm,
        "ort_int4_fp32act_vs_pytorch_fp32": rate[ORT_FP32_ACT] / rate[FP32],
        "ort_int4_fp32act_vs_fbgemm_int4": rate[ORT_FP32_ACT] / best_fbgemm,
        "ort_int4_vs_ort_int4_fp32act": rate[ORT_INT8] / rate[ORT_FP32_ACT],
    }


def targets(ratios: dict[str, float]) -> dict[str, bool]:
    return {
        "ort_int4 >= 1.5x pytorch_fp32": ratios["ort_int4_vs_pytorch_fp32"] >= 1.5,
        "ort_int4 >= 1.2x fbgemm_int4": ratios["ort_int4_vs_fbgemm_int4"] >= 1.2,
    }


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

#: The whole-model variants timed in throughput mode.
STREAM_VARIANTS = WHOLE_VARIANTS
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
    """The :data:`STREAM_VARIANTS` in this process (:func:`serve`): the same seeded FP32 model
    and batches as the parent's, ORT sessions and FBGEMM collection from the parent's artifacts."""
    torch.set_num_threads(cfg.threads)
    model, spec = build_model(cfg.max_rows)
    data = make_batches(spec, cfg.batches, cfg.batch, cfg.multi_hot, seed=1)
    return serve(Path(cfg.artifacts), model, spec, data, cfg.threads).runs


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
    calibration = make_batches(spec, 4, args.batch, args.multi_hot, seed=2)  # not the timed rows
    names = spec.feature_names
    with tempfile.TemporaryDirectory(prefix="bench_serving.") as tmp:
        out = Path(tmp) / "int4"
        one_hot = one_hot_features(data[0], names)  # as the pipeline finds them in --data
        compress_and_export(model, spec, out, one_hot, calibration)
        setup_s = time.perf_counter() - t0
        served = serve(out, model, spec, data, args.threads)
        feeds, batches, qebc = served.feeds, served.batches, served.qebc
        ort_lookups = serving_session(build_lookup_graph(served.gspec), threads=args.threads)
        graphs = load_artifacts(out).onnx["graphs"]  # the split graphs, where the manifest says
        ort_dense = serving_session(out / graphs["dense_arch"]["file"], threads=args.threads)
        ort_over = serving_session(out / graphs["over_arch"]["file"], threads=args.threads)
        fp32_act = fp32_activations(served.gspec)
        ort_dense_f = serving_session(build_dense_graph(fp32_act), threads=args.threads)
        ort_over_f = serving_session(build_over_graph(fp32_act), threads=args.threads)
        fp16_model = served.fp16  # its dense modules only are timed here

        sparse_feeds = [{k: v for k, v in f.items() if k != "dense"} for f in feeds]
        pooled = [ort_lookups.run(None, s)[0] for s in sparse_feeds]

        @torch.no_grad()
        def torch_dense_over(m, i):
            emb = m.dense_arch(batches[i].dense)
            return m.over_arch(m.inter_arch(emb, torch.from_numpy(pooled[i])))

        def ort_dense_over(dense_sess, over_sess, i):
            emb = dense_sess.run(None, {"dense": feeds[i]["dense"]})[0]
            return over_sess.run(None, {"dense_embedding": emb, "sparse_embedding": pooled[i]})

        full = [Variant(name, served.runs[name]) for name in WHOLE_VARIANTS]
        parts = [
            Variant("lookups: ort int4", lambda i: ort_lookups.run(None, sparse_feeds[i])),
            Variant("lookups: fbgemm int4", lambda i: qebc(batches[i].sparse).values()),
            Variant(
                "lookups: pytorch fp32",
                lambda i: model.sparse_arch.embedding_bag_collection(batches[i].sparse).values(),
            ),
            Variant("dense+over: ort int8 mlp", lambda i: ort_dense_over(ort_dense, ort_over, i)),
            Variant(
                "dense+over: ort fp32 act", lambda i: ort_dense_over(ort_dense_f, ort_over_f, i)
            ),
            Variant("dense+over: pytorch fp32", lambda i: torch_dense_over(model, i)),
            Variant("dense+over: pytorch fp16", lambda i: torch_dense_over(fp16_model, i)),
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
    ratios = whole_ratios(rate)
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
        "targets": targets(ratios),
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
    print(f"{'variant':<34}{'ms/batch':>10}{'samples/s':>12}")
    for v in full + parts:
        print(
            f"{v.name:<34}{report['ms_per_batch'][v.name]:>10.2f}{report['samples_per_s'][v.name]:>12,}"
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
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratios = whole_ratios(med)
    return {
        "streams": streams,
        "threads_per_stream": threads,
        "samples_per_s": {k: round(v) for k, v in med.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "ort_int4_vs_pytorch_fp32_by_round": [
            round(o / p, 3) for o, p in zip(rates[ORT_INT8], rates[FP32], strict=True)
        ],
        "targets": targets(ratios),
    }


def print_throughput(tp: dict) -> None:
    print(f"throughput: {tp['streams']} processes x {tp['threads_per_stream']} thread(s) at once")
    print(f"{'variant':<34}{'samples/s':>22}")
    for k, v in tp["samples_per_s"].items():
        print(f"{k:<34}{v:>22,}")
    for k, v in tp["ratios"].items():
        print(f"{k:<36}{v:>6.2f}x")
    rounds = ", ".join(f"{r:.2f}" for r in tp["ort_int4_vs_pytorch_fp32_by_round"])
    print(f"ort_int4_vs_pytorch_fp32 by round: {rounds}")
    for k, ok in tp["targets"].items():
        print(f"target (throughput) {k}: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    raise SystemExit(main())
