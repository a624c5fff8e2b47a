"""Streamed fine-tuning data: peak memory against data size, and how long training waits for data.

Writes (once, into ``benchmarks/.cache/stream``) a Criteo text file of ``--rows`` one-hot samples
drawn by the synthetic generator on the demo's tables (7 tables of 20 to 100,000 rows, 13 dense
fields; :mod:`compress.data.criteo_write`), its first ``--head`` lines as a second file, and a
demo-sized TorchRec DLRM (dim 16, bottom 13-64-16, top 64-32-1) trained like the demo for one FP32
epoch on the head. Then runs the main
job as users run it, ``dqrm-compress --recipe int4_qat CKPT --data FILE --json``, in a fresh process
per run (one epoch over the first 80% of the rows; the last 20% is the validation set), and
reports:

- peak RSS of the job's process (``VmHWM``) and the workers' peak private memory (their pages
  shared with other processes are not counted),
- ``timings.data_wait`` (seconds the training loop waited for its next batch) as a share of the
  fine-tuning loop's time, and the loader's rows/s (``loader.rows_per_second``),

for the full file and its head streamed (``--stream on``, 2 workers), and the head read whole
(``--stream off``) for comparison.

    .venv/bin/python benchmarks/bench_stream.py                 # 3.6M and 0.9M rows
    .venv/bin/python benchmarks/bench_stream.py --rows 400000 --head 100000   # a quick look

Targets (issue "Scale on one machine"): peak RSS of the two streamed runs within 1.15x of each
other; ``data_wait`` under 10% of training time with 2 workers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import cache_dir, python_child  # noqa: E402
from compress.io.atomic_file import replacing  # noqa: E402

_RUN = """
import contextlib, io, json, os, threading, time
from compress.cli.main import main

def private_kb(pid):
    try:
        with open(f"/proc/{{pid}}/smaps_rollup") as fh:
            return sum(int(l.split()[1]) for l in fh if l.startswith(("Private_Clean", "Private_Dirty")))
    except OSError:
        return 0

def children():
    me = str(os.getpid())
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{{entry}}/stat") as fh:
                    if fh.read().rsplit(") ", 1)[1].split()[1] == me:
                        yield int(entry)
            except OSError:
                pass

peak = [0]
done = threading.Event()
def sample():
    while not done.wait(0.25):
        peak[0] = max(peak[0], sum(private_kb(p) for p in children()))

threading.Thread(target=sample, daemon=True).start()
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = main({argv!r})
done.set()
job = json.loads(out.getvalue())
print(json.dumps({{"code": code, "job": job, "workers_private": peak[0] * 1024}}))
"""


def prepare(rows: int, head: int) -> tuple[Path, Path, Path]:
    """The cached checkpoint, full file and head (written when missing)."""
    import torch

    from compress.data.criteo_write import write_synthetic_criteo
    from compress.data.formats import open_dataset
    from compress.data.synthetic import demo_synthetic_config
    from compress.demo import DEMO_TRAINING, demo_spec
    from compress.io.model import build_model
    from compress.train.loop import fit

    d = cache_dir() / "stream"
    d.mkdir(exist_ok=True)
    config = replace(demo_synthetic_config(0), num_samples=rows, bag_sizes=(1,) * 7)
    full, part = d / f"criteo_{rows}.tsv", d / f"criteo_{rows}_head_{head}.tsv"
    ckpt = d / f"dlrm_{rows}_head_{head}.pt"
    if not full.exists():
        print(f"writing {full} ...", file=sys.stderr)
        with replacing(full) as tmp:
            write_synthetic_criteo(config, tmp)
    if not part.exists():
        with replacing(part) as tmp, open(full, "rb") as src, open(tmp, "wb") as dst:
            for _ in range(head):
                dst.write(src.readline())
    if not ckpt.exists():  # trained like the demo (one FP32 epoch), on the head read whole
        spec = demo_spec(config.table_sizes)
        torch.manual_seed(0)
        model = build_model(spec)
        fit(model, open_dataset(part, spec), None, spec.feature_names, DEMO_TRAINING)
        with replacing(ckpt) as tmp:
            torch.save(model.state_dict(), tmp)
    return ckpt, full, part


def run(ckpt: Path, data: Path, stream: str, workers: int, recipe: str) -> dict:
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".run-") as tmp:
        out = Path(tmp)
        argv = [
            "--no-progress",
            "--recipe",
            recipe,
            str(ckpt),
            "--data",
            str(data),
            "--out",
            str(out / "artifacts"),
            "--stream",
            stream,
            "--loader-workers",
            str(workers),
            "--json",
        ]
        wall, peak, stdout = python_child(_RUN.format(argv=argv))
        result = json.loads(stdout.strip().splitlines()[-2])
        if result["code"] != 0:
            raise RuntimeError(f"dqrm-compress exited with {result['code']}")
        return {"wall": wall, "peak": peak, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=3_600_000)
    parser.add_argument("--head", type=int, default=900_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--recipe", default="int4_qat")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each case (report ranges)")
    args = parser.parse_args()
    ckpt, full, part = prepare(args.rows, args.head)
    cases = [
        (f"{args.rows:,} rows, stream", full, "on"),
        (f"{args.head:,} rows, stream", part, "on"),
        (f"{args.head:,} rows, whole", part, "off"),
    ]
    print(
        f"{'data':<24}{'wall s':>8}{'peak MB':>9}{'workers MB':>11}{'train s':>9}"
        f"{'wait s':>8}{'wait %':>8}{'loader rows/s':>15}{'train rows/s':>14}{'AUC':>8}"
    )
    peaks: dict[str, list[float]] = {}
    for _ in range(args.repeat):
        for name, data, stream in cases:
            r = run(ckpt, data, stream, args.workers, args.recipe)
            job = r["job"]
            train_s = job["train"]["seconds"]
            wait = job["timings"].get("data_wait", 0.0)
            loader = job.get("loader") or {}
            rate = loader.get("rows_per_second")
            peaks.setdefault(name, []).append(r["peak"])
            print(
                f"{name:<24}{r['wall']:>8.1f}{r['peak'] / 1e6:>9.0f}"
                f"{r['workers_private'] / 1e6:>11.0f}{train_s:>9.1f}{wait:>8.2f}"
                f"{100 * wait / train_s:>7.1f}%{(f'{rate:,.0f}' if rate else '-'):>15}"
                f"{job['train']['samples_per_second']:>14,.0f}"
                f"{job['metrics']['compressed']['auc']:>8.4f}",
                flush=True,
            )
    a, b = (peaks[cases[0][0]], peaks[cases[1][0]])
    print(
        f"peak RSS, {args.rows:,} / {args.head:,} rows streamed: "
        f"{min(a) / max(b):.3f}-{max(a) / min(b):.3f}x (target <= 1.15x)"
    )


if __name__ == "__main__":
    main()
