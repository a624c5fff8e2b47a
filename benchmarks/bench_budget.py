"""``--budget`` on a realistic synthetic case: AUC against FP32 at 1/100 and 1/1000 of the model's
bytes, with paired bootstrap intervals, the chosen plan, peak RSS and how long each part took.

The case is ``bench_ranges_quality.py``'s (built there once, kept in
``benchmarks/.cache/ranges_quality``): 26 tables with the Criteo Kaggle cardinalities capped at
200,000 rows (1.48M rows, dim 16, 95 MB with the MLPs), Zipf ids, a label from per-id effects
and latent interactions, a TorchRec ``DLRM`` trained one epoch in FP32; 1.2M training and 300k
validation samples. Each budget is one run of the main job, exactly as a user runs it, in a
fresh process::

    dqrm-compress --budget 100x dlrm.pt --data train.npz --valid valid.npz --out OUT --json

(the options measured on the selection slice, the chosen recipe fine-tuned as it says). The
AUC is ONNX Runtime's on the artifacts, on the report slice, paired with the FP32 checkpoint's.

    .venv/bin/python benchmarks/bench_budget.py [--budgets 100x 1000x] [--steps N] [--json FILE]

Peak RSS is about 1.7 GB per run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_demo_quality import paired_bootstrap  # noqa: E402
from benchmarks.common import cache_dir  # noqa: E402
from compress import pipeline  # noqa: E402
from compress.data.npz import load_npz  # noqa: E402
from compress.progress import set_enabled  # noqa: E402
from compress.train.evaluate import predict_logits  # noqa: E402
from compress.train.metrics import auc  # noqa: E402
from compress.train.validation import split_validation  # noqa: E402
from exporters.runtime.predictor import Predictor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: Runs the main job and prints its JSON and the process's peak RSS (bytes) as the last line.
_RUN = """
import contextlib, io, json, sys
from compress.cli.main import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    rc = main(sys.argv[1:])
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(out.getvalue())
print(json.dumps({"rc": rc, "peak_rss": int(hwm) * 1024}))
"""


def run_budget(budget: str, root: Path, out: Path, steps: int | None) -> tuple[dict, int]:
    """The main job's JSON for ``--budget budget`` on the case, and the run's peak RSS."""
    argv = [
        "--no-progress",
        "--budget",
        budget,
        str(root / "dlrm.pt"),
        "--data",
        str(root / "train.npz"),
        "--valid",
        str(root / "valid.npz"),
        "--out",
        str(out),
        "--force",
        "--json",
        *(["--steps", str(steps)] if steps else []),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _RUN, *argv], capture_output=True, text=True, env=env, cwd=ROOT
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise SystemExit(f"--budget {budget} failed:\n{done.stderr[-3000:]}")
    status = json.loads(lines[-1])
    if status["rc"] != 0:
        raise SystemExit(f"--budget {budget}: exit {status['rc']}:\n{done.stderr[-3000:]}")
    return json.loads("\n".join(lines[:-1])), status["peak_rss"]


def fp32_logits(checkpoint: Path, report) -> tuple[np.ndarray, int]:
    """The checkpoint's logits on the report slice, and its bytes (the model is let go)."""
    job = pipeline.load(checkpoint)
    logits = predict_logits(lambda b: job.module(b.dense, b.sparse), report, job.spec.feature_names)
    return logits, job.spec.total_bytes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", nargs="+", default=["100x", "1000x"])
    ap.add_argument("--root", type=Path, help="the case (default: the cache's ranges_quality)")
    ap.add_argument("--steps", type=int, help="fine-tuning steps (default: the recipe's)")
    ap.add_argument("--out", type=Path, help="where the artifacts go (default: a temporary dir)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    set_enabled(False)
    root = args.root or cache_dir() / "ranges_quality"
    if not (root / "case.json").is_file():
        raise SystemExit(f"{root}: no case; build it with benchmarks/bench_ranges_quality.py")
    valid = load_npz(root / "valid.npz")
    report = split_validation(valid, str(root / "valid.npz")).report
    fp32, model_bytes = fp32_logits(root / "dlrm.pt", report)
    base_auc = auc(fp32, report.labels)
    print(f"FP32: AUC {base_auc:.4f} on {len(report):,} report rows", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for text in args.budgets:
            out = (args.out or Path(tmp)) / f"dlrm.budget_{text}"
            summary, peak = run_budget(text, root, out, args.steps)
            logits = Predictor(out).predict(report)
            got = auc(logits, report.labels)
            diff, lo, hi = paired_bootstrap(fp32, logits, report.labels)
            budget = summary["budget"]
            metrics = summary["metrics"]
            before = metrics["before_finetune"]
            row = {
                "budget": text,
                "budget_bytes": budget["budget_bytes"],
                "bytes": summary["bytes_after"],
                "ratio": summary["bytes_before"] / summary["bytes_after"],
                "auc": got,
                "auc_cli": metrics["compressed"]["auc"],
                "vs_fp32": got - base_auc,
                "ci95": [lo, hi],
                "auc_before_finetune": None if before is None else before["auc"],
                "predicted_logloss_increase": budget["predicted_logloss_increase"],
                "logloss_increase": metrics["compressed"]["logloss"]
                - metrics["baseline"]["logloss"],
                "timings": summary["timings"],
                "seconds": summary["seconds"],
                "peak_rss": peak,
                "chosen": {t["name"]: t["option"] for t in budget["tables"]}
                | {"(mlp)": budget["mlp"]["option"]},
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print("| budget | bytes | smaller | AUC | vs FP32 [95% CI] | before fine-tuning | wall |")
    print("|---|---|---|---|---|---|---|")
    print(f"| FP32 | {model_bytes:,} | 1x | {base_auc:.4f} | | | |")
    for r in rows:
        before = "" if r["auc_before_finetune"] is None else f"{r['auc_before_finetune']:.4f}"
        print(
            f"| `--budget {r['budget']}` | {r['bytes']:,} | {r['ratio']:.0f}x | {r['auc']:.4f} | "
            f"{r['vs_fp32']:+.4f} [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}] | {before} | "
            f"{r['seconds']:.0f} s (choice {r['timings'].get('plan', 0):.0f} s) |"
        )
    if args.json:
        args.json.write_text(json.dumps({"fp32_auc": base_auc, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
