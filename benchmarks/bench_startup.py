"""Benchmark: start-up of the light commands and of serving, in fresh interpreters.

Wall time (from the parent: interpreter start to exit) and peak RSS of each case, ``--repeat``
times, the cases interleaved round by round so that load from other work spreads over all of them:

* ``python -c pass``: the interpreter alone, the baseline every ratio is against;
* ``import numpy, onnxruntime, onnx``: for reference, the third-party imports ``verify`` and
  ``Predictor`` needed before they read the graphs' declared inputs and external-data references
  with :mod:`exporters.onnx.proto_reader` (now ``verify`` imports numpy only, ``Predictor``
  numpy and onnxruntime);
* ``dqrm-compress --help``, ``--version``, ``verify ARTIFACTS`` (``python -m compress``);
* ``Predictor`` open and first predict: ``Predictor(ARTIFACTS)`` (every checksum, the ONNX Runtime
  session), then one batch of 4 samples through ``predict_tensors``.

None of them imports torch (``tests/test_lazy_imports.py`` checks that); ``import torch, torchrec``
can be added as a reference with ``--with-torch``.

    .venv/bin/python benchmarks/bench_startup.py                        # demo/dlrm.int4_qat, 5 runs
    .venv/bin/python benchmarks/bench_startup.py --artifacts DIR --repeat 10 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MB = 1e6

#: Opens the artifact directory argv[1] and scores one batch of 4 samples.
PREDICT = """
import sys
import numpy as np
from exporters import Predictor
p = Predictor(sys.argv[1])
n = 4
dense = np.zeros((n, p.spec.dense_in_features), np.float32)
values = {f: np.zeros(n, np.int64) for f in p.feature_names}
lengths = {f: np.ones(n, np.int64) for f in p.feature_names}
p.predict_tensors(dense, values, lengths)
"""


def cases(artifacts: Path, with_torch: bool) -> dict[str, list[str]]:
    """Case name -> argv (after the interpreter)."""
    cli = ["-m", "compress", "--no-progress"]
    out = {
        "python -c pass": ["-c", "pass"],
        "import numpy, onnxruntime, onnx": ["-c", "import numpy, onnxruntime, onnx"],
        "dqrm-compress --help": [*cli, "--help"],
        "dqrm-compress --version": [*cli, "--version"],
        "dqrm-compress verify ARTIFACTS": [*cli, "verify", str(artifacts)],
        "Predictor open + first predict": ["-c", PREDICT, str(artifacts)],
    }
    if with_torch:
        out["import torch, torchrec"] = ["-c", "import torch, torchrec"]
    return out


def run_once(argv: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of ``python ARGV`` from the repository root; a failing
    run is an error naming the case."""
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: nothing can block the child
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, *argv], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err
        )
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss in KiB)
        wall = time.perf_counter() - started
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        if code != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-500:]
            raise SystemExit(f"python {' '.join(argv[:3])}... exited {code}: {tail}")
    return wall, usage.ru_maxrss * 1024


def measure(argvs: dict[str, list[str]], repeat: int) -> dict[str, dict]:
    """Every case ``repeat`` times, interleaved; per case the wall times and the largest peak."""
    walls: dict[str, list[float]] = {name: [] for name in argvs}
    peaks: dict[str, int] = dict.fromkeys(argvs, 0)
    for argv in argvs.values():  # warm the page cache and the .pyc files first
        run_once(argv)
    for _ in range(repeat):
        for name, argv in argvs.items():
            wall, peak = run_once(argv)
            walls[name].append(wall)
            peaks[name] = max(peaks[name], peak)
    base = statistics.median(walls["python -c pass"])
    return {
        name: {
            "min_s": min(w),
            "median_s": statistics.median(w),
            "max_s": max(w),
            "median_over_baseline": statistics.median(w) / base,
            "peak_rss_mb": peaks[name] / MB,
            "runs": len(w),
        }
        for name, w in walls.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", type=Path, default=ROOT / "demo" / "dlrm.int4_qat")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per case (after one warm-up)")
    ap.add_argument("--with-torch", action="store_true", help="add `import torch, torchrec`")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args()
    if not (args.artifacts / "manifest.json").is_file():
        raise SystemExit(f"{args.artifacts}: no artifact directory (`make demo` builds the demo's)")
    if args.repeat < 1:
        raise SystemExit("--repeat must be at least 1")
    results = measure(cases(args.artifacts.resolve(), args.with_torch), args.repeat)
    if args.json:
        print(json.dumps({"artifacts": str(args.artifacts), "cases": results}, indent=2))
        return
    print(f"{args.artifacts}: {args.repeat} runs per case (+1 warm-up), fresh interpreters")
    print(f"{'case':<34}{'min s':>7}{'median':>8}{'max s':>7}{'x pass':>8}{'peak MB':>9}")
    for name, r in results.items():
        print(
            f"{name:<34}{r['min_s']:>7.2f}{r['median_s']:>8.2f}{r['max_s']:>7.2f}"
            f"{r['median_over_baseline']:>8.1f}{r['peak_rss_mb']:>9.0f}"
        )


if __name__ == "__main__":
    main()
