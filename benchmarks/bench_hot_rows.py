"""Hot-row-aware sharing against plain ROBE-Z at the same bytes: the ``robe_100x``,
``robe_1000x`` and ``mixed_robe_int4`` recipes with their shared groups' ``hot_rows`` unset
("plain") and set to ``"auto"`` ("hot"), AUC after each recipe's fine-tuning with paired bootstrap
intervals against FP32 and between the two.

The case is ``bench_ranges_quality.py``'s (kept in ``benchmarks/.cache/ranges_quality``; built
by that script when missing): 26 Criteo-Kaggle-shaped tables capped at 200,000 rows (1.48M rows,
dim 16, 95 MB), Zipf ids, two multi-hot features, an interaction-driven label; FP32 trained one
epoch on 1.2M samples; every number on the report slice of the 300k validation samples, as the
main job reports it.

    .venv/bin/python benchmarks/bench_hot_rows.py [--recipes robe_1000x ...]
        [--variants plain hot hot_fp16] [--steps N] [--json FILE]

``--steps`` caps fine-tuning (default: each recipe's one epoch). Peak RSS about 1.6 GB.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_demo_quality import paired_bootstrap  # noqa: E402
from benchmarks.common import cache_dir  # noqa: E402
from compress import pipeline  # noqa: E402
from compress.data.npz import load_npz  # noqa: E402
from compress.methods.robe import hot_rows  # noqa: E402
from compress.methods.robe.method import ShareConfig  # noqa: E402
from compress.progress import set_enabled  # noqa: E402
from compress.recipe.parse import load_recipe  # noqa: E402
from compress.recipe.schema import Recipe  # noqa: E402
from compress.train.evaluate import predict_logits  # noqa: E402
from compress.train.metrics import auc, logloss, sigmoid  # noqa: E402
from compress.train.validation import split_validation  # noqa: E402

RECIPES = ("robe_100x", "robe_1000x", "mixed_robe_int4")
#: Variants: what the share rules' hot-row keys become.
VARIANTS = {
    "plain": {"hot_rows": None, "hot_dtype": None},
    "hot": {"hot_rows": "auto", "hot_dtype": "int8"},
    "hot_fp16": {"hot_rows": "auto", "hot_dtype": "fp16"},
    "hot_half": {"hot_rows": "auto", "hot_dtype": "int8"},
}
#: ``compress.methods.robe.hot_rows.AUTO_MAX_HOT_SHARE`` of a variant (default: the module's).
HOT_SHARES = {"hot_half": 0.5}


def variant(recipe: Recipe, name: str) -> Recipe:
    """``recipe`` with every share rule's ``hot_rows``/``hot_dtype`` set as variant ``name``."""
    rules = tuple(
        replace(r, config=replace(r.config, **VARIANTS[name]))
        if isinstance(r.config, ShareConfig)
        else r
        for r in recipe.rules
    )
    return replace(recipe, name=f"{recipe.name}_{name}", rules=rules)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES))
    ap.add_argument("--variants", nargs="+", default=["plain", "hot"], choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, help="cap fine-tuning at N steps")
    ap.add_argument("--root", type=Path, help="the case (default: the ranges_quality cache)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    set_enabled(False)
    root = args.root or cache_dir() / "ranges_quality"
    if not (root / "case.json").is_file():
        raise SystemExit(f"{root}: no case; run benchmarks/bench_ranges_quality.py once first")
    case = json.loads((root / "case.json").read_text())
    train, valid = load_npz(root / "train.npz"), load_npz(root / "valid.npz")
    report = split_validation(valid, str(root / "valid.npz")).report
    job = pipeline.load(root / "dlrm.pt")
    names = job.spec.feature_names
    fp32 = predict_logits(lambda b: job.module(b.dense, b.sparse), report, names)
    labels = report.labels
    rows, logits = [], {}
    default_share = hot_rows.AUTO_MAX_HOT_SHARE
    for recipe_name in args.recipes:
        for v in args.variants:
            name = f"{recipe_name}/{v}"
            t0 = time.perf_counter()
            hot_rows.AUTO_MAX_HOT_SHARE = HOT_SHARES.get(v, default_share)
            plan = pipeline.plan(job, variant(load_recipe(recipe_name), v))
            result = pipeline.compress(job, plan, data=train, valid=valid, steps=args.steps)
            model = result.model
            logits[name] = predict_logits(lambda b, m=model: m(b.dense, b.sparse), report, names)
            hot = [n for n in result.notes if "hot rows" in n]
            rows.append(
                {
                    "variant": name,
                    "bytes": plan.bytes_after,
                    "ratio": plan.bytes_before / plan.bytes_after,
                    "before_finetune": result.metrics["before_finetune"]["auc"],
                    "seconds": time.perf_counter() - t0,
                    "hot": hot,
                }
            )
            print(f"  {name}: {time.perf_counter() - t0:.0f} s", *hot, sep="\n    ", flush=True)
    base = auc(fp32, labels)
    print(
        f"case: {len(case['table_sizes'])} tables ({sum(case['table_sizes']):,} rows), "
        f"{case['train']:,} train / {len(report):,} reported; Bayes AUC "
        f"{case['bayes_auc_valid']:.4f}; FP32 AUC {base:.4f}"
    )
    print(
        f"{'variant':<28}{'AUC':>8}{'vs FP32 [95% paired]':>30}{'vs plain':>28}{'log loss':>10}"
        f"{'before FT':>11}{'x smaller':>10}{'secs':>6}"
    )
    for r in rows:
        name = r["variant"]
        r["auc"] = auc(logits[name], labels)
        r["logloss"] = logloss(sigmoid(logits[name]), labels)
        mean, lo, hi = paired_bootstrap(fp32, logits[name], labels)
        r["vs_fp32"] = [mean, lo, hi]
        plain = name.rsplit("/", 1)[0] + "/plain"
        vs_plain = ""
        if plain != name and plain in logits:
            m2, lo2, hi2 = paired_bootstrap(logits[plain], logits[name], labels)
            r["vs_plain"] = [m2, lo2, hi2]
            vs_plain = f"{m2:+.4f} [{lo2:+.4f}, {hi2:+.4f}]"
        print(
            f"{name:<28}{r['auc']:>8.4f}{f'{mean:+.4f} [{lo:+.4f}, {hi:+.4f}]':>30}"
            f"{vs_plain:>28}{r['logloss']:>10.4f}{r['before_finetune']:>11.4f}{r['ratio']:>10.1f}"
            f"{r['seconds']:>6.0f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"case": case, "fp32_auc": base, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
