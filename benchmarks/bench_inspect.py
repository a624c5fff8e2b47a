"""`inspect` on a Criteo-Kaggle-shaped checkpoint (26 tables, dim 16, ~2.16 GB): wall time and peak
RSS, against reading the file once. Peak RSS well under the file size shows the memory map works.

    .venv/bin/python benchmarks/bench_inspect.py [--keep]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import KAGGLE_ROWS, cache_dir, python_child  # noqa: E402
from compress.io.atomic_file import replacing  # noqa: E402
from compress.io.model import build_model  # noqa: E402
from compress.io.model_spec import DLRMSpec, TableSpec  # noqa: E402


def kaggle_spec() -> DLRMSpec:
    tables = tuple(
        TableSpec(
            name=f"t_cat_{i}", num_embeddings=r, embedding_dim=16, feature_names=(f"cat_{i}",)
        )
        for i, r in enumerate(KAGGLE_ROWS)
    )
    return DLRMSpec("DLRM", tables, 13, (512, 256, 64, 16), (512, 256, 1))


def write_checkpoint(path: Path) -> None:
    meta = build_model(kaggle_spec(), device="meta").state_dict()
    g = torch.Generator().manual_seed(0)
    state = {
        k: (torch.zeros(v.shape) if "embedding_bags" in k else torch.randn(v.shape, generator=g))
        for k, v in meta.items()
    }
    with replacing(path, path.with_suffix(".tmp")) as tmp:
        torch.save(state, tmp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--keep", action="store_true", help="keep the 2.16 GB checkpoint in benchmarks/.cache"
    )
    args = ap.parse_args()
    path = cache_dir() / "kaggle_shaped.pt"
    if not path.exists():
        print(f"writing {path} ...", flush=True)
        python_child(
            f"from benchmarks.bench_inspect import write_checkpoint\nfrom pathlib import Path\n"
            f"write_checkpoint(Path({str(path)!r}))\n"
        )
    size = path.stat().st_size
    read_wall, read_peak, _ = python_child(
        f"f = open({str(path)!r}, 'rb')\nwhile f.read(1 << 24): pass\n"
    )
    insp_wall, insp_peak, out = python_child(
        f"from compress.cli.main import main\nassert main(['--no-progress', 'inspect', {str(path)!r}, '--json']) == 0\n"
    )
    load_wall, load_peak, _ = python_child(
        f"from compress.io.model import load_model\nm = load_model({str(path)!r})\n"
    )
    base_wall, base_peak, _ = python_child("import compress.cli.main, compress.io.model\n")
    gb = size / 1e9
    print(f"checkpoint: {gb:.3f} GB ({path.name})")
    print(f"{'step':<28}{'wall s':>9}{'peak RSS MB':>13}{'RSS/file':>10}")
    for name, wall, peak in (
        ("read file once (baseline)", read_wall, read_peak),
        ("python + imports only", base_wall, base_peak),
        ("inspect --json", insp_wall, insp_peak),
        ("load_model (mmap, rebuild)", load_wall, load_peak),
    ):
        print(f"{name:<28}{wall:>9.3f}{peak / 1e6:>13.0f}{peak / size:>10.3f}")
    print(f"(the child processes include ~{base_wall:.1f}s of imports)")
    print(f"ratio inspect/read-once wall: {insp_wall / read_wall:.3f}")
    print(
        f"ratio (inspect - imports)/read-once wall: {max(insp_wall - base_wall, 0.0) / read_wall:.3f}"
    )
    print(f"ratio inspect peak RSS / file size: {insp_peak / size:.3f}")
    if not args.keep:
        path.unlink()


if __name__ == "__main__":
    main()
