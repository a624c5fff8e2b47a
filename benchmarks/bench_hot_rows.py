"""Hot-row-aware sharing against plain ROBE-Z at the same bytes: the ``robe_100x``,
``robe_1000x`` and ``mixed_robe_int4`` recipes with every ``share`` rule's ``hot_rows`` unset
("plain"), ``"auto"`` (``hot``: INT8 hot rows; ``hot_fp16``: fp16) or a fixed count (``hot2000``:
``hot_rows = 2000``, INT8); the AUC of the artifacts after each recipe's fine-tuning, with paired
bootstrap intervals against FP32 and against the plain variant. The hot rows take their bytes from
the group's array, so every variant of a recipe writes the same bytes (checked).

The case is ``benchmarks/synthetic_case.py``'s quality preset (``bench_quality.py``'s, kept in
``benchmarks/.cache/quality``; built there when missing): the 26 Criteo Kaggle tables scaled so
the largest has 1M rows (3.34M rows, dim 16, 214 MB), Zipf ids, two multi-hot features, a hidden
label from the latent interactions of every feature pair; FP32 trained one epoch on 1.2M samples,
300k validation samples.

Each variant is one run of the main job in a fresh process, as users run it: the recipe with
the variant's keys is written as TOML and run with
``dqrm-compress --recipe VARIANT.toml dlrm.pt --data train.npz --valid valid.npz --json``; the
artifacts are scored by ONNX Runtime on the report slice (the job's own metric rows).

    .venv/bin/python benchmarks/bench_hot_rows.py [--recipes robe_1000x ...]
        [--variants plain hot hot_fp16 hot2000] [--steps N] [--keep] [--json FILE]

``--steps`` caps fine-tuning (default: each recipe's one epoch). With ``--keep`` finished rows are
stored beside the case (``hot_rows_results/``), so variants run one at a time add up to one table.

Measured 2026-12-03 with ``--steps 200`` (AUC vs plain at the same bytes, 95% paired interval):
``robe_1000x`` (105x) ``hot`` -0.0012 [-0.0015, -0.0010], ``hot2000`` -0.0001 [-0.0003, +0.0001];
``mixed_robe_int4`` (183x) ``hot`` -0.0011 [-0.0015, -0.0006]. ``"auto"`` gives nearly the whole
budget to hot rows (8,848 of them, a 10-cell array), which lowers the weighted reconstruction
error but leaves the tail nothing to fine-tune; the built-in recipes keep plain arrays.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_demo_quality import paired_bootstrap  # noqa: E402
from benchmarks.synthetic_case import (  # noqa: E402
    RESAMPLES,
    CaseData,
    add_case_arguments,
    case_command,
    fp32_logits,
    open_case_run,
    run_case_job,
    served_logits,
)
from compress.methods.robe.method import ShareConfig  # noqa: E402
from compress.progress import set_enabled  # noqa: E402
from compress.recipe.parse import load_recipe  # noqa: E402
from compress.recipe.schema import Recipe  # noqa: E402
from compress.recipe.toml_out import recipe_to_toml  # noqa: E402
from compress.train.metrics import auc  # noqa: E402

RECIPES = ("robe_100x", "robe_1000x", "mixed_robe_int4")
#: Variants: what the share rules' hot-row keys become (``hot<N>``, e.g. ``hot2000``: a fixed
#: ``hot_rows = N`` at INT8).
VARIANTS = {
    "plain": {"hot_rows": None, "hot_dtype": None},
    "hot": {"hot_rows": "auto", "hot_dtype": "int8"},
    "hot_fp16": {"hot_rows": "auto", "hot_dtype": "fp16"},
}
_FIXED = re.compile(r"hot([0-9]+)")


def variant_keys(name: str) -> dict:
    """The share-rule keys of variant ``name`` (:data:`VARIANTS`, or ``hot<N>``)."""
    fixed = _FIXED.fullmatch(name)
    if fixed is not None:
        return {"hot_rows": int(fixed[1]), "hot_dtype": "int8"}
    if name not in VARIANTS:
        raise argparse.ArgumentTypeError(f"unknown variant {name!r}: {', '.join(VARIANTS)}, hot<N>")
    return VARIANTS[name]


def variant_name(name: str) -> str:
    variant_keys(name)
    return name


@dataclass
class VariantRow:
    """One variant's run."""

    name: str
    command: list[str]
    bytes_before: int = 0
    bytes_after: int = 0
    auc: float = float("nan")
    auc_before_finetune: float | None = None
    steps: int | None = None
    seconds: float = 0.0
    peak_rss: int = 0
    hot: list[str] = field(default_factory=list)


def variant(recipe: Recipe, name: str) -> Recipe:
    """``recipe`` with every share rule's ``hot_rows``/``hot_dtype`` set as variant ``name``."""
    rules = tuple(
        replace(r, config=replace(r.config, **variant_keys(name)))
        if isinstance(r.config, ShareConfig)
        else r
        for r in recipe.rules
    )
    return replace(recipe, name=f"{recipe.name}_{name}", rules=rules)


def run_variant(
    recipe_name: str, v: str, case: CaseData, work: Path, steps: int | None
) -> tuple[VariantRow, np.ndarray]:
    """Run one variant through the CLI and score its artifacts with ONNX Runtime."""

    label = Path(recipe_name).stem  # a built-in name, or a recipe file's
    toml = work / f"{label}_{v}.toml"
    toml.write_text(recipe_to_toml(variant(load_recipe(recipe_name), v)))
    out = work / "out"
    command = case_command(case, ["--recipe", str(toml)], out, steps, "--force")
    name = f"{label}/{v}"
    print(f"  {name}: {' '.join(command[1:])}", flush=True)
    summary, peak, wall = run_case_job(name, command)
    before = summary["metrics"].get("before_finetune")
    row = VariantRow(
        name=name,
        command=command,
        bytes_before=summary["bytes_before"],
        bytes_after=summary["bytes_after"],
        auc_before_finetune=None if before is None else before["auc"],
        steps=(summary.get("train") or {}).get("steps"),
        seconds=wall,
        peak_rss=peak,
        hot=[n for n in summary["notes"] if "hot rows" in n],
    )
    logits, row.auc, mismatch = served_logits(out, case, summary["metrics"]["compressed"]["auc"])
    if mismatch:
        raise SystemExit(f"{name}: {mismatch}")
    shutil.rmtree(out)
    print(f"  {name}: {wall:.0f} s, peak RSS {peak / 1e9:.2f} GB", *row.hot, sep="\n    ")
    return row, logits


def print_table(fp32: np.ndarray, labels: np.ndarray, rows: dict[str, tuple]) -> list[dict]:
    """The table of every stored row; the rows as JSON. ``SystemExit`` when two variants of one
    recipe wrote different bytes."""
    base = auc(fp32, labels)
    print(
        "\n| recipe / variant | bytes | smaller | AUC (ONNX Runtime) | vs FP32 [95% CI] | "
        "vs plain [95% CI] | before fine-tuning | steps |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(f"| FP32 | | 1x | {base:.4f} | | | | |")
    out = []
    for name, (row, logits) in sorted(rows.items()):
        mean, lo, hi = paired_bootstrap(fp32, logits, labels, n=RESAMPLES)
        plain = name.rsplit("/", 1)[0] + "/plain"
        vs_plain, paired = "", None
        if plain != name and plain in rows:
            if rows[plain][0].bytes_after != row.bytes_after:
                raise SystemExit(
                    f"{name}: {row.bytes_after:,} bytes, {plain}: {rows[plain][0].bytes_after:,}"
                )
            paired = paired_bootstrap(rows[plain][1], logits, labels, n=RESAMPLES)
            vs_plain = f"{row.auc - rows[plain][0].auc:+.4f} [{paired[1]:+.4f}, {paired[2]:+.4f}]"
        before = "" if row.auc_before_finetune is None else f"{row.auc_before_finetune:.4f}"
        ratio = row.bytes_before / row.bytes_after
        print(
            f"| {name} | {row.bytes_after:,} | {ratio:.0f}x | {row.auc:.4f} | "
            f"{row.auc - base:+.4f} [{lo:+.4f}, {hi:+.4f}] | {vs_plain} | {before} | "
            f"{row.steps} |"
        )
        out.append(
            {**asdict(row), "vs_fp32": row.auc - base, "ci95": [lo, hi], "vs_plain_ci95": paired}
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES))
    ap.add_argument("--variants", nargs="+", default=["plain", "hot"], type=variant_name)
    add_case_arguments(ap)
    args = ap.parse_args(argv)
    set_enabled(False)
    run = open_case_run(args, "hot_rows_results", ".hot-")
    case, scratch, store = run.case, run.scratch, run.store
    fp32 = fp32_logits(case)
    try:
        for recipe_name in args.recipes:
            for v in args.variants:
                row, logits = run_variant(recipe_name, v, case, Path(scratch.name), args.steps)
                stem = f"{Path(recipe_name).stem}__{v}"
                (store / f"{stem}.json").write_text(json.dumps(asdict(row), indent=1) + "\n")
                np.save(store / f"{stem}.logits.npy", logits)
        rows = {}
        for p in sorted(store.glob("*.json")):
            row = VariantRow(**json.loads(p.read_text()))
            rows[row.name] = (row, np.load(p.with_suffix(".logits.npy")))
        table = print_table(fp32, case.report.labels, rows)
        if args.json:
            args.json.write_text(json.dumps({"rows": table}, indent=1) + "\n")
    finally:
        scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
