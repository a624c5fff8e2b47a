"""Quality of post-training ranges and INT2 on a realistic synthetic case: AUC / log loss of FP32,
INT4 and INT2 row-wise PTQ with min/max vs L2 ranges, and INT2 QAT, with paired bootstrap
intervals against FP32.

The case (built once, kept in ``benchmarks/.cache/ranges_quality``): 26 tables with the Criteo
Kaggle cardinalities capped at 200,000 rows (1.48M rows, dim 16), two multi-hot features, Zipf
ids, 13 dense features, a label from per-id effects plus 12 latent interactions
(:mod:`compress.data.synthetic`); a TorchRec ``DLRM`` (bottom 13-128-64-16, top 128-64-1) trained
one epoch in FP32 (Adagrad) on 1.2M samples; 300k validation samples, of which the report slice
(the last 80%) gives every number, as the main job reports them.

    .venv/bin/python benchmarks/bench_ranges_quality.py [--variants fp32 int4_minmax ...]
        [--samples 1500000] [--rebuild] [--json FILE]

Variants: ``int8_minmax``/``int8_l2`` (``int8_ptq`` with ``ranges`` set), ``int4_minmax``/
``int4_l2`` (``int4_rowwise_ptq``: INT4 row-wise PTQ, INT4 MLP, with ``ranges`` set),
``int2_minmax``/``int2_l2`` (the same at INT2: ``int2_rowwise_ptq``), ``int2_table_minmax``/
``int2_table_l2`` (INT2 table-wise PTQ), ``int2_qat`` (the built-in), and
``int2_qat_row_minmax``/``int2_qat_row_l2``/``int2_qat_table_minmax``/``int2_qat_table_l2``
(``int2_qat`` with other tables). Peak RSS is about 1.6 GB; the first run builds the case (about
17 minutes on 2 cores).
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
from benchmarks.common import KAGGLE_ROWS, cache_dir  # noqa: E402
from benchmarks.synthetic_case import DIM, ensure_case, load_case  # noqa: E402
from compress import pipeline  # noqa: E402
from compress.data.synthetic import SyntheticConfig, criteo_like_config  # noqa: E402
from compress.progress import set_enabled  # noqa: E402
from compress.recipe.parse import load_recipe, parse_recipe  # noqa: E402
from compress.recipe.toml_out import recipe_to_toml  # noqa: E402
from compress.train.evaluate import predict_logits  # noqa: E402
from compress.train.metrics import auc, logloss, sigmoid  # noqa: E402

CAP = 200_000
DEFAULT = [
    "fp32",
    "int4_minmax",
    "int4_l2",
    "int2_minmax",
    "int2_l2",
    "int2_table_minmax",
    "int2_table_l2",
    "int2_qat",
]


def case_config(samples: int) -> SyntheticConfig:
    """The Criteo-like preset with the Kaggle tables capped at :data:`CAP` rows instead of
    scaled, larger per-id effects and 12 latent interactions of weight 0.5."""
    return replace(
        criteo_like_config(samples),
        table_sizes=tuple(min(r, CAP) for r in KAGGLE_ROWS),
        id_effect=0.3,
        num_interactions=12,
        interaction_weight=0.5,
    )


def _rowwise(bits: int, ranges: str) -> str:
    """The built-in row-wise PTQ recipe of ``bits`` with its tables' ``ranges`` set."""
    name = {8: "int8_ptq", 4: "int4_rowwise_ptq", 2: "int2_rowwise_ptq"}[bits]
    recipe = load_recipe(name)
    rule = recipe.rules[0]
    config = replace(rule.config, ranges=ranges)
    return recipe_to_toml(replace(recipe, rules=(replace(rule, config=config),)))


def _tablewise_ptq(ranges: str) -> str:
    return (
        f'name = "int2_table_{ranges}"\n[[tables]]\nmatch = ["*"]\nmethod = "ptq"\nbits = 2\n'
        f'granularity = "table"\nranges = "{ranges}"\n[mlp]\nmethod = "ptq"\nbits = 4\n'
    )


def _qat(granularity: str, ranges: str) -> str:
    """``int2_qat`` with its tables' granularity and ranges replaced."""
    recipe = load_recipe("int2_qat")
    rules = parse_recipe(
        f'name = "x"\n[[tables]]\nmatch = ["*"]\nmethod = "qat"\nbits = 2\n'
        f'granularity = "{granularity}"\nranges = "{ranges}"\n[finetune]\nsteps = 1\n'
    ).rules
    return recipe_to_toml(replace(recipe, name=f"int2_qat_{granularity}_{ranges}", rules=rules))


def variant_recipe(name: str):
    """The recipe of a variant (a built-in name or TOML text)."""
    table = {
        "int8_minmax": lambda: _rowwise(8, "minmax"),
        "int8_l2": lambda: _rowwise(8, "l2"),
        "int4_minmax": lambda: _rowwise(4, "minmax"),
        "int4_l2": lambda: _rowwise(4, "l2"),
        "int2_minmax": lambda: _rowwise(2, "minmax"),
        "int2_l2": lambda: _rowwise(2, "l2"),
        "int2_table_minmax": lambda: _tablewise_ptq("minmax"),
        "int2_table_l2": lambda: _tablewise_ptq("l2"),
        "int2_qat": lambda: "int2_qat",
        "int2_qat_row_minmax": lambda: _qat("row", "minmax"),
        "int2_qat_row_l2": lambda: _qat("row", "l2"),
        "int2_qat_table_minmax": lambda: _qat("table", "minmax"),
        "int2_qat_table_l2": lambda: _qat("table", "l2"),
    }
    if name not in table:
        raise SystemExit(f"unknown variant {name!r} (one of fp32, {', '.join(table)})")
    made = table[name]()
    return made if made in ("int2_qat",) else parse_recipe(made, f"<{name}>")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=DEFAULT)
    ap.add_argument("--samples", type=int, default=1_500_000)
    ap.add_argument("--rebuild", action="store_true", help="build the case again")
    ap.add_argument("--root", type=Path, help="where the case is kept (default: the cache)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    set_enabled(False)
    root = args.root or cache_dir() / "ranges_quality"
    case = ensure_case(root, case_config(args.samples), args.rebuild)
    data = load_case(root)
    train, valid, report = data.train, data.valid, data.report
    job = pipeline.load(data.checkpoint)
    names = job.spec.feature_names
    fp32 = predict_logits(lambda b: job.module(b.dense, b.sparse), report, names)
    labels = report.labels
    rows, logits = [], {"fp32": fp32}
    for name in args.variants:
        t0 = time.perf_counter()
        if name == "fp32":
            rows.append(("fp32", job.spec.total_bytes, None, 0.0))
            continue
        plan = pipeline.plan(job, variant_recipe(name))
        result = pipeline.compress(job, plan, data=train, valid=valid)
        model = result.model
        logits[name] = predict_logits(lambda b, m=model: m(b.dense, b.sparse), report, names)
        before = result.metrics["before_finetune"]
        rows.append(
            (name, plan.bytes_after, before["auc"] if before else None, time.perf_counter() - t0)
        )
        print(f"  {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    base = auc(fp32, labels)
    print(
        f"case: 26 tables ({sum(case['table_sizes']):,} rows, dim {DIM}), {case['train']:,} train "
        f"/ {case['valid']:,} valid ({len(report):,} reported); Bayes AUC "
        f"{case['bayes_auc_valid']:.4f}; FP32 AUC {base:.4f}"
    )
    print(
        f"{'variant':<24}{'AUC':>8}{'vs FP32 [95% paired]':>30}{'log loss':>10}{'before FT':>11}"
        f"{'x smaller':>10}{'secs':>6}"
    )
    out = []
    for name, size, before, secs in rows:
        a = auc(logits[name], labels)
        ll = logloss(sigmoid(logits[name]), labels)
        diff = ""
        if name != "fp32":
            mean, lo, hi = paired_bootstrap(fp32, logits[name], labels)
            diff = f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}]"
        b = f"{before:.4f}" if before is not None else "-"
        ratio = job.spec.total_bytes / size
        print(f"{name:<24}{a:>8.4f}{diff:>30}{ll:>10.4f}{b:>11}{ratio:>10.1f}{secs:>6.0f}")
        out.append(
            {
                "variant": name,
                "auc": a,
                "logloss": ll,
                "before_finetune": before,
                "ratio": ratio,
                "seconds": secs,
            }
        )
    if "int2_qat" in logits:
        for ref in ("int2_l2", "int2_minmax"):
            if ref in logits:
                mean, lo, hi = paired_bootstrap(logits[ref], logits["int2_qat"], labels)
                print(f"int2_qat - {ref}: {mean:+.4f} [{lo:+.4f}, {hi:+.4f}]")
    if args.json:
        args.json.write_text(json.dumps({"case": case, "rows": out}, indent=2) + "\n")


if __name__ == "__main__":
    main()
