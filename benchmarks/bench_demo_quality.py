"""Quality of the built-in recipes on the demo: AUC of FP32, after quantization/projection, after
fine-tuning, with a paired bootstrap interval for each recipe's AUC difference to a reference.
Every number is on the report slice of the demo's valid file (its last 80%; the first 20% only
chooses the kept fine-tuning step, see compress.train.validation), as the main job reports them.

    .venv/bin/python benchmarks/bench_demo_quality.py [--recipes int4_ptq int4_qat ...] [--demo demo]

Builds the demo first if it is missing (``dqrm-compress demo`` does the same).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compress import pipeline  # noqa: E402
from compress.data.npz import load_npz  # noqa: E402
from compress.demo import build_demo, demo_paths  # noqa: E402
from compress.progress import set_enabled  # noqa: E402
from compress.train.evaluate import predict_logits  # noqa: E402
from compress.train.metrics import auc  # noqa: E402
from compress.train.validation import split_validation  # noqa: E402

DEFAULT = ["int8_ptq", "int4_ptq", "int4_rowwise_ptq", "int4_qat", "robe_100x", "robe_1000x"]


def paired_bootstrap(a: np.ndarray, b: np.ndarray, labels: np.ndarray, n: int = 100, seed: int = 0):
    """Mean and 95% interval of AUC(b) - AUC(a) over ``n`` paired resamples of the samples."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n):
        idx = rng.integers(0, len(labels), len(labels))
        diffs.append(auc(b[idx], labels[idx]) - auc(a[idx], labels[idx]))
    diffs = np.sort(diffs)
    return float(np.mean(diffs)), float(diffs[int(0.025 * n)]), float(diffs[int(0.975 * n) - 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=Path("demo"))
    ap.add_argument("--recipes", nargs="+", default=DEFAULT)
    ap.add_argument(
        "--reference", default="int4_ptq", help="recipe the paired differences are taken against"
    )
    args = ap.parse_args()
    set_enabled(False)
    paths = demo_paths(args.demo)
    if not paths.complete():
        build_demo(args.demo)
    valid = load_npz(paths.valid)
    report = split_validation(valid, str(paths.valid)).report
    train = load_npz(paths.train)
    job = pipeline.load(paths.checkpoint)
    names = job.spec.feature_names
    logits = {"fp32": predict_logits(lambda b: job.module(b.dense, b.sparse), report, names)}
    rows = [("fp32", auc(logits["fp32"], report.labels), None, job.spec.total_bytes, 0.0)]
    for recipe in args.recipes:
        t0 = time.perf_counter()
        plan = pipeline.plan(job, recipe)
        result = pipeline.compress(job, plan, data=train, valid=valid)
        model = result.model
        logits[recipe] = predict_logits(lambda b, m=model: m(b.dense, b.sparse), report, names)
        before = result.metrics["before_finetune"]
        rows.append(
            (
                recipe,
                result.metrics["compressed"]["auc"],
                before["auc"] if before else None,
                plan.bytes_after,
                time.perf_counter() - t0,
            )
        )
    fp32_auc = rows[0][1]
    print(
        f"demo: {len(train):,} train / {len(valid):,} valid samples ({len(report):,} reported); "
        f"FP32 AUC {fp32_auc:.4f}"
    )
    print(
        f"{'recipe':<18}{'AUC':>8}{'vs FP32':>9}{'before FT':>11}{'bytes':>11}{'x smaller':>10}"
        f"{'secs':>7}   AUC - {args.reference} [95% paired bootstrap]"
    )
    for name, a, before, size, secs in rows:
        ref = ""
        if args.reference in logits and name not in ("fp32", args.reference):
            mean, lo, hi = paired_bootstrap(logits[args.reference], logits[name], report.labels)
            ref = f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}]"
        b = f"{before:.4f}" if before is not None else "-"
        print(
            f"{name:<18}{a:>8.4f}{a - fp32_auc:>+9.4f}{b:>11}{size:>11,}"
            f"{job.spec.total_bytes / size:>10.1f}{secs:>7.1f}   {ref}"
        )


if __name__ == "__main__":
    main()
