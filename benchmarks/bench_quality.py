"""Quality of every built-in recipe, ``--budget 100x`` / ``--budget 1000x`` and the fine-tuning
control on a Criteo-Kaggle-like synthetic case, with paired bootstrap intervals against FP32.

The case (:func:`compress.data.synthetic.criteo_like_config`, built by
``benchmarks/synthetic_case.py``): the 26 Criteo Kaggle tables scaled so the largest has 1M rows
(3.34M rows, dim 16), Zipf ids, two multi-hot features, a hidden label from the latent
interactions of every feature pair (factorization-machine style) plus small per-id effects; a
TorchRec ``DLRM`` (bottom 13-128-64-16, top 128-64-1) trained one epoch in FP32 on 1.2M samples;
300k validation samples, of which the report slice (the last 80%) gives every number, as the main
job reports them.

Every row runs the main job as users run it, in a fresh process:
``dqrm-compress --recipe R CKPT --data train.npz --valid valid.npz --json --control`` (``--budget
100x`` instead of ``--recipe`` for the budget rows), then scores the written artifacts with ONNX
Runtime (``exporters.Predictor``) on the report slice for the paired bootstrap. ``--control``
fine-tunes the FP32 checkpoint the same way (same steps, optimizer, data, seed); recipes whose
``[finetune]`` settings are equal share one control (the first of them runs it, it is
deterministic), and a recipe that does not fine-tune has the checkpoint as its control.

    .venv/bin/python benchmarks/bench_quality.py --keep [--only int4_qat robe_1000x ...]
        [--steps N] [--samples 1500000] [--rebuild] [--json FILE] [--table]

With ``--keep`` the case stays in ``benchmarks/.cache/quality`` and every finished row is stored
there (``results/``), so runs of a few rows at a time (``--only``) add up to the whole table; each
run prints every stored row of the same case (``--table``: print them, run nothing). Rows that
fine-tune are stored per ``--steps`` (a quick table: ``--steps 100``, a sixth of the default
epoch, fine-tuning and control alike); rows that do not are stored once and shown with any
``--steps``. A row that fails (``--budget`` missing from this ``dqrm-compress``, a bad recipe) is
printed as FAILED with the reason, and the command exits 1. The first run builds the case (about
15 minutes on 2 cores, peak RSS about 2 GB); each row's peak RSS is printed (the largest about 2-3
GB).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_demo_quality import paired_bootstrap  # noqa: E402
from benchmarks.common import cache_dir, cli, run_job  # noqa: E402
from benchmarks.synthetic_case import (  # noqa: E402
    DIM,
    RESAMPLES,
    CaseData,
    case_command,
    ensure_case,
    fp32_logits,
    load_case,
    served_logits,
)
from compress.data.synthetic import criteo_like_config  # noqa: E402
from compress.progress import set_enabled  # noqa: E402
from compress.recipe.builtin import builtin_names  # noqa: E402
from compress.recipe.parse import load_recipe  # noqa: E402
from compress.train.metrics import auc  # noqa: E402

#: Budget rows: the row name and the ``--budget`` value.
BUDGETS = {"budget_100x": "100x", "budget_1000x": "1000x"}


def all_rows() -> list[str]:
    """Every row: the built-in recipes (sorted), then the budgets."""
    return [*builtin_names(), *BUDGETS]


@dataclass
class Row:
    """One finished (or failed) row. ``seconds``: the job's own wall time (its control left
    out); ``control_from``: the row whose run measured this row's control."""

    name: str
    command: list[str]
    error: str | None = None
    metrics: dict = field(default_factory=dict)
    bytes_before: int | None = None
    bytes_after: int | None = None
    seconds: float | None = None
    control_seconds: float | None = None
    control_key: str | None = None
    control_from: str | None = None
    peak_rss: int | None = None
    served_auc: float | None = None
    #: the job's ``timings`` (seconds per stage) and its ``train`` record (steps, kept step)
    timings: dict = field(default_factory=dict)
    train: dict | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def finetune_key(recipe: str, steps: int | None) -> str | None:
    """What a built-in recipe's control depends on beyond the case: its ``[finetune]`` settings
    after ``--steps`` (``None``: the recipe does not fine-tune, its control is the checkpoint)."""
    ft = load_recipe(recipe).finetune
    if ft is None:
        return None
    if steps is not None:
        ft = dataclasses.replace(ft, steps=steps)
    text = json.dumps(dataclasses.asdict(ft), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def finetunes(name: str) -> bool:
    """Whether row ``name`` fine-tunes (its result then depends on ``--steps``)."""
    return name in BUDGETS or load_recipe(name).finetune is not None


class Store:
    """Finished rows and controls of one case (``<case>/results``; nothing kept without
    ``--keep``: then a temporary directory)."""

    def __init__(self, root: Path, case_id: str) -> None:
        self.root = root / case_id
        self.root.mkdir(parents=True, exist_ok=True)

    def save_row(self, row: Row, logits: np.ndarray | None) -> None:
        (self.root / f"{row.name}.json").write_text(json.dumps(row.to_json(), indent=1) + "\n")
        if logits is not None:
            np.save(self.root / f"{row.name}.logits.npy", logits)

    def rows(self) -> dict[str, tuple[Row, np.ndarray | None]]:
        out = {}
        for path in sorted(self.root.glob("*.json")):
            if path.name.startswith("control-"):
                continue
            row = Row(**json.loads(path.read_text()))
            logits_path = self.root / f"{row.name}.logits.npy"
            out[row.name] = (row, np.load(logits_path) if logits_path.is_file() else None)
        return out

    def control(self, key: str) -> dict | None:
        path = self.root / f"control-{key}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def save_control(self, key: str, record: dict) -> None:
        (self.root / f"control-{key}.json").write_text(json.dumps(record, indent=1) + "\n")


def failure(name: str, stderr: str, code: int) -> str:
    """The one-line reason a row's job failed."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else f"exit code {code}"
    if name in BUDGETS and "--budget" in stderr and "no such option" in stderr.lower():
        return (
            "this dqrm-compress has no --budget option (issue 14, item 4, not built yet): " + last
        )
    return last


def run_row(
    name: str, case: CaseData, work: Path, steps: int | None, store: Store
) -> tuple[Row, np.ndarray | None]:
    """Run one row's job through the CLI, score its artifacts with ONNX Runtime on the report
    slice, and store both (the control too, for the rows that share it)."""

    key = None if name in BUDGETS else finetune_key(name, steps)
    shared = store.control(key) if key is not None else None
    selector = ["--budget", BUDGETS[name]] if name in BUDGETS else ["--recipe", name]
    out = work / f"{name}.out"
    command = case_command(
        case, selector, out, steps, *([] if shared is not None else ["--control"])
    )
    row = Row(name=name, command=command, control_key=key)
    print(f"  {name}: {' '.join(command[len(cli()) :])}", flush=True)
    code, stdout, stderr, peak, wall = run_job(command, work)
    row.peak_rss = peak
    if code != 0:
        row.error = failure(name, stderr, code)
        row.seconds = wall
        print(f"  {name}: FAILED ({row.error})", flush=True)
        return row, None
    summary = json.loads(stdout)
    row.metrics = summary["metrics"]
    row.bytes_before, row.bytes_after = summary["bytes_before"], summary["bytes_after"]
    row.timings, row.train = summary["timings"], summary["train"]
    control_seconds = summary["timings"].get("control")
    row.seconds = summary["seconds"] - (control_seconds or 0.0)
    if shared is not None:
        row.metrics["control"] = shared["metrics"]
        row.control_from, row.control_seconds = shared["from"], shared["seconds"]
    else:
        row.control_from, row.control_seconds = name, control_seconds
        if key is not None:
            store.save_control(
                key, {"metrics": row.metrics["control"], "from": name, "seconds": control_seconds}
            )
    logits, row.served_auc, mismatch = served_logits(out, case, row.metrics["compressed"]["auc"])
    shutil.rmtree(out)
    row.error = mismatch
    store.save_row(row, logits)
    print(f"  {name}: {wall:.0f} s, peak RSS {peak / 1e9:.2f} GB", flush=True)
    return row, logits


def _signed(x: float | None) -> str:
    return "-" if x is None else f"{x:+.4f}"


def print_table(
    case: dict,
    fp32: np.ndarray,
    labels: np.ndarray,
    rows: dict[str, tuple[Row, np.ndarray | None]],
    order: list[str],
) -> list[dict]:
    """The quality table (and the issue's targets); the rows as JSON."""
    base = auc(fp32, labels)
    print(
        f"\ncase: 26 tables ({sum(case['table_sizes']):,} rows, dim {DIM}, largest "
        f"{max(case['table_sizes']):,}), {case['train']:,} train / {case['valid']:,} valid "
        f"({len(labels):,} reported); Bayes AUC {case['bayes_auc_valid']:.4f}; FP32 AUC {base:.4f}"
    )
    head = f"{'recipe':<18}{'AUC - FP32 [95% CI]':<32}{'AUC - control':>14}{'size ratio':>12}"
    print(f"{head}{'time':>8}{'peak RSS':>10}  control from")
    out, controls = [], {}
    for name in order:
        if name not in rows:
            continue
        row, logits = rows[name]
        if not row.ok or logits is None:
            print(f"{name:<18}FAILED: {row.error}")
            out.append({"recipe": name, "error": row.error, "command": row.command})
            continue
        mean, lo, hi = paired_bootstrap(fp32, logits, labels, n=RESAMPLES)
        compressed, control = row.metrics["compressed"]["auc"], row.metrics["control"]["auc"]
        ratio = row.bytes_before / row.bytes_after
        diff = f"{compressed - base:+.4f} [{lo:+.4f}, {hi:+.4f}]"
        print(
            f"{name:<18}{diff:<32}{compressed - control:>+14.4f}{ratio:>11.1f}x"
            f"{row.seconds:>7.0f}s{row.peak_rss / 1e9:>8.2f}GB  {row.control_from}"
        )
        if row.control_key is not None or name in BUDGETS:
            controls.setdefault(row.control_key or name, (row, []))[1].append(name)
        out.append(
            {
                "recipe": name,
                "auc": compressed,
                "auc_minus_fp32": compressed - base,
                "ci95": [lo, hi],
                "bootstrap_mean": mean,
                "auc_minus_control": compressed - control,
                "control_auc": control,
                "ratio": ratio,
                "bytes_after": row.bytes_after,
                "seconds": row.seconds,
                "peak_rss": row.peak_rss,
                "control_from": row.control_from,
                "command": row.command,
            }
        )
    for row, names in controls.values():
        control = row.metrics["control"]["auc"]
        secs = f"{row.control_seconds:.0f}s" if row.control_seconds is not None else "-"
        print(
            f"{'control':<18}{control - base:<+32.4f}{'':>14}{'1.0':>11}x{secs:>8}{'':>10}  "
            f"same fine-tuning as {', '.join(names)} (point value: not exported)"
        )
        out.append({"control_of": names, "auc": control, "auc_minus_fp32": control - base})
    print_targets(base, rows, labels)
    return out


def print_targets(base: float, rows: dict, labels: np.ndarray) -> None:
    """The issue's targets that the stored rows can decide."""

    def got(name: str) -> Row | None:
        row = rows.get(name, (None, None))[0]
        return row if row is not None and row.ok else None

    print("\ntargets (issue 14):")
    for name, limit, least, what in (
        ("int4_rowwise_ptq", 0.0002, 0, "INT4 row-wise PTQ within 0.0002 AUC of FP32"),
        ("mixed_int4_ptq", 0.0002, 0, "  the same, INT8 on tables < 10k rows and the MLP"),
        ("int2_rowwise_ptq", 0.001, 7.9, "INT2 row-wise PTQ within 0.001 AUC of FP32 at 8x"),
        ("mixed_int2_ptq", 0.001, 7.9, "  the same, INT4/INT8 on tables < 10k rows"),
        ("robe_1000x", 0.003, 150, "robe_1000x within 0.003 AUC of FP32 (>= 150x in total)"),
        ("mixed_robe_int4", 0.003, 150, "  mixed_robe_int4 (the same target)"),
        ("budget_100x", 0.001, 0, "--budget 100x within 0.001 AUC of FP32"),
        ("budget_1000x", 0.003, 0, "--budget 1000x within 0.003 AUC of FP32"),
    ):
        row = got(name)
        if row is None:
            print(f"  {what}: not measured")
            continue
        drop = base - row.metrics["compressed"]["auc"]
        ratio = row.bytes_before / row.bytes_after
        verdict = "met" if drop <= limit and ratio >= least else "MISSED"
        print(f"  {what}: {verdict} (AUC - FP32 {-drop:+.4f}, {ratio:.1f}x)")
    qat, ptq = got("int4_qat"), got("int4_ptq")
    if qat is None or ptq is None:
        print("  int4_qat recovers >= 90% of the INT4 PTQ loss against the control: not measured")
        return
    control = qat.metrics["control"]["auc"]
    loss = control - ptq.metrics["compressed"]["auc"]
    gained = qat.metrics["compressed"]["auc"] - ptq.metrics["compressed"]["auc"]
    if loss <= 0:
        print(
            f"  int4_qat recovery: INT4 PTQ loses nothing against the control ({-loss:+.4f}); "
            "nothing to recover"
        )
        return
    share = gained / loss
    print(
        f"  int4_qat recovers >= 90% of the INT4 PTQ loss against the control: "
        f"{'met' if share >= 0.9 else 'MISSED'} ({share:.0%}: control - int4_ptq {loss:+.4f}, "
        f"int4_qat - int4_ptq {gained:+.4f}; against FP32 "
        f"{gained / max(base - ptq.metrics['compressed']['auc'], 1e-12):.0%})"
    )
    before = (qat.metrics.get("before_finetune") or {}).get("auc")
    if before is not None and control > before:  # int4_qat's own storage, not fine-tuned
        own = (qat.metrics["compressed"]["auc"] - before) / (control - before)
        print(
            f"    against int4_qat's own storage before fine-tuning: {own:.0%} (control - "
            f"before {control - before:+.4f}, int4_qat - before "
            f"{qat.metrics['compressed']['auc'] - before:+.4f})"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", metavar="RECIPE", help="run these rows only")
    ap.add_argument("--steps", type=int, help="cap fine-tuning at N steps (the CLI's --steps)")
    ap.add_argument("--samples", type=int, default=1_500_000, help="samples of the case")
    ap.add_argument("--keep", action="store_true", help="keep the case and rows in the cache")
    ap.add_argument("--rebuild", action="store_true", help="build the case again")
    ap.add_argument("--json", type=Path, help="also write the table as JSON here")
    ap.add_argument(
        "--table", action="store_true", help="run nothing: print the rows stored with --keep"
    )
    args = ap.parse_args(argv)
    order = all_rows()
    if args.table and (args.only or not args.keep):
        raise SystemExit("--table prints the rows stored with --keep: give --keep, not --only")
    unknown = [r for r in args.only or () if r not in order]
    if unknown:
        raise SystemExit(f"--only: unknown rows {', '.join(unknown)} (rows: {', '.join(order)})")
    set_enabled(False)
    print(f"bench_quality.py {' '.join(argv if argv is not None else sys.argv[1:])}", flush=True)
    root = cache_dir() / "quality"
    built = not (root / "case.json").is_file() or args.rebuild
    case = ensure_case(root, criteo_like_config(args.samples), args.rebuild)
    data = load_case(root, with_train=False)
    case_id = hashlib.sha256((root / "case.json").read_bytes()).hexdigest()[:12]
    steps_tag = "" if args.steps is None else f"-steps{args.steps}"
    scratch = tempfile.TemporaryDirectory(dir=root, prefix=".run-")
    results = root / "results" if args.keep else Path(scratch.name) / "results"
    # rows that fine-tune depend on --steps; the others are stored once for the case
    tuned = Store(results, case_id + steps_tag)
    untuned = Store(results, case_id)
    fp32 = fp32_logits(data)
    failures: dict[str, tuple[Row, None]] = {}
    try:
        for name in [] if args.table else args.only or order:
            store = tuned if finetunes(name) else untuned
            row, _ = run_row(name, data, Path(scratch.name), args.steps, store)
            if not row.ok:
                failures[name] = (row, None)
        rows = {
            name: stored
            for store, tunes in ((untuned, False), (tuned, True))
            for name, stored in store.rows().items()
            if name in order and finetunes(name) == tunes
        }
        rows |= failures  # a failure now hides an older stored result
        table = print_table(case, fp32, data.report.labels, rows, order)
        if args.json:
            args.json.write_text(json.dumps({"case": case, "rows": table}, indent=1) + "\n")
    finally:
        scratch.cleanup()  # the artifacts, and the rows unless --keep
        if not args.keep and built:  # the case this run built; a kept one is left alone
            for f in ("dlrm.pt", "train.npz", "valid.npz", "case.json"):
                (root / f).unlink(missing_ok=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
