"""End-to-end scoring on the Criteo Kaggle shape: the FP32 checkpoint vs its INT4 artifacts.

The Kaggle-shaped checkpoint of ``bench_scale.py`` (26 tables, dim 16, 33.8M rows, 2.16 GB;
written once into ``benchmarks/.cache``) and ``--rows`` (default 1,000,000) rows of Criteo text
with uniform ids (cached too). Two artifact directories are made by the main job, as users run it
(``dqrm-compress CKPT --recipe R --data ROWS``): INT4 row-wise tables with INT4 per-channel MLPs,
once with ``[mlp] activations = "int8"`` (ranges calibrated on the rows) and once with the
default float32 activations. Each is then scored by ``dqrm-compress eval PATH --data ROWS --json``
in a fresh process, the way the issue measured it: ``seconds`` there is reading the rows plus
scoring them (the model load before it is not counted), the wall time of the whole command is
reported beside it. Every case runs ``--repeat`` times (best kept), alternating.

    flock /tmp/bigmem.lock .venv/bin/python benchmarks/bench_scoring.py [--rows N] [--repeat K]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_scale import ensure_checkpoint  # noqa: E402
from benchmarks.common import KAGGLE_ROWS, cache_dir  # noqa: E402
from compress.data.criteo_write import write_criteo_text  # noqa: E402

RECIPE = """
name = "{name}"
[[tables]]
match = ["*"]
method = "ptq"
bits = 4
granularity = "row"
[mlp]
method = "ptq"
bits = 4
{activations}"""


def ensure_rows(n: int, seed: int = 0) -> Path:
    """``n`` rows of Criteo text for the Kaggle tables: uniform ids, small integer counts."""
    path = cache_dir() / f"scoring_kaggle_{n}.tsv"
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.25).astype(np.int64)
    dense = np.maximum(-1, rng.geometric(0.05, (n, 13)) - 2)
    ids = np.column_stack([rng.integers(0, r, n) for r in KAGGLE_ROWS])
    tmp = path.with_suffix(".tmp")
    write_criteo_text(tmp, labels, dense, ids)
    tmp.rename(path)
    return path


def cli(*args: str) -> tuple[dict, float]:
    """Run ``dqrm-compress ARGS --json`` in a fresh process: its JSON and the wall seconds."""
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "compress", "--no-progress", *args, "--json"],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout), time.perf_counter() - t0


def ensure_artifacts(ckpt: Path, rows: Path, activations: str) -> Path:
    name = f"kaggle_int4_{activations}act"
    out = cache_dir() / f"scoring_{name}"
    if (out / "manifest.json").exists():
        return out
    recipe = cache_dir() / f"{name}.toml"
    acts = 'activations = "int8"\n' if activations == "int8" else ""
    recipe.write_text(RECIPE.format(name=name, activations=acts))
    cli(str(ckpt), "--recipe", str(recipe), "--data", str(rows), "--out", str(out), "--force")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ckpt = ensure_checkpoint("kaggle", 0.25)
    rows = ensure_rows(args.rows)
    cases = {
        "fp32 checkpoint (pytorch)": ckpt,
        "int4 artifacts, int8 mlp (onnxruntime)": ensure_artifacts(ckpt, rows, "int8"),
        "int4 artifacts, fp32 act (onnxruntime)": ensure_artifacts(ckpt, rows, "fp32"),
    }
    best: dict[str, dict] = {}
    for _ in range(args.repeat):
        for name, path in cases.items():
            metrics, wall = cli("eval", str(path), "--data", str(rows))
            run = {"seconds": metrics["seconds"], "wall": round(wall, 2), "auc": metrics["auc"]}
            print(f"{name}: {run}", file=sys.stderr, flush=True)  # each run as it ends
            if name not in best or run["seconds"] < best[name]["seconds"]:
                best[name] = run
    fp32 = best["fp32 checkpoint (pytorch)"]["seconds"]
    report = {
        "rows": args.rows,
        "cases": best,
        "speedup_vs_fp32": {k: round(fp32 / v["seconds"], 2) for k, v in best.items()},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"Kaggle shape, {args.rows:,} Criteo rows, eval seconds (read + score), best of {args.repeat}"
    )
    for name, r in best.items():
        print(
            f"{name:<42}{r['seconds']:>8.2f} s  (command {r['wall']:.1f} s)  "
            f"{report['speedup_vs_fp32'][name]:.2f}x  auc {r['auc']:.4f}"
        )


if __name__ == "__main__":
    main()
