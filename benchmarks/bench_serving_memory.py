"""Benchmark: memory of serving an artifact directory, and its bytes on disk against the plan.

The full graph ``model.onnx`` reads the table files in place through ONNX external data (payloads
page aligned), so ONNX Runtime maps them rather than copying them: a serving process holds the
graph, the MLPs and what it computes in anonymous memory, and the table pages it has touched as
file-backed (shared, reclaimable) memory. Measured in fresh processes:

* ``plain``: ``onnxruntime.InferenceSession("model.onnx")`` (no option), what a user gets;
* ``predictor``: :class:`~exporters.runtime.predictor.Predictor` (checksums every file first).

Each opens the session, then serves ``--batches`` batches of ``--batch`` samples whose ids are
uniform over every table (the worst case for resident table pages: a real id distribution touches
far fewer), and reports peak RSS (``VmHWM``), RSS at the end split into anonymous and file-backed
pages (``RssAnon``, ``RssFile``), the time to open the session, and whether the process imported
torch, TorchRec or FBGEMM. Target (issue "Scale on one machine"): serving RSS <= packed table bytes
+ 400 MB.

Artifacts: ``--artifacts DIR``, or the Kaggle shape's ``int4_rowwise_ptq`` written by the main job
from ``benchmarks/bench_scale.py``'s checkpoint (``--shape kaggle``, 2.16 GB, written once into
``benchmarks/.cache``), whose bytes on disk are checked against the plan (<= planned + 2% + 2 MB).

Measured (2 vCPUs shared with other jobs, ORT 1.31, 50 batches of 2048): Kaggle
``int4_rowwise_ptq``, tables 405.2 MB packed, 407.0 MB on disk (plan 405.4 MB; the format 2
layout wrote 811 MB). ``plain``: peak 519 MB = packed + 114 MB (74 MB anonymous, 445 MB of mapped
file pages); after opening, 61 MB, of which 28 MB anonymous with ONNX Runtime itself loaded: ONNX
Runtime maps the table files, it does not copy them. ``predictor``: peak 541 MB = packed + 136 MB
(92 MB anonymous, 449 MB mapped; 92 MB after opening, 1.1 s to open with every checksum). Its
import path is numpy, onnxruntime, onnx and the artifact readers; before it stopped importing
torch and TorchRec the peak was 849 MB = packed + 444 MB (324 MB anonymous, 2.9 s to open).

    .venv/bin/python benchmarks/bench_serving_memory.py                 # Kaggle INT4 (~3 min)
    .venv/bin/python benchmarks/bench_serving_memory.py --shape kaggle_1pct
    .venv/bin/python benchmarks/bench_serving_memory.py --artifacts demo/dlrm.int4_qat
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_scale import SHAPES, ensure_checkpoint, run_recipe  # noqa: E402
from benchmarks.common import cache_dir, python_child  # noqa: E402

RECIPE = "int4_rowwise_ptq"
MB = 1e6

#: Runs in a fresh interpreter: open the session one way, serve uniform random batches, print
#: one JSON line (its memory as /proc/self/status reports it).
SERVE = """
import json, time
from pathlib import Path
import numpy as np

def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out

import sys

root = Path(ROOT)
manifest = json.loads((root / "manifest.json").read_text())  # (the Predictor checks it)
features = manifest["onnx"]["graphs"]["model"]["features"]
rows = {f: int(t["num_embeddings"]) for t in manifest["tables"] for f in t["feature_names"]}
n_dense = int(manifest["model"]["dense_in_features"])
before = status()
t0 = time.perf_counter()
if HOW == "plain":
    import onnxruntime as ort
    session = ort.InferenceSession(str(root / manifest["onnx"]["graphs"]["model"]["file"]))
    run = lambda feeds: session.run(["logits"], feeds)[0]
else:
    from exporters.runtime.predictor import Predictor
    predictor = Predictor(root)
    run = lambda feeds: predictor.predict_tensors(feeds["dense"], feeds["values"], feeds["lengths"])
opened = time.perf_counter() - t0
after_open = status()
rng = np.random.default_rng(0)
for _ in range(BATCHES):
    dense = rng.standard_normal((BATCH, n_dense), dtype=np.float32)
    values = {f: rng.integers(0, rows[f], BATCH) for f in features}
    lengths = {f: np.ones(BATCH, np.int64) for f in features}
    if HOW == "plain":
        feeds = {"dense": dense}
        for f, io in features.items():
            feeds[io["values"]], feeds[io["lengths"]] = values[f], lengths[f]
    else:
        feeds = {"dense": dense, "values": values, "lengths": lengths}
    run(feeds)
heavy = [m for m in ("torch", "torchrec", "fbgemm_gpu") if m in sys.modules]
print(json.dumps({"before": before, "open": after_open, "end": status(), "open_s": opened,
                  "heavy": heavy}))
"""


def checkpoint_path(shape: str, zero_fraction: float) -> Path:
    """Where :func:`benchmarks.bench_scale.ensure_checkpoint` keeps the shape's checkpoint."""
    return cache_dir() / f"scale_{shape}_z{int(round(zero_fraction * 100))}.pt"


def measure(root: Path, how: str, batch: int, batches: int) -> dict:
    """One fresh process serving ``root`` ``how`` (``plain`` or ``predictor``)."""
    code = SERVE.replace("ROOT", repr(str(root))).replace("HOW", repr(how))
    code = code.replace("BATCHES", str(batches)).replace("BATCH", str(batch))
    _, _, stdout = python_child(code)
    lines = [line for line in stdout.splitlines() if line.startswith('{"before"')]
    return json.loads(lines[-1])


def packed_bytes(root: Path) -> int:
    """Bytes of the stored tables and shared arrays (what the plan promised)."""
    manifest = json.loads((root / "manifest.json").read_text())
    return int(manifest["bytes"]["tables"])


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def report(root: Path, batch: int, batches: int, planned: int | None) -> None:
    packed, disk = packed_bytes(root), disk_bytes(root)
    limit = (planned if planned is not None else packed) * 1.02 + 2e6
    print(f"{root}: tables {packed / MB:.1f} MB packed, {disk / MB:.1f} MB on disk", end="")
    if planned is not None:
        print(
            f" (plan {planned / MB:.1f} MB; {'ok' if disk <= limit else 'OVER'} against plan + 2% + 2 MB)"
        )
    else:
        print()
    print(f"serving {batches} batches of {batch} ids uniform over every table, fresh processes:")
    print(
        f"{'how':<10}{'open s':>8}{'peak MB':>9}{'RSS MB':>8}{'anon MB':>9}{'file MB':>9}"
        f"{'peak-packed':>13}  target (<= packed + 400 MB)"
    )
    for how in ("plain", "predictor"):
        m = measure(root, how, batch, batches)
        peak = m["end"]["VmHWM"]
        print(
            f"{how:<10}{m['open_s']:>8.2f}{peak / MB:>9.0f}{m['end']['VmRSS'] / MB:>8.0f}"
            f"{m['end']['RssAnon'] / MB:>9.0f}{m['end']['RssFile'] / MB:>9.0f}"
            f"{(peak - packed) / MB:>13.0f}  {'ok' if peak <= packed + 400e6 else 'OVER'}"
        )
        print(
            f"{'':<10}interpreter and imports: RSS {m['before']['VmRSS'] / MB:.0f} MB; "
            f"after opening: RSS {m['open']['VmRSS'] / MB:.0f} MB "
            f"(anon {m['open']['RssAnon'] / MB:.0f}, file {m['open']['RssFile'] / MB:.0f}); "
            f"imports torch/TorchRec/FBGEMM: {', '.join(m['heavy']) or 'none'}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", type=Path, help="an artifact directory (default: build one)")
    ap.add_argument("--shape", default="kaggle", choices=sorted(SHAPES))
    ap.add_argument("--zero-fraction", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--keep", action="store_true", help="keep a checkpoint written by this run")
    args = ap.parse_args()
    if args.artifacts is not None:
        report(args.artifacts, args.batch, args.batches, None)
        return
    made = not checkpoint_path(args.shape, args.zero_fraction).exists()
    ckpt = ensure_checkpoint(args.shape, args.zero_fraction)
    try:
        with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".serve-") as tmp:
            out = Path(tmp) / "out"
            job = run_recipe(ckpt, RECIPE, out, steps=0, workdir=Path(tmp))
            print(
                f"{args.shape} {RECIPE}: written in {job['wall']:.0f} s, peak {job['peak'] / 1e9:.2f} GB"
            )
            report(out, args.batch, args.batches, int(job["job"]["bytes_planned"]))
    finally:
        if made and not args.keep:  # a checkpoint another run wrote stays
            ckpt.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
