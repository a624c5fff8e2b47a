"""The main job on the papers' model shapes: wall time, peak RSS, throughput, bytes on disk.

Shapes (facebookresearch/dlrm preprocessing of the two Criteo data sets; random weights, with a
share of all-zero rows, as never-seen ids leave them in real checkpoints):

- ``kaggle``: 26 tables, dim 16, 33.8M rows, 2.16 GB of FP32 tables (the DQRM paper's model).
- ``terabyte``: 26 tables capped at 10M rows, dim 64, 49.1M rows, 12.58 GB.

Each recipe runs as the command users run (``dqrm-compress CKPT --recipe R --json``) in a fresh
process; the baseline is reading the checkpoint once, measured in the same run. Checkpoints are
written once into ``benchmarks/.cache`` (about 15 GB for both shapes) and kept with ``--keep``.

    .venv/bin/python benchmarks/bench_scale.py --shape kaggle
    .venv/bin/python benchmarks/bench_scale.py --shape terabyte --recipe int4_rowwise_ptq --keep

Targets (issue "Scale on one machine"): Terabyte ``int4_rowwise_ptq`` peak RSS <= 3 GB and >= 1 GB/s
through the quantize stage; Kaggle peak RSS <= 1.5 GB; artifacts <= planned + 2% + 2 MB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import cache_dir, python_child  # noqa: E402
from compress.io.atomic_file import replacing, temp_dir_beside  # noqa: E402
from compress.io.model import build_model  # noqa: E402
from compress.io.model_config import read_config_spec  # noqa: E402
from compress.io.model_spec import DLRMSpec  # noqa: E402

DEFAULT_RECIPES = ("int4_rowwise_ptq", "int8_ptq", "int4_ptq", "robe_10000x", "int4_qat")

#: A ROBE-Z recipe at the second paper's headline ratio (built-ins stop at 1000x).
ROBE_10000X = """
name = "robe_10000x"
[[tables]]
match = ["*"]
min_rows = 10000
method = "share"
compression = 10000.0
block_size = 8
group = "large"
[finetune]
batch_size = 2048
optimizer = "adagrad"
lr_embedding = 0.01
lr_dense = 0.001
"""


def shrunk(spec: DLRMSpec, factor: int) -> DLRMSpec:
    """``spec`` with every table ``factor`` times smaller (at least 2 rows)."""
    tables = tuple(
        replace(t, num_embeddings=max(t.num_embeddings // factor, 2)) for t in spec.tables
    )
    return replace(spec, tables=tables)


def table_bytes(spec: DLRMSpec) -> int:
    return sum(t.num_embeddings * t.embedding_dim * 4 for t in spec.tables)


#: The papers' shapes, from the built-in model configs (``recipes/models/``).
SHAPES = {
    "kaggle": read_config_spec("criteo_kaggle_dlrm"),
    "terabyte": read_config_spec("criteo_terabyte_dlrm"),
    # 1% of the Kaggle rows: a quick check that the benchmark itself runs
    "kaggle_1pct": shrunk(read_config_spec("criteo_kaggle_dlrm"), 100),
}


def fill_table(out: np.ndarray, seed: int, zero_fraction: float, chunk: int = 1 << 20) -> None:
    """Uniform weights in +-0.05 with about ``zero_fraction`` of the rows all zero, in chunks."""
    rng = np.random.default_rng(seed)
    for start in range(0, out.shape[0], chunk):
        block = out[start : start + chunk]
        block[:] = rng.random(block.shape, dtype=np.float32) * np.float32(0.1) - np.float32(0.05)
        block[rng.random(block.shape[0]) < zero_fraction] = 0.0


def write_checkpoint(shape_name: str, path: Path, zero_fraction: float) -> None:
    """Write a ``torch.save`` checkpoint of the shape without holding its tables in memory."""
    shape = SHAPES[shape_name]
    meta = build_model(shape, device="meta").state_dict()
    g = torch.Generator().manual_seed(0)
    with temp_dir_beside(path, "tables") as scratch:
        state = {}
        for i, (key, v) in enumerate(meta.items()):
            if "embedding_bags" not in key:
                state[key] = torch.randn(v.shape, generator=g) * 0.05
                continue
            arr = np.lib.format.open_memmap(
                scratch / f"{i}.npy", mode="w+", dtype=np.float32, shape=tuple(v.shape)
            )
            fill_table(arr, seed=i, zero_fraction=zero_fraction)
            state[key] = torch.from_numpy(arr)
        with replacing(path, path.with_suffix(".tmp")) as tmp:
            torch.save(state, tmp)


def ensure_checkpoint(shape: str, zero_fraction: float) -> Path:
    path = cache_dir() / f"scale_{shape}_z{int(round(zero_fraction * 100))}.pt"
    if not path.exists():
        print(
            f"writing {path} ({table_bytes(SHAPES[shape]) / 1e9:.2f} GB of tables) ...", flush=True
        )
        python_child(
            "from pathlib import Path\nfrom benchmarks.bench_scale import write_checkpoint\n"
            f"write_checkpoint({shape!r}, Path({str(path)!r}), {zero_fraction!r})\n"
        )
    return path


def recipe_arg(name: str, workdir: Path) -> str:
    if name == "robe_10000x":
        path = workdir / "robe_10000x.toml"
        path.write_text(ROBE_10000X)
        return str(path)
    return name


def run_recipe(
    ckpt: Path, recipe: str, out: Path, steps: int, workdir: Path, chunk_rows: int | None = None
) -> dict:
    """Run the main job in a fresh process; its JSON document plus wall and peak RSS."""
    doc = workdir / "job.json"
    argv = ["--no-progress", "compress", str(ckpt), "--recipe", recipe_arg(recipe, workdir)]
    argv += ["--out", str(out), "--force", "--json"]
    if chunk_rows is not None:
        argv += ["--chunk-rows", str(chunk_rows)]
    if recipe.endswith("_qat") or recipe.startswith("robe"):
        argv += ["--steps", str(steps)]
    code = (
        "import contextlib\nfrom compress.cli.main import main\n"
        f"with open({str(doc)!r}, 'w') as f, contextlib.redirect_stdout(f):\n"
        f"    rc = main({argv!r})\n"
        "assert rc == 0, rc\n"
    )
    wall, peak, _ = python_child(code)
    result = json.loads(doc.read_text())
    disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    # the staged tables, stage and lock beside --out must all be gone
    left = sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))
    return {"wall": wall, "peak": peak, "disk": disk, "job": result, "left": left}


def report(shape: DLRMSpec, ckpt: Path, recipe: str, r: dict, read_once: float) -> None:
    t = r["job"].get("timings", {})
    planned = r["job"]["bytes_planned"]
    quantize = t.get("quantize", 0.0) + t.get("convert", 0.0)
    gbps = table_bytes(shape) / 1e9 / quantize if quantize > 0 else float("nan")
    limit = planned * 1.02 + 2e6
    size = ckpt.stat().st_size
    print(
        f"{recipe:<18}{r['wall']:>8.1f}{r['wall'] / read_once:>8.2f}{r['peak'] / 1e9:>9.2f}"
        f"{r['peak'] / size:>8.2f}{gbps:>8.2f}{planned / 1e6:>10.1f}{r['disk'] / 1e6:>10.1f}"
        f"{r['disk'] / planned:>8.3f}  {'ok' if r['disk'] <= limit else 'OVER'}"
    )
    stages = ", ".join(f"{k} {v:.1f}" for k, v in t.items() if v >= 0.05)
    print(f"{'':<18}stages (s): {stages}")
    if r["left"]:
        print(f"{'':<18}LEFT BESIDE THE OUTPUT: {', '.join(r['left'])}")
    train = r["job"].get("train") or {}
    if train.get("steps") and train.get("seconds"):
        print(
            f"{'':<18}training loop: {train['steps']} steps in {train['seconds']:.1f} s "
            f"({train['steps'] / train['seconds']:.2f} steps/s, "
            f"{train.get('samples_per_second', 0):,.0f} samples/s)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", action="append", choices=sorted(SHAPES), help="repeatable")
    ap.add_argument("--recipe", action="append", help=f"repeatable; default {DEFAULT_RECIPES}")
    ap.add_argument("--zero-fraction", type=float, default=0.25, help="share of all-zero rows")
    ap.add_argument("--steps", type=int, default=50, help="fine-tuning steps (QAT, ROBE)")
    ap.add_argument("--keep", action="store_true", help="keep checkpoints in benchmarks/.cache")
    ap.add_argument("--chunk-rows", type=int, default=None, help="the main job's --chunk-rows")
    args = ap.parse_args()
    for name in args.shape or ["kaggle"]:
        shape = SHAPES[name]
        ckpt = ensure_checkpoint(name, args.zero_fraction)
        read_wall, read_peak, _ = python_child(
            f"f = open({str(ckpt)!r}, 'rb')\nwhile f.read(1 << 24): pass\n"
        )
        size = ckpt.stat().st_size
        print(
            f"\n{name}: checkpoint {size / 1e9:.2f} GB, {args.zero_fraction:.0%} zero rows; "
            f"read once {read_wall:.1f} s ({size / 1e9 / read_wall:.2f} GB/s), "
            f"peak {read_peak / 1e9:.2f} GB"
        )
        print(
            f"{'recipe':<18}{'wall s':>8}{'/read':>8}{'peak GB':>9}{'/ckpt':>8}{'GB/s':>8}"
            f"{'plan MB':>10}{'disk MB':>10}{'/plan':>8}"
        )
        for recipe in args.recipe or DEFAULT_RECIPES:
            with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".run-") as tmp:
                try:
                    r = run_recipe(
                        ckpt, recipe, Path(tmp) / "out", args.steps, Path(tmp), args.chunk_rows
                    )
                except subprocess.CalledProcessError as exc:  # a failed run is a row, not the end
                    why = (exc.stderr or "").strip().splitlines() or [f"exit {exc.returncode}"]
                    print(f"{recipe:<18}FAILED: {why[-1][:200]}")
                    continue
                report(shape, ckpt, recipe, r, read_wall)
        if not args.keep:
            ckpt.unlink()
    print("\nGB/s: FP32 table bytes / (quantize + convert seconds); /plan: bytes on disk / planned")


if __name__ == "__main__":
    main()
