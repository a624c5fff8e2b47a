"""The ``dqrm-compress`` command line: the one place that ties the steps together.

``dqrm-compress CKPT --recipe R`` runs the main job; subcommands inspect, evaluate, plan and
verify. Every user mistake ends as one line on stderr and exit code 2 (``--debug`` shows the
traceback); ``--json`` prints one JSON document on stdout for pipelines.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import click

from compress import __version__, progress
from compress.errors import ArtifactError, DqrmError, ModelConfigError
from compress.io.summary import checkpoint_summary, format_bytes


class _DefaultCommandGroup(click.Group):
    """A group that runs ``default_command`` when the first argument is not a subcommand.

    So ``dqrm-compress --recipe int4_qat ckpt.pt`` means ``dqrm-compress compress --recipe ...``.
    """

    default_command = "compress"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        first = next((a for a in args if not a.startswith("-")), None)
        wants_help = any(a in ("--help", "-h", "--version") for a in args) and first is None
        group_flags = {"--debug", "--no-progress"}
        routed = args and not wants_help and (first is None or first not in self.commands)
        if routed and any(a not in group_flags for a in args):
            lead = [a for a in args if a in group_flags]
            rest = [a for a in args if a not in group_flags]
            args = [*lead, self.default_command, *rest]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultCommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dqrm-compress")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("--no-progress", is_flag=True, help="Never draw progress bars.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, no_progress: bool) -> None:
    """Compress trained TorchRec DLRM checkpoints.

    \b
    dqrm-compress --recipe int4_qat ckpt.pt     # the main job (same as `compress`)
    dqrm-compress inspect ckpt.pt               # what is in a checkpoint
    dqrm-compress eval ckpt.pt --data day_0.gz  # AUC / log loss / accuracy
    dqrm-compress eval OUT_DIR --data day_0.gz  # the same, artifacts served by ONNX Runtime
    dqrm-compress verify OUT_DIR                # checksums of an artifact directory
    dqrm-compress demo                          # build the demo model and run the main job
    """
    ctx.obj = {"debug": debug}
    if no_progress:
        progress.set_enabled(False)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that the same clean-up runs (partial
    output removed, fine-tuning state kept); ``main`` then exits with 143 (128 + SIGTERM)."""


def _on_sigterm(signum: int, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: maps :class:`DqrmError` to one line on stderr and exit code 2;
    Ctrl-C to "interrupted" and 130, SIGTERM to "terminated" and 143, both after cleaning up."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    # torch.fx logs a deprecation notice on every TorchRec forward; it says nothing to our users
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        cli.main(args=argv, prog_name="dqrm-compress", standalone_mode=False)
    except DqrmError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        return e.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt) as e:  # click turns Ctrl-C into Abort
        if isinstance(e, Terminated) or isinstance(e.__cause__, Terminated):
            click.echo("terminated", err=True)
            return 143
        click.echo("interrupted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return 0


def _emit_json(obj: dict) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


model_config_option = click.option(
    "--model-config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="JSON naming each table's features (and optionally order and shapes); see README.",
)
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON document on stdout."
)


# --------------------------------------------------------------------------------------------
# inspect


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@model_config_option
@click.option(
    "--write-config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write a model-config template (tables in order, their features and shapes) to this "
    "new file; edit it, then put it beside the checkpoint or pass it with --model-config.",
)
@json_option
def inspect(
    checkpoint: Path, model_config: Path | None, write_config: Path | None, as_json: bool
) -> None:
    """Show a checkpoint's model class, tables, MLP layers and sizes (reads shapes only)."""
    from compress.io.model import read_spec, read_spec_for_template, write_model_config

    config = _config_or_sidecar(checkpoint, model_config)
    if write_config is None:
        ckpt, spec = read_spec(checkpoint, config)
    else:
        ckpt, spec, problem = read_spec_for_template(checkpoint, config)
        write_model_config(write_config, spec)
        fix = f"; edit it before use: {problem}" if problem else ""
        click.echo(f"wrote model config {write_config}{fix}", err=True)
    summary = checkpoint_summary(ckpt, spec)
    if as_json:
        _emit_json(summary)
        return
    click.echo(f"{summary['checkpoint']}  ({summary['format']})")
    click.echo(f"model: {summary['model']}  interaction: {summary['interaction']}")
    click.echo(
        f"dense features: {spec.dense_in_features}   sparse features: {spec.num_sparse_features}"
    )
    click.echo(
        f"bottom MLP: {spec.dense_in_features}-" + "-".join(map(str, spec.dense_arch_layer_sizes))
    )
    click.echo("top MLP:    " + "-".join(map(str, spec.over_arch_layer_sizes)))
    rows = [
        (
            t["name"],
            ",".join(t["feature_names"]),
            t["num_embeddings"],
            t["embedding_dim"],
            t["bytes"],
        )
        for t in summary["tables"]
    ]
    w = max(len(r[0]) for r in rows)
    fw = max(8, max(len(r[1]) for r in rows))
    click.echo(f"\n{'table':<{w}}  {'features':<{fw}}  {'rows':>12}  {'dim':>4}  {'bytes':>12}")
    for name, feats, n, d, b in rows:
        click.echo(f"{name:<{w}}  {feats:<{fw}}  {n:>12,}  {d:>4}  {format_bytes(b):>12}")
    click.echo(
        f"\nembedding: {format_bytes(summary['embedding_bytes'])}   dense: "
        f"{format_bytes(summary['dense_bytes'])}   total: {format_bytes(summary['total_bytes'])}"
    )


def _config_or_sidecar(checkpoint: Path, model_config: Path | None) -> Path | None:
    """An explicit --model-config, else ``model_config.json`` inside a DCP directory or beside the
    checkpoint if present (:func:`compress.io.model.find_model_config`)."""
    from compress.io.model import find_model_config

    return model_config if model_config is not None else find_model_config(checkpoint)


# --------------------------------------------------------------------------------------------
# eval


dense_transform_option = click.option(
    "--dense-transform",
    type=click.Choice(["log3", "none"]),
    default=None,
    help="How raw Criteo text's dense counts become model inputs: log3 = log(max(x, -2) + 3), none "
    "= as is. Default: an artifact directory's recorded transform, else log3. Stored formats "
    "(.npz, npy days) keep their own and must agree.",
)


def data_options(f):
    f = click.option(
        "--on-bad-line",
        type=click.Choice(["error", "skip"]),
        default="error",
        show_default=True,
        help="What to do with a malformed line of Criteo text data.",
    )(f)
    f = click.option("--batch-size", type=click.IntRange(min=1), default=4096, show_default=True)(f)
    return f


@cli.command(name="eval")
@click.argument("model_path", metavar="CHECKPOINT|ARTIFACTS", type=click.Path(path_type=Path))
@click.option(
    "--data",
    "data_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Criteo TSV (.gz) file or directory, TorchRec npy day directory, or project .npz.",
)
@model_config_option
@data_options
@click.option(
    "--out-of-range",
    type=click.Choice(["error", "row0"]),
    default="error",
    show_default=True,
    help="Artifact directories: what to do with a row id outside its table: refuse it, or read "
    "row 0 of that table (what the ONNX graph and FBGEMM's bounds check do).",
)
@dense_transform_option
@json_option
def eval_cmd(
    model_path: Path,
    data_path: Path,
    model_config: Path | None,
    on_bad_line: str,
    batch_size: int,
    as_json: bool,
    out_of_range: str = "error",
    dense_transform: str | None = None,
) -> None:
    """Score a checkpoint, or an artifact directory with ONNX Runtime (after checking every
    checksum), on labelled data: AUC, log loss, accuracy."""
    from compress.data.formats import open_dataset
    from compress.io.model import load_model
    from compress.train.evaluate import evaluate_model

    if _is_artifact_dir(model_path):
        from exporters.runtime.predictor import Predictor

        if model_config is not None:
            raise ModelConfigError(
                f"{model_config}: --model-config applies to checkpoints; the artifact directory "
                f"{model_path} carries its own feature names in manifest.json"
            )
        predictor = Predictor(
            model_path,
            batch_size=batch_size,
            out_of_range=out_of_range,
            dense_transform=dense_transform,
        )
        t0 = time.perf_counter()
        metrics = {
            **predictor.evaluate(data_path, on_bad_line=on_bad_line),
            "runtime": predictor.runtime,
        }
    else:
        loaded = load_model(model_path, _config_or_sidecar(model_path, model_config))
        t0 = time.perf_counter()
        data = open_dataset(
            data_path, loaded.spec, on_bad_line=on_bad_line, dense_transform=dense_transform
        )
        metrics = evaluate_model(loaded.module, data, loaded.spec.feature_names, batch_size)
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    if as_json:
        _emit_json(metrics)
    else:
        click.echo(_format_metrics(metrics))


def _format_metrics(m: dict) -> str:
    return f"auc {m['auc']:.4f}   logloss {m['logloss']:.4f}   accuracy {m['accuracy']:.4f}   n {m['n']:,}"


def _is_artifact_dir(path: Path) -> bool:
    """An exported artifact directory (its manifest, or at least its tables folder) rather than a
    checkpoint."""
    return path.is_dir() and ((path / "manifest.json").exists() or (path / "tables").is_dir())


# --------------------------------------------------------------------------------------------
# verify


@cli.command()
@click.argument("artifacts_dir", metavar="ARTIFACTS", type=click.Path(path_type=Path))
@click.option(
    "--parity",
    is_flag=True,
    help="Also re-run the ONNX Runtime parity check here (this host's ORT version) on the inputs "
    "and reference logits stored at export; fails above the manifest's tolerance.",
)
@json_option
def verify(artifacts_dir: Path, parity: bool, as_json: bool) -> None:
    """Check an artifact directory: its manifest (digest, schema, paths inside the directory), the
    sha256 of every file and no file it does not list, every array's dtype and shape. Exit code 2
    and one line naming the file when it is not intact (--json lists every problem)."""
    from exporters.artifacts.read import inspect_artifacts, raise_first

    checked = inspect_artifacts(artifacts_dir)
    problems = checked.problems
    files = len(checked.manifest.files) if not problems else None
    for warning in checked.warnings:
        click.echo(f"warning: {warning}", err=True)
    report = None
    if parity and not problems:
        from exporters.onnx.parity import ParityError, parity_report

        report = parity_report(artifacts_dir)
    if as_json:
        doc = {
            "ok": not problems,
            "path": str(artifacts_dir),
            "files": files,
            "problems": problems,
            "warnings": checked.warnings,
        }
        if report is not None:
            doc.update(ok=report["ok"], parity=report)
        _emit_json(doc)
    raise_first(problems)
    if report is not None and not report["ok"]:
        raise ParityError(report["problem"])
    if not as_json:
        click.echo(f"ok: {files} files verified")
        if report is not None:
            click.echo(
                f"parity: max |diff| {report['max_abs_diff']:.3g} <= {report['atol']:g} "
                f"(onnxruntime {report['runtime']}, {len(report['sets'])} sets, plain and serving "
                "sessions)"
            )


# --------------------------------------------------------------------------------------------
# recipes, plan


@cli.command()
@json_option
def recipes(as_json: bool) -> None:
    """List the built-in recipes."""
    from compress.recipe.parse import builtin_recipes

    items = builtin_recipes()
    if as_json:
        _emit_json({"recipes": [{"name": n, "description": d} for n, d in items]})
        return
    width = max(len(n) for n, _ in items)
    for name, description in items:
        click.echo(f"{name:<{width}}  {description}")


recipe_option = click.option(
    "--recipe",
    "-r",
    required=True,
    metavar="NAME|FILE.toml",
    help="A built-in recipe name (see `dqrm-compress recipes`) or a path to a recipe TOML file.",
)


@cli.command()
@recipe_option
@click.argument("checkpoint", type=click.Path(path_type=Path))
@model_config_option
@json_option
def plan(recipe: str, checkpoint: Path, model_config: Path | None, as_json: bool) -> None:
    """Show what a recipe does to each table, with exact bytes before/after (reads no data)."""
    from compress import pipeline
    from compress.plan import format_plan

    job = pipeline.load(checkpoint, _config_or_sidecar(checkpoint, model_config))
    the_plan = pipeline.plan(job, recipe)
    if as_json:
        _emit_json(the_plan.to_json())
    else:
        click.echo(format_plan(the_plan))


# --------------------------------------------------------------------------------------------
# compress (the main job)


@cli.command(name="compress")
@recipe_option
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option(
    "--data",
    "data_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Training data (Criteo TSV/.gz file or directory, TorchRec npy days, or .npz). "
    "Without it, QAT recipes distil from the original model.",
)
@click.option(
    "--valid",
    "valid_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Validation data; default: the last 20% of --data. Its first 20% chooses the kept "
    "fine-tuning step; every reported metric is on the other 80%.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output directory; default: <checkpoint dir>/<checkpoint name>.<recipe>/",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1, max=2**63 - 1),
    default=None,
    help="Fine-tuning steps (overrides the recipe).",
)
@click.option(
    "--resume", is_flag=True, help="Continue an interrupted fine-tuning run with the same settings."
)
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option(
    "--on-bad-line",
    type=click.Choice(["error", "skip"]),
    default="error",
    show_default=True,
    help="What to do with a malformed line of Criteo text data.",
)
@click.option(
    "--max-auc-drop",
    type=click.FloatRange(min=0),
    default=None,
    metavar="X",
    help="Fail (exit code 3, nothing written) when the compressed AUC is more than X below the "
    "baseline.",
)
@click.option(
    "--keep-failed",
    is_flag=True,
    help="With --max-auc-drop: write the artifacts even when the check fails (still exit 3).",
)
@dense_transform_option
@model_config_option
@json_option
def compress_cmd(
    recipe: str,
    checkpoint: Path,
    data_path: Path | None,
    valid_path: Path | None,
    out_dir: Path | None,
    steps: int | None,
    resume: bool,
    force: bool,
    on_bad_line: str,
    model_config: Path | None,
    as_json: bool,
    max_auc_drop: float | None = None,
    keep_failed: bool = False,
    dense_transform: str | None = None,
) -> None:
    """Compress CHECKPOINT following a recipe: plan, quantize, fine-tune, evaluate, write artifacts."""
    started = time.perf_counter()
    from compress import pipeline
    from compress.errors import ArtifactError, CheckpointError, DataError, QualityGateError
    from compress.plan import format_plan
    from compress.timings import StageTimer
    from exporters.export import export

    say = (lambda *a, **k: None) if as_json else (lambda msg="": click.echo(msg, err=True))
    for path in (data_path, valid_path):
        if path is not None and not path.exists():
            raise DataError(f"{path}: no such file or directory")
    if not checkpoint.exists():
        raise CheckpointError(f"{checkpoint}: no such file or directory")
    out_dir = out_dir or _default_out_dir(checkpoint, recipe)
    if max_auc_drop is not None and data_path is None and valid_path is None:
        raise DataError(
            "--max-auc-drop needs validation data to measure AUC: give --valid or --data"
        )
    _hold_output(out_dir, say)  # before loading anything: a second run on --out stops here
    timer = StageTimer()
    with timer("load"):
        job = pipeline.load(checkpoint, _config_or_sidecar(checkpoint, model_config))
    with timer("plan"):
        the_plan = pipeline.plan(job, recipe)
    if out_dir.exists() and not force:
        raise ArtifactError(f"{out_dir}: already exists (use --force to replace it, or --out)")
    if out_dir.exists():
        _check_replaceable(out_dir, [checkpoint, data_path, valid_path, model_config])
    state_path = out_dir.parent / f".{out_dir.name}.train-state.pt"
    say(format_plan(the_plan))
    say()

    def log(entry: dict) -> None:
        m = entry.get("metrics")
        scores = f"  selection auc {m['auc']:.4f} logloss {m['logloss']:.4f}" if m else ""
        loss = f"loss {entry['loss']:.4f}" if entry["loss"] is not None else "(before fine-tuning)"
        say(
            f"step {entry['step']:>6}  {loss}{scores}  {entry['samples_per_second']:,.0f} samples/s"
        )

    result = pipeline.compress(
        job,
        the_plan,
        data=data_path,
        valid=valid_path,
        steps=steps,
        state_path=state_path,
        resume=resume,
        log=log,
        on_bad_line=on_bad_line,
        dense_transform=dense_transform,
    )
    failure = auc_drop_failure(result.metrics, max_auc_drop)
    if failure is not None and not keep_failed:
        raise QualityGateError(f"{failure}; nothing written to {out_dir} (--keep-failed writes it)")
    export_started = time.perf_counter()
    written = export(result, out_dir, force=force, timer=timer)
    timer.add("export", time.perf_counter() - export_started - timer.seconds.get("parity", 0.0))
    state_path.unlink(missing_ok=True)
    summary = {
        "out": str(written.path),
        "recipe": the_plan.recipe_name,
        "bytes_before": the_plan.bytes_before,
        "bytes_after": written.manifest["bytes"]["tables"] + written.manifest["bytes"]["dense"],
        "bytes_planned": the_plan.bytes_after,
        "ratio": the_plan.bytes_before / the_plan.bytes_after,
        "metrics": result.metrics,
        "metrics_on": None
        if result.data.get("report") is None
        else {"slice": result.data["report"], "rows": result.metrics["baseline"]["n"]},
        "max_auc_drop": max_auc_drop,
        "notes": result.notes,
        "onnx_max_abs_diff": (written.manifest.get("onnx") or {})
        .get("parity", {})
        .get("max_abs_diff"),
        "train": None
        if result.train is None
        else {
            **written.manifest["train"],
            "resumed_from": result.train.resumed_from,  # not in the manifest (reproducibility)
            "seconds": round(result.train.seconds, 3),
            "samples_per_second": round(result.train.samples_per_second, 1),
        },
        "timings": stage_timings({**timer.seconds, **result.timings}),
        "seconds": round(time.perf_counter() - started, 3),
    }
    if as_json:
        _emit_json(summary)
    else:
        for note in result.notes:
            say(note if note.startswith("warning: ") else f"note: {note}")
        click.echo(_format_before_after(summary))
    if failure is not None:
        raise QualityGateError(f"{failure}; artifacts kept in {written.path} (--keep-failed)")


#: The stages of the main job, in the order ``timings`` lists them.
STAGES = ("load", "plan", "data", "evaluate", "quantize", "finetune", "convert", "export", "parity")


def stage_timings(seconds: dict[str, float]) -> dict[str, float]:
    """Seconds per stage in :data:`STAGES` order, in whole milliseconds rounded down (so that they
    never add up to more than the command's ``seconds``)."""
    from compress.timings import StageTimer

    ordered = sorted(seconds, key=lambda k: STAGES.index(k) if k in STAGES else len(STAGES))
    return StageTimer({k: seconds[k] for k in ordered}).rounded()


def auc_drop_failure(metrics: dict, max_auc_drop: float | None) -> str | None:
    """The one-line reason ``--max-auc-drop`` fails (``None`` when it passes or is not set): the
    compressed AUC more than ``max_auc_drop`` below the baseline's, both on the report slice."""
    if max_auc_drop is None:
        return None
    baseline, compressed = metrics.get("baseline"), metrics.get("compressed")
    if baseline is None or compressed is None:
        return "--max-auc-drop: no validation data, AUC not measured"
    drop = baseline["auc"] - compressed["auc"]
    if drop <= max_auc_drop:
        return None
    return (
        f"compressed AUC {compressed['auc']:.4f} is {drop:.4f} below the baseline "
        f"{baseline['auc']:.4f}, more than --max-auc-drop {max_auc_drop:g}"
    )


def _default_out_dir(checkpoint: Path, recipe: str) -> Path:
    """``<checkpoint dir>/<checkpoint name>.<recipe name>``."""
    from compress.recipe.parse import load_recipe

    return checkpoint.parent / f"{checkpoint.name.split('.')[0]}.{load_recipe(recipe).name}"


def _hold_output(out_dir: Path, say) -> None:
    """Hold ``.<out>.lock`` until this command ends (a second run on the same ``--out`` is refused
    at its start, not after training), then tidy what a killed run on ``out`` left behind
    (:mod:`exporters.artifacts.atomic_dir`)."""
    from exporters.artifacts import atomic_dir

    lock = atomic_dir.output_lock(out_dir)
    click.get_current_context().call_on_close(lock.release)
    if atomic_dir.recover(out_dir).restored is not None:
        say(f"note: {out_dir}: put back the previous output that a killed run was replacing")


def _slice_lines(s: dict) -> list[str]:
    """Which validation rows the metrics are on and which chose the kept fine-tuning step."""
    lines = []
    if s.get("metrics_on"):
        on = s["metrics_on"]
        lines.append(f"metrics on {on['slice']} ({on['rows']:,} rows, never used for selection)")
    train = s.get("train") or {}
    if train.get("selected_on"):
        sel = train["selected_on"]
        lines.append(
            f"kept fine-tuning step {train['best_step']} of {train['steps']}: best {sel['metric']} "
            f"on {sel['slice']} ({sel['rows']:,} rows)"
        )
    return lines


def _check_replaceable(out_dir: Path, inputs: list) -> None:
    """``--force`` replaces only an artifact directory (or an empty one), never one that holds an
    input of this run: anything else at ``--out`` would be deleted with it."""
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise ArtifactError(
            f"{out_dir}: not a directory; --force replaces only artifact directories"
        )
    out = out_dir.resolve()
    for item in inputs:
        if item is None:
            continue
        src = Path(item).resolve()
        if src == out or out in src.parents:
            raise ArtifactError(f"{out_dir}: holds the input {item}; choose another --out")
    if any(out_dir.iterdir()) and not (out_dir / "manifest.json").is_file():
        raise ArtifactError(
            f"{out_dir}: not an artifact directory (no manifest.json); --force replaces only "
            "artifact directories, so move it or choose another --out"
        )


def _format_before_after(s: dict) -> str:
    rows = [("baseline (FP32)", s["metrics"]["baseline"], s["bytes_before"])]
    if s["metrics"].get("before_finetune") is not None:
        rows.append(
            ("compressed, before fine-tuning", s["metrics"]["before_finetune"], s["bytes_after"])
        )
    rows.append((f"compressed ({s['recipe']})", s["metrics"]["compressed"], s["bytes_after"]))
    lines = [f"{'model':<32}{'auc':>8}{'logloss':>9}{'accuracy':>10}{'size':>13}"]
    for name, m, size in rows:
        if m is None:
            lines.append(f"{name:<32}{'-':>8}{'-':>9}{'-':>10}{format_bytes(size):>13}")
        else:
            lines.append(
                f"{name:<32}{m['auc']:>8.4f}{m['logloss']:>9.4f}{m['accuracy']:>10.4f}"
                f"{format_bytes(size):>13}"
            )
    lines += _slice_lines(s)
    lines.append(f"ratio {s['ratio']:.2f}x   artifacts: {s['out']}")
    if s.get("onnx_max_abs_diff"):
        worst = max(s["onnx_max_abs_diff"].values())
        lines.append(
            f"ONNX Runtime parity: max |logit difference| vs PyTorch {worst:.2g} (limit 1e-5)"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# demo


@cli.command()
@click.option(
    "--dir",
    "demo_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo"),
    show_default=True,
    help="Where the demo checkpoint and data live.",
)
@click.option(
    "--recipe",
    "-r",
    default="int4_qat",
    show_default=True,
    metavar="NAME|FILE.toml",
    help="The recipe the main job runs on the demo.",
)
@click.option(
    "--rebuild", is_flag=True, help="Build the demo model and data again even if they exist."
)
@click.option(
    "--samples",
    type=click.IntRange(min=3000),  # training needs one batch of 2048 after the 20% holdout
    default=None,
    hidden=True,
    help="When building: a shrunken demo of this many samples, tables of at most as many rows "
    "(a smoke run; the tests use it).",
)
@json_option
def demo(
    demo_dir: Path, recipe: str, rebuild: bool, as_json: bool, samples: int | None = None
) -> None:
    """Build the demo DLRM if missing (synthetic data, ~1 min of FP32 training), then run the
    main job on it: `dqrm-compress --recipe int4_qat demo/dlrm.pt --data demo/train.npz ...`."""
    from compress.demo import build_demo, demo_paths

    paths = demo_paths(demo_dir)
    if rebuild or not paths.complete():
        click.echo(
            f"building the demo in {demo_dir}/ (synthetic data, FP32 training) ...", err=True
        )
        report = build_demo(demo_dir, num_samples=samples)
        click.echo(
            f"demo built: valid AUC {report['valid_auc']:.4f}, Bayes AUC {report['bayes_auc']:.4f} "
            f"(the best reachable), trained in {report['train_seconds']:.0f}s",
            err=True,
        )
    out = demo_dir / f"dlrm.{Path(recipe).stem}"
    click.echo(
        f"\n$ dqrm-compress --recipe {recipe} {paths.checkpoint} --data {paths.train} "
        f"--valid {paths.valid} --out {out} --force\n",
        err=True,
    )
    click.get_current_context().invoke(
        compress_cmd,
        recipe=recipe,
        checkpoint=paths.checkpoint,
        data_path=paths.train,
        valid_path=paths.valid,
        out_dir=out,
        steps=None,
        resume=False,
        force=True,
        on_bad_line="error",
        model_config=None,
        as_json=as_json,
        max_auc_drop=None,
        keep_failed=False,
    )
