"""The whole job in one call: :func:`run` (``compress.run``), beside the step-by-step calls.

    >>> import compress
    >>> result = compress.run("demo/dlrm.pt", "int4_qat", data="demo/train.npz",
    ...                       valid="demo/valid.npz", out="demo/dlrm.int4_qat")
    >>> result.metrics["compressed"]["auc"], result.ratio, result.out

:func:`run` does what ``dqrm-compress --recipe R CKPT --data ... --out ...`` does (load, plan or
choose a plan for a size budget, evaluate, quantize, fine-tune, convert, evaluate, and write the
artifact directory with ``report.html``), with the same output guarantees (``.<out>.lock`` held
while it runs, the directory swapped in whole or not at all), and returns a :class:`RunResult`.
It prints nothing: every stage and each fine-tuning evaluation is logged to the ``compress``
loggers (INFO), warnings at WARNING; errors caused by input are :class:`~compress.errors.DqrmError`
subclasses with one-line messages, as on the command line.

The step-by-step calls stay: :func:`compress.pipeline.load`, :func:`compress.pipeline.plan`,
:func:`compress.pipeline.compress`, ``exporters.export.export``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.errors import ArtifactError, DataError, QualityGateError, SettingError

if TYPE_CHECKING:
    from torch import nn

    from compress.data.batch_source import Batches
    from compress.data.dataset import Dataset
    from compress.data.parquet_columns import ColumnMapping
    from compress.data.stream import LoaderSettings
    from compress.pipeline import CompressionResult
    from compress.plan import Plan
    from compress.recipe.schema import Recipe

_log = logging.getLogger(__name__)
#: A string that starts like a number is a size budget (``"3MB"``, ``"100x"``), not a recipe name.
_BUDGET_LIKE = re.compile(r"\s*[0-9.]")


@dataclass
class RunResult:
    """What :func:`run` did.

    ``compression`` is the step-by-step result (:class:`~compress.pipeline.CompressionResult`:
    the converted TorchRec model, metrics, notes, timings); ``plan`` the per-table plan that ran;
    ``out`` the artifact directory (``None`` when ``out`` was not given: nothing written);
    ``report`` its ``report.html`` (``None``: not drawn); ``budget`` how a size budget chose the
    recipe (``None``: a recipe was given); ``quality_gate`` the ``max_auc_drop`` check and its
    outcome (``None``: no gate); ``seconds`` the wall time of the call.
    """

    compression: CompressionResult
    plan: Plan
    out: Path | None = None
    report: Path | None = None
    budget: dict | None = None
    quality_gate: dict | None = None
    seconds: float = 0.0
    #: bytes of the written tables and MLPs (``plan.bytes_after`` when nothing was written)
    bytes_written: int | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def model(self) -> nn.Module:
        """The converted TorchRec model (integer tables, dequantized at lookup)."""
        return self.compression.model

    @property
    def metrics(self) -> dict[str, dict | None]:
        """``baseline``, ``before_finetune``, ``compressed`` (and ``control``), each ``{auc,
        logloss, accuracy, n}`` on the report slice, or ``None`` where not measured."""
        return self.compression.metrics

    @property
    def notes(self) -> list[str]:
        """Warnings and notes of the run (also logged)."""
        return self.compression.notes

    @property
    def bytes_before(self) -> int:
        return self.plan.bytes_before

    @property
    def bytes_after(self) -> int:
        return self.bytes_written if self.bytes_written is not None else self.plan.bytes_after

    @property
    def ratio(self) -> float:
        """How many times smaller the tables and MLPs are."""
        return self.bytes_before / self.bytes_after

    def summary(self) -> dict:
        """JSON-ready, as the command line's ``--json`` names the same figures."""
        return {
            "out": None if self.out is None else str(self.out),
            "report": None if self.report is None else str(self.report),
            "recipe": self.plan.recipe_name,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "bytes_planned": self.plan.bytes_after,
            "ratio": self.ratio,
            "metrics": self.metrics,
            "notes": self.notes,
            "budget": self.budget,
            "quality_gate": self.quality_gate,
            "loader": self.compression.loader,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "seconds": round(self.seconds, 3),
        }


def run(
    model: str | Path | nn.Module,
    recipe: str | Path | Recipe | int,
    *,
    data: str | Path | Dataset | Batches | None = None,
    valid: str | Path | Dataset | Batches | None = None,
    out: str | Path | None = None,
    columns: ColumnMapping | Mapping[str, Any] | str | Path | None = None,
    model_config: str | Path | dict | None = None,
    steps: int | None = None,
    dense_transform: str | None = None,
    loader: LoaderSettings | None = None,
    on_bad_line: str = "error",
    max_auc_drop: float | None = None,
    keep_failed: bool = False,
    force: bool = False,
    report: bool = True,
    control: bool = False,
    device: str = "cpu",
) -> RunResult:
    """Compress a TorchRec DLRM in one call and, with ``out``, write its artifact directory.

    ``model``: a checkpoint (``.pt`` file or DCP directory; a ``model_config.json`` beside it or
    inside it is used, as on the command line) or a live TorchRec ``DLRM``/``DLRM_DCN``/
    ``DLRM_Projection`` (or ``DLRMTrain``) module. ``model_config``: a model-config file, a
    built-in config's name, or its dict.

    ``recipe``: a built-in recipe name (``"int4_qat"``), a recipe ``.toml`` path, a
    :class:`~compress.recipe.schema.Recipe`, or a **size budget**: ``"3MB"``, ``"2.5MiB"``,
    ``"100x"`` (the model's bytes / 100) or an integer number of bytes. A budget (also a recipe
    file's ``budget = ...``) measures every table's options on the selection slice and runs the
    recipe that fits (:mod:`compress.budget`); it needs ``data`` or ``valid``.

    ``data``/``valid``: training and validation data, each a path (Criteo text file or
    directory, TorchRec npy days, Parquet file or directory, ``.npz``), an in-memory
    :class:`~compress.data.dataset.Dataset`, or in-process TorchRec batches (a re-iterable of
    ``Batch``/``torchrec.datasets.utils.Batch`` with a ``KeyedJaggedTensor``, or a function
    returning a fresh iterator; :mod:`compress.data.batch_source`). Without ``valid`` the last
    20% of ``data`` is held out; the first 20% of the validation rows chooses the kept
    fine-tuning step and every metric is measured on the rest. Without either, fine-tuning
    recipes distil from the original model and no AUC is measured. ``columns``: which Parquet
    columns hold the label, dense and sparse features (:mod:`compress.data.parquet_columns`).
    ``loader``: streaming settings (:class:`~compress.data.stream.LoaderSettings`);
    ``dense_transform``: what raw Criteo text and raw Parquet dense values are read with
    (default ``log3``); ``on_bad_line``: ``"error"`` or ``"skip"`` for Criteo text.

    ``out``: the artifact directory to write (packed tables, ONNX graphs, ``manifest.json``,
    ``report.html`` unless ``report=False`` or matplotlib is missing, which is noted); ``None``
    writes nothing and returns the compressed model in memory. An existing ``out`` is an
    :class:`~compress.errors.ArtifactError` unless ``force`` (which replaces only an artifact
    directory). ``steps`` overrides the recipe's fine-tuning steps; ``control`` also fine-tunes
    the uncompressed model the same way (``metrics["control"]``); ``device``: where fine-tuning
    runs (``"cpu"``, ``"cuda"``).

    ``max_auc_drop``: raise :class:`~compress.errors.QualityGateError` (writing nothing) when the
    compressed AUC is more than this below the baseline's; with ``keep_failed`` the artifacts are
    written, their manifest records the failed gate, and the result is returned with
    ``quality_gate["passed"]`` false.

    Returns a :class:`RunResult`. Prints nothing (see the module docstring).
    """
    started = time.perf_counter()
    with _quiet_libraries():
        return _run(
            model,
            recipe,
            data=data,
            valid=valid,
            out=None if out is None else Path(out),
            columns=columns,
            model_config=model_config,
            steps=steps,
            dense_transform=dense_transform,
            loader=loader,
            on_bad_line=on_bad_line,
            max_auc_drop=max_auc_drop,
            keep_failed=keep_failed,
            force=force,
            report=report,
            control=control,
            device=device,
            started=started,
        )


def resolve_recipe(recipe: str | Path | Recipe | int) -> Recipe:
    """The :class:`Recipe` ``recipe`` names (see :func:`run`): a budget becomes a budget recipe
    (:class:`~compress.budget.spec.BudgetError` when it cannot be read)."""
    from compress.recipe.parse import load_recipe
    from compress.recipe.schema import MLPSettings, Recipe

    if isinstance(recipe, Recipe):
        return recipe
    is_budget = isinstance(recipe, int) or (
        isinstance(recipe, str) and _BUDGET_LIKE.match(recipe) is not None
    )
    if is_budget:
        from compress.budget.spec import parse_budget

        parsed = parse_budget(recipe, where="budget")  # type: ignore[arg-type]
        return Recipe(parsed.name, "", (), MLPSettings(), None, "budget", parsed)
    if not isinstance(recipe, str | Path):
        raise SettingError(
            f"recipe must be a built-in name, a .toml path, a Recipe or a budget such as '3MB', "
            f"got {type(recipe).__name__}"
        )
    return load_recipe(recipe)


def _run(model, recipe, *, out: Path | None, started: float, **options) -> RunResult:
    from compress import pipeline
    from compress.timings import StageTimer

    timer = StageTimer()
    the_recipe = resolve_recipe(recipe)
    data, valid = options["data"], options["valid"]
    if options["max_auc_drop"] is not None and data is None and valid is None:
        raise DataError("max_auc_drop needs validation data to measure AUC: give valid or data")
    with contextlib.ExitStack() as held:
        if out is not None:  # before any work: a second run on the same out stops here
            inputs = [model, data, valid, options["columns"], options["model_config"]]
            _hold_output(out, options["force"], held, inputs)
        with timer("load"):
            job = pipeline.load(model, _model_config(model, options["model_config"]))
        _log.info(
            "loaded %s: %d tables, %d features",
            job.source,
            len(job.spec.tables),
            len(job.spec.feature_names),
        )
        read = {
            "on_bad_line": options["on_bad_line"],
            "dense_transform": options["dense_transform"],
            "loader": options["loader"],
            "columns": options["columns"],
        }
        with timer("plan"):
            the_plan, choice = _plan(job, the_recipe, data, valid, read)
        _log.info(
            "plan %s: %d -> %d bytes (%.2fx)",
            the_plan.recipe_name,
            the_plan.bytes_before,
            the_plan.bytes_after,
            the_plan.bytes_before / the_plan.bytes_after,
        )
        staging_dir = None
        if out is not None:
            from exporters.artifacts.atomic_dir import table_staging

            staging_dir = held.enter_context(table_staging(out))
        result = pipeline.compress(
            job,
            the_plan,
            data=data,
            valid=valid,
            steps=options["steps"],
            staging_dir=staging_dir,
            device=options["device"],
            control=options["control"],
            collect_report=out is not None and options["report"],
            **read,
        )
        assert result is not None  # one process: rank 0
        for note in result.notes:
            (_log.warning if note.startswith("warning: ") else _log.info)(
                "%s", note.removeprefix("warning: ")
            )
        gate = _quality_gate(result, options["max_auc_drop"], options["keep_failed"], out)
        if choice is not None:  # the manifest's budget section, and recipe.toml to repeat it
            result.budget = choice.to_json()
        written_path = report_path = bytes_written = None
        if out is not None:
            written_path, report_path, bytes_written = _export(
                result, out, options["force"], options["report"], timer
            )
            _log.info("wrote %s", written_path)
    timings = {**timer.seconds, **result.timings}
    return RunResult(
        compression=result,
        plan=the_plan,
        out=written_path,
        report=report_path,
        budget=result.budget,
        quality_gate=gate,
        seconds=time.perf_counter() - started,
        bytes_written=bytes_written,
        timings=timings,
    )


def _model_config(model, model_config):
    """An explicit model config, else ``model_config.json`` beside or inside a checkpoint."""
    if model_config is not None or not isinstance(model, str | Path):
        return model_config
    from compress.io.model import find_model_config

    return find_model_config(model)


def _plan(job, recipe: Recipe, data, valid, read: dict):
    """``(plan, budget choice or None)``: the recipe's plan, or the one a budget chooses."""
    from compress import pipeline

    if recipe.budget is None:
        return pipeline.plan(job, recipe), None
    from compress.cli.budget_options import plan_job  # the budget's step of the main job

    return plan_job(job, recipe, data, valid, say=lambda line="": _log.info("%s", line), **read)


def _hold_output(out: Path, force: bool, held: contextlib.ExitStack, inputs: list) -> None:
    """Take ``.<out>.lock`` for the rest of the call, put back what a killed run left, and refuse
    an existing ``out`` unless ``force`` (which replaces only an artifact directory that holds
    none of ``inputs``)."""
    from compress.cli.job_output import check_replaceable
    from exporters.artifacts import atomic_dir

    lock = atomic_dir.output_lock(out)
    held.callback(lock.release)
    if atomic_dir.recover(out).restored is not None:
        _log.warning("%s: put back the previous output that a killed run was replacing", out)
    if out.exists() and not force:
        raise ArtifactError(f"{out}: already exists (force=True replaces it)")
    if out.exists():
        check_replaceable(out, [p for p in inputs if isinstance(p, str | Path)])


def _quality_gate(result, max_auc_drop: float | None, keep_failed: bool, out: Path | None):
    """The gate's record (``None`` without one); :class:`QualityGateError` when it fails and the
    artifacts are not kept."""
    if max_auc_drop is None:
        return None
    from compress.cli.job_report import auc_drop_failure
    from exporters.artifacts.manifest_schema import QualityGateEntry

    failure = auc_drop_failure(result.metrics, max_auc_drop)
    if failure is not None and not keep_failed:
        where = f"; nothing written to {out}" if out is not None else ""
        raise QualityGateError(f"{failure}{where} (keep_failed=True writes it)")
    if failure is not None:
        _log.warning("%s; artifacts kept (keep_failed)", failure)
    result.quality_gate = QualityGateEntry(max_auc_drop, failure is None, failure).to_json()
    return result.quality_gate


def _export(result, out: Path, force: bool, report: bool, timer) -> tuple[Path, Path | None, int]:
    from compress.report_format import REPORT_HTML
    from exporters.export import export
    from exporters.report.render import matplotlib_problem

    problem = matplotlib_problem() if report else None
    if problem is not None:
        result.notes.append(f"report.html not written: {problem}")
        _log.warning("report.html not written: %s", problem)
    draw = report and problem is None
    export_started = time.perf_counter()
    written = export(result, out, force=force, timer=timer, report=draw)
    timer.add("export", time.perf_counter() - export_started - timer.seconds.get("parity", 0.0))
    nbytes = written.manifest["bytes"]["tables"] + written.manifest["bytes"]["dense"]
    return written.path, (written.path / REPORT_HTML) if draw else None, nbytes


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """While :func:`run` runs: torch.fx's deprecation notice on every TorchRec forward (its own
    log handler prints it) and TorchRec's sparse-invariant warning say nothing to the caller; the
    command line silences the same two."""
    fx = logging.getLogger("torch.fx._symbolic_trace")
    level = fx.level
    fx.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="Sparse invariant checks are implicitly disabled"
            )
            yield
    finally:
        fx.setLevel(level)
