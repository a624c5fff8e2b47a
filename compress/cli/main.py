"""The ``dqrm-compress`` command line: the one place that ties the steps together.

``dqrm-compress CKPT --recipe R`` runs the main job; subcommands inspect, evaluate, plan,
verify and report. Every user mistake ends as one line on stderr and exit code 2 (``--debug``
shows the traceback); ``--json`` prints one JSON document on stdout for pipelines.

This module holds the command group, :func:`main` (errors, Ctrl-C and SIGTERM to exit codes) and
the main job (``compress``); the other commands live in a module each (``inspect_cmd``,
``eval_cmd``, ``verify_cmd``, ``plan_cmd`` for ``recipes`` and ``plan``, ``demo_cmd``,
``report_cmd``), the options they share in :mod:`compress.cli.common`, and the main job's output
directory and report in :mod:`compress.cli.job_output` and :mod:`compress.cli.job_report`.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import click

from compress import __version__
from compress.cli import verbosity
from compress.cli.budget_options import job_recipe, plan_job, recipe_or_budget_options
from compress.cli.common import (
    config_or_sidecar,
    dense_transform_option,
    emit_json,
    json_option,
    model_config_option,
)
from compress.cli.demo_cmd import demo
from compress.cli.distributed_options import distributed_options
from compress.cli.eval_cmd import eval_cmd
from compress.cli.inspect_cmd import inspect
from compress.cli.job_output import check_replaceable, default_out_dir
from compress.cli.job_report import auc_drop_failure, format_before_after, stage_timings
from compress.cli.loader_options import columns_option, loader_options, loader_settings
from compress.cli.plan_cmd import plan, recipes
from compress.cli.report_cmd import report
from compress.cli.verify_cmd import verify
from compress.data.stream import SHUFFLE_ROWS
from compress.errors import DqrmError
from compress.io.model_spec import precision_label
from compress.train.config import MAX_STEPS
from compress.train.distributed.worker import error_kind
from compress.train.distributed.worker import report as report_failure


class _DefaultCommandGroup(click.Group):
    """A group that runs ``default_command`` when the first argument is not a subcommand.

    So ``dqrm-compress --recipe int4_qat ckpt.pt`` means ``dqrm-compress compress --recipe ...``.
    """

    default_command = "compress"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        first = next((a for a in args if not a.startswith("-")), None)
        wants_help = any(a in ("--help", "-h", "--version") for a in args) and first is None
        group_flags = {"--debug", "--no-progress", "--quiet", "-q", "--verbose", "-v"}
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
@click.option(
    "--quiet",
    "-q",
    is_flag=True,
    help="Print only warnings, errors and the result: no progress bars, plan or step lines.",
)
@click.option(
    "--verbose",
    "-v",
    is_flag=True,
    help="Also print every log record (each stage, each evaluation) with time and logger name.",
)
@click.pass_context
def cli(
    ctx: click.Context, debug: bool, no_progress: bool, quiet: bool = False, verbose: bool = False
) -> None:
    """Compress trained TorchRec DLRM checkpoints.

    \b
    dqrm-compress --recipe int4_qat ckpt.pt     # the main job (same as `compress`)
    dqrm-compress inspect ckpt.pt               # what is in a checkpoint
    dqrm-compress eval ckpt.pt --data day_0.gz  # AUC / log loss / accuracy
    dqrm-compress eval OUT_DIR --data day_0.gz  # the same, artifacts served by ONNX Runtime
    dqrm-compress verify OUT_DIR                # checksums of an artifact directory
    dqrm-compress report OUT_DIR --out r.html   # the artifacts as one HTML page
    dqrm-compress demo                          # build the demo model and run the main job
    """
    ctx.obj = {**(ctx.obj or {}), "debug": debug}  # main() put its arguments there ("argv")
    level = verbosity.level_of(quiet, verbose)
    ctx.call_on_close(verbosity.configure(level, progress_bars=not no_progress))


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that the same clean-up runs (partial
    output removed, fine-tuning state kept); ``main`` then exits with 143 (128 + SIGTERM)."""


def _on_sigterm(signum: int, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: maps :class:`DqrmError` to one line on stderr and exit code 2;
    Ctrl-C to "interrupted" and 130, SIGTERM to "terminated" and 143, both after cleaning up."""
    args = list(argv) if argv is not None else sys.argv[1:]
    debug = "--debug" in args
    # torch.fx logs a deprecation notice on every TorchRec forward; it says nothing to our users
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        cli.main(args=args, prog_name="dqrm-compress", standalone_mode=False, obj={"argv": args})
    except DqrmError as e:
        if debug:
            raise
        if report_failure(error_kind(e), str(e), e.exit_code):  # a worker: for its launcher
            click.echo(f"error: {e}", err=True)
        return e.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt) as e:  # click turns Ctrl-C into Abort
        if isinstance(e, Terminated) or isinstance(e.__cause__, Terminated):
            if report_failure("terminated", "terminated", 143):
                click.echo("terminated", err=True)
            return 143
        if report_failure("interrupted", "interrupted", 130):
            click.echo("interrupted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return 0


@cli.command(name="compress")
@recipe_or_budget_options
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option(
    "--data",
    "data_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Training data (Criteo TSV/.gz file or directory, TorchRec npy days, Parquet file or "
    "directory (see --columns), or .npz). "
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
    type=click.IntRange(min=1, max=MAX_STEPS),
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
@click.option(
    "--chunk-rows",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Rows read at a time when a whole table is checked, quantized or projected (default: "
    "4 MiB of float32 a chunk, 65,536 rows at dim 16): what bounds their memory.",
)
@click.option(
    "--control",
    is_flag=True,
    help="Also run the same fine-tuning (steps, optimizer, data, seed) on the uncompressed "
    "model and report it as metrics.control: the cost of compression apart from the benefit of "
    "the extra training.",
)
@dense_transform_option
@loader_options
@columns_option
@model_config_option
@distributed_options
@json_option
def compress_cmd(
    recipe: str | None,
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
    stream: str = "auto",
    loader_workers: int | None = None,
    shuffle_rows: int = SHUFFLE_ROWS,
    chunk_rows: int | None = None,
    nproc: int = 1,
    device: str = "cpu",
    max_restarts: int = 0,
    control: bool = False,
    budget: str | None = None,
    columns: Path | None = None,
) -> None:
    """Compress CHECKPOINT following a recipe (or into a size budget, --budget): plan, quantize,
    fine-tune, evaluate, write artifacts."""
    started = time.perf_counter()
    from compress import pipeline
    from compress.cli import job_distributed
    from compress.errors import (
        ArtifactError,
        CheckpointError,
        DataError,
        QualityGateError,
        SettingError,
    )
    from compress.io.table_stream import chunking
    from compress.plan import format_plan
    from compress.timings import StageTimer
    from exporters.artifacts.manifest_schema import QualityGateEntry
    from exporters.export import export

    quiet = as_json or verbosity.quiet()  # --quiet: warnings, errors and the result only
    say = (lambda *a, **k: None) if quiet else (lambda msg="": click.echo(msg, err=True))
    role = job_distributed.role(nproc, max_restarts)  # single, launcher of --nproc, or worker
    job_distributed.check_device(role, device, nproc)
    the_recipe = job_recipe(recipe, budget, role)  # --recipe's, or --budget's to choose from data
    for path in (data_path, valid_path):
        if path is not None and not path.exists():
            raise DataError(f"{path}: no such file or directory")
    if not checkpoint.exists():
        raise CheckpointError(f"{checkpoint}: no such file or directory")
    out_dir = out_dir or default_out_dir(checkpoint, the_recipe)
    if max_auc_drop is not None and data_path is None and valid_path is None:
        raise DataError(
            "--max-auc-drop needs validation data to measure AUC: give --valid or --data"
        )
    state_path = out_dir.parent / f".{out_dir.name}.train-state.pt"
    if control and role == "launcher":  # workers started by torchrun: compress() refuses it
        raise SettingError(
            f"--control runs in one process: it cannot be combined with --nproc {nproc}"
        )
    if role == "launcher":  # the workers run the job with these arguments; rank 0 prints
        job_distributed.check_trains(recipe)
        if out_dir.exists() and not force:
            raise ArtifactError(f"{out_dir}: already exists (use --force to replace it, or --out)")
        argv = click.get_current_context().find_root().obj["argv"]
        job_distributed.launch(argv, nproc, max_restarts, resume, state_path)
        return
    workers = job_distributed.start_worker(device, nproc) if role == "worker" else None
    if workers is not None and not workers.is_main:
        say = lambda *a, **k: None  # noqa: E731 - rank 0 alone prints
    # before loading anything: a second run on --out stops here
    job_distributed.hold_output(workers, out_dir, say)
    timer = StageTimer()
    with timer("load"), chunking(chunk_rows):  # the load-time finite check reads every table
        job = pipeline.load(checkpoint, config_or_sidecar(checkpoint, model_config))
    loader = loader_settings(
        stream, job_distributed.loader_workers(workers, loader_workers), shuffle_rows
    )
    with timer("plan"):  # a budget measures its options on the data here
        the_plan, choice = plan_job(
            job,
            the_recipe,
            data_path,
            valid_path,
            say=say,
            on_bad_line=on_bad_line,
            dense_transform=dense_transform,
            loader=loader,
            columns=columns,
        )
    if control:  # before the plan is printed: a control that cannot run is the only line
        from compress.control import check_control

        check_control(the_plan, data_path, None if workers is None else workers.world_size)
    if out_dir.exists() and not force:
        raise ArtifactError(f"{out_dir}: already exists (use --force to replace it, or --out)")
    if out_dir.exists():
        check_replaceable(out_dir, [checkpoint, data_path, valid_path, model_config, columns])
    say(format_plan(the_plan))
    say()
    if choice is not None:
        say(choice.describe())
        say()

    def log(entry: dict) -> None:
        if verbosity.verbose():  # the pipeline logs each evaluation itself
            return
        m = entry.get("metrics")
        scores = f"  selection auc {m['auc']:.4f} logloss {m['logloss']:.4f}" if m else ""
        loss = f"loss {entry['loss']:.4f}" if entry["loss"] is not None else "(before fine-tuning)"
        run = "control " if entry.get("run") == "control" else ""
        say(
            f"{run}step {entry['step']:>6}  {loss}{scores}  "
            f"{entry['samples_per_second']:,.0f} samples/s"
        )

    # converted tables go straight to files beside --out (removed when the command ends); the
    # export moves them into the artifacts (compress.io.staged_arrays)
    from exporters.artifacts.atomic_dir import table_errors, table_staging

    staging_dir = None
    if workers is None or workers.is_main:
        staging_dir = click.get_current_context().with_resource(table_staging(out_dir))
    with table_errors(out_dir, staging_dir):  # a full disk names --out
        result = pipeline.compress(
            job,
            the_plan,
            data=data_path,
            valid=valid_path,
            steps=steps,
            state_path=state_path,
            resume=job_distributed.resumes(workers, resume, state_path),
            log=log,
            on_bad_line=on_bad_line,
            dense_transform=dense_transform,
            loader=loader,
            chunk_rows=chunk_rows,
            columns=columns,
            staging_dir=staging_dir,
            device=device,
            distributed=workers,
            control=control,
            collect_report=True,  # report_data.json: what report.html and `report` draw
        )
    if result is None:  # a worker other than rank 0: fine-tuning is over, rank 0 writes
        return
    failure = auc_drop_failure(result.metrics, max_auc_drop)
    if failure is not None and not keep_failed:
        raise QualityGateError(f"{failure}; nothing written to {out_dir} (--keep-failed writes it)")
    if max_auc_drop is not None:  # recorded: readers of kept failed artifacts are warned
        result.quality_gate = QualityGateEntry(max_auc_drop, failure is None, failure).to_json()
    if choice is not None:  # the manifest's budget section, and recipe.toml to repeat it
        result.budget = choice.to_json()
    from compress.report_format import REPORT_HTML
    from exporters.report.render import matplotlib_problem

    no_report = matplotlib_problem()  # the report is drawn unless matplotlib is missing: noted
    if no_report is not None:
        result.notes.append(f"report.html not written: {no_report}")
    export_started = time.perf_counter()
    written = export(result, out_dir, force=force, timer=timer, report=no_report is None)
    timer.add("export", time.perf_counter() - export_started - timer.seconds.get("parity", 0.0))
    state_path.unlink(missing_ok=True)
    summary = {
        "out": str(written.path),
        "report": None if no_report is not None else str(written.path / REPORT_HTML),
        "recipe": the_plan.recipe_name,
        "bytes_before": the_plan.bytes_before,
        "baseline_precision": precision_label(job.spec),
        "bytes_after": written.manifest["bytes"]["tables"] + written.manifest["bytes"]["dense"],
        "bytes_planned": the_plan.bytes_after,
        "ratio": the_plan.bytes_before / the_plan.bytes_after,
        "metrics": result.metrics,
        "metrics_on": None
        if result.data.get("report") is None
        else {"slice": result.data["report"], "rows": result.metrics["baseline"]["n"]},
        "max_auc_drop": max_auc_drop,
        "budget": None if choice is None else choice.to_json(options=True),
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
        "loader": result.loader,
        "distributed": None if result.train is None else result.train.distributed,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if as_json:
        emit_json(summary)
    else:
        for note in result.notes:
            say(note if note.startswith("warning: ") else f"note: {note}")
        click.echo(format_before_after(summary))
    if failure is not None:
        raise QualityGateError(f"{failure}; artifacts kept in {written.path} (--keep-failed)")


for _command in (inspect, eval_cmd, verify, recipes, plan, demo, report):
    cli.add_command(_command)
