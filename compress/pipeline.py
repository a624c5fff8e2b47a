"""The main job as Python steps: load, plan, compress (prepare, fine-tune, convert), evaluate.

    >>> from compress import pipeline
    >>> job = pipeline.load("demo/dlrm.pt")
    >>> plan = pipeline.plan(job, "int4_qat")
    >>> result = pipeline.compress(job, plan, data="demo/train.npz", valid="demo/valid.npz")
    >>> result.metrics["compressed"]["auc"]

``exporters.export.export(result, out_dir)`` then writes the artifact directory (the CLI does both).

Validation data: ``valid`` when given, else the last 20% of ``data`` (held out from training). Its
first 20% chooses the kept fine-tuning step, and every reported metric is measured on the rest
(:mod:`compress.train.validation`). Large Criteo text and npy-day inputs are streamed by worker
processes instead of read whole (``loader``, :mod:`compress.data.stream`); the slices are the same
rows either way.
Without ``data``, a recipe that fine-tunes distils from the original model on inputs sampled from
its own tables (:mod:`compress.train.distill`) and says so in ``result.notes``; PTQ recipes need no data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from compress.control import NO_FINETUNE_NOTE, check_control, run_control
from compress.data.batch_source import BATCHES_NAME, Batches
from compress.data.dataset import Dataset
from compress.data.dense_transform import agreed_transform
from compress.data.parquet_columns import ColumnMapping
from compress.data.separation import check_separate_content, check_separate_paths
from compress.data.stream import LoaderSettings, StreamedData, open_data
from compress.errors import ModelConfigError, SettingError
from compress.io.live_model import load_module
from compress.io.model import LoadedModel, load_model
from compress.io.model_spec import DLRMSpec, graph_name_problem
from compress.io.staged_arrays import release_pages, staged_tensors
from compress.io.table_stream import check_chunk_rows, chunking
from compress.methods.apply_plan import convert_model, prepare_model
from compress.plan import Plan, make_plan
from compress.recipe.parse import load_recipe
from compress.recipe.schema import Recipe
from compress.report_data import collect_report_data
from compress.timings import StageTimer
from compress.train.calibration import calibrate
from compress.train.device import on_device, resolve_device
from compress.train.evaluate import evaluate_model
from compress.train.inputs import run_inputs
from compress.train.loop import TrainConfig, TrainResult, fit
from compress.train.score_histogram import evaluate_with_histogram
from compress.train.validation import HOLDOUT_FRACTION, ValidationSlices, split_validation

if TYPE_CHECKING:  # a data-parallel worker's context; single-process runs never import it
    from compress.train.distributed.context import DistContext

_log = logging.getLogger(__name__)


@dataclass
class CompressionResult:
    """What ``compress`` produced: the converted model and everything a report needs."""

    spec: DLRMSpec
    recipe: Recipe
    plan: Plan
    model: nn.Module
    metrics: dict[str, dict | None]
    train: TrainResult | None
    notes: list[str] = field(default_factory=list)
    #: the prepared sharing groups (``name``, ``method``, ``module``, ``notes``)
    shared: list[Any] = field(default_factory=list)
    seconds: float = 0.0
    source: str = ""
    data: dict[str, str | None] = field(default_factory=dict)
    #: features whose every bag held exactly one id in the data (a serving layout hint)
    one_hot_features: tuple[str, ...] = ()
    #: wall seconds per stage of :func:`compress` (data, evaluate, quantize, finetune, convert)
    timings: dict[str, float] = field(default_factory=dict)
    #: the dense transform of the data fine-tuned and evaluated on (``None``: no data, or data that
    #: does not record it; see :mod:`compress.data.dense_transform`)
    dense_transform: str | None = None
    #: how the data was read, JSON-ready: ``mode`` ``"memory"`` or ``"stream"`` (then the training
    #: loader's workers, rows, rows/s...; :class:`compress.data.stream.LoaderStats`); ``None``
    #: without data
    loader: dict | None = None
    #: the ``--max-auc-drop`` check and its outcome, JSON-ready (``None``: no gate was set); set
    #: by the caller that checks it, recorded in the manifest so that readers of artifacts kept
    #: with ``--keep-failed`` see that they failed
    quality_gate: dict | None = None
    #: what the report draws beyond the manifest, JSON-ready (``report_data.json``,
    #: :mod:`compress.report_data`)
    report_data: dict | None = None
    #: how a size budget chose the recipe, JSON-ready (``None``: the recipe was given); set by
    #: the caller that chose it (:mod:`compress.budget.choose`), recorded in the manifest with the
    #: recipe saved as ``recipe.toml``
    budget: dict | None = None


def load(
    checkpoint: str | Path | nn.Module, model_config: str | Path | dict | None = None
) -> LoadedModel:
    """Step 1: open a checkpoint and rebuild its TorchRec model (memory-mapped), or take a live
    TorchRec ``DLRM``/``DLRM_DCN``/``DLRM_Projection`` (or ``DLRMTrain``) module as it is, its
    tables, features and order read from its EBC configs (:mod:`compress.io.live_model`)."""
    if isinstance(checkpoint, nn.Module):
        return load_module(checkpoint, model_config)
    return load_model(checkpoint, model_config)


def plan(job: LoadedModel | DLRMSpec, recipe: str | Path | Recipe) -> Plan:
    """Step 2: decide every table's method (no data touched). ``job`` may be a bare
    :class:`DLRMSpec`, e.g. a model config's (:func:`compress.io.model_config.read_config_spec`):
    a plan needs shapes only."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    spec = job if isinstance(job, DLRMSpec) else job.spec
    problem = graph_name_problem(spec)  # before any work: the export needs them
    if problem is not None:
        where = job.source if isinstance(job, LoadedModel) else "model"
        raise ModelConfigError(
            f"{where}: {problem}; give the features and tables distinct names (a model config's "
            "feature_names and table names)"
        )
    return make_plan(recipe, spec)


def load_data(
    job: LoadedModel,
    data: str | Path | Dataset | Batches | None,
    valid: str | Path | Dataset | Batches | None,
    **kwargs,
) -> tuple[Dataset | StreamedData | None, Dataset | StreamedData | None]:
    """Training and validation sets: explicit ``valid``, else the held-out tail of ``data``; each
    read whole or streamed as ``loader`` (a :class:`LoaderSettings` keyword) says.

    A ``valid`` that is ``data`` (the same file or directory, a file it reads, or the same rows)
    is a :class:`DataError` (:mod:`compress.data.separation`).
    """
    paths = [s for s in (data, valid) if isinstance(s, str | Path)]
    if len(paths) == 2:
        check_separate_paths(data, valid)
    train_ds = _dataset(job, data, **kwargs)
    valid_ds = _dataset(job, valid, **kwargs)
    if train_ds is not None and valid_ds is not None:
        check_separate_content(train_ds, valid_ds, _name(data), _name(valid))
    if train_ds is not None and valid_ds is None:
        train_ds, valid_ds = train_ds.split_tail(HOLDOUT_FRACTION)
    return train_ds, valid_ds


def validation_slices(
    data: str | Path | Dataset | None,
    valid: str | Path | Dataset | None,
    train_ds: Dataset | StreamedData | None,
    valid_ds: Dataset | StreamedData | None,
) -> ValidationSlices | None:
    """The selection and report slices of the validation set :func:`load_data` returned (``None``
    without one), named after the file they come from."""
    if valid_ds is None:
        return None
    if valid is not None:
        return split_validation(valid_ds, _name(valid))
    return split_validation(valid_ds, _name(data), offset=len(train_ds) if train_ds else 0)


def compress(
    job: LoadedModel,
    plan: Plan,
    *,
    data: str | Path | Dataset | Batches | None = None,
    valid: str | Path | Dataset | Batches | None = None,
    steps: int | None = None,
    state_path: str | Path | None = None,
    resume: bool = False,
    log: Callable[[dict], None] | None = None,
    on_bad_line: str = "error",
    dense_transform: str | None = None,
    loader: LoaderSettings | None = None,
    chunk_rows: int | None = None,
    staging_dir: str | Path | None = None,
    device: str = "cpu",
    distributed: DistContext | None = None,
    control: bool = False,
    collect_report: bool = False,
    columns: ColumnMapping | dict | str | Path | None = None,
) -> CompressionResult | None:
    """Steps 3-5: baseline eval, prepare, fine-tune (when the plan needs it), convert, final eval.

    Every metric is measured on the report slice of the validation data; fine-tuning evaluates and
    chooses its kept step on the selection slice only (:mod:`compress.train.validation`).
    ``dense_transform`` is what raw text is read with (default ``log3``); the transform the data
    holds is recorded in the result (two files with different ones are a :class:`DataError`).
    ``loader`` says which inputs stream and how (default :class:`LoaderSettings`: large text and
    npy days stream with two workers); ``result.timings["data_wait"]`` is the time fine-tuning
    waited for batches and ``result.loader`` what the loader did.
    ``chunk_rows``: rows a chunk when a whole table is read (prepare, convert; default 4 MiB of
    float32 a chunk), what bounds their memory (:mod:`compress.io.table_stream`); tables a run
    does not fine-tune are never copied.
    ``staging_dir``: an existing directory, on the file system the artifacts will be written to,
    where converted tables are written chunk by chunk as they are made and held as memory maps
    (:mod:`compress.io.staged_arrays`): no converted table is ever whole in memory, and
    :func:`exporters.export.export` moves those files into the artifact directory instead of
    writing them again. The caller removes the directory (the main job makes one beside
    ``--out``); ``None``: converted tables are held in memory.
    ``device``: where fine-tuning runs (``"cpu"`` or ``"cuda"``; the rest stays on the CPU).
    ``distributed``: this process is a worker of a data-parallel run
    (:mod:`compress.train.distributed`, its device wins): every worker fine-tunes on its share of
    each batch; rank 0 alone evaluates, converts and returns the result, the others return
    ``None`` when fine-tuning ends.
    ``collect_report``: measure what ``report_data.json`` holds (:mod:`compress.report_data`:
    a pass over every table for its reconstruction error, the checkpoint's sha256 when not
    already taken) into ``result.report_data``, as the main job does; without it that pass is
    skipped and artifacts exported from the result hold no ``report_data.json`` (their report
    lists what it would show as not recorded).
    ``control``: also run the same fine-tuning on the uncompressed model and report it as
    ``metrics["control"]`` (:mod:`compress.control`; the checkpoint's own metrics when the
    recipe does not fine-tune).
    ``data``/``valid`` may also be in-process TorchRec batches (:mod:`compress.data.batch_source`);
    ``columns`` says which Parquet columns hold what (:mod:`compress.data.parquet_columns`).
    Progress goes to the ``compress`` loggers (evaluations at INFO); nothing is printed.
    """
    t0 = time.perf_counter()
    log = logged_evaluations(log)
    is_main = distributed is None or distributed.is_main
    if distributed is not None and distributed.world_size > 1 and not plan.needs_finetune:
        raise SettingError(
            f"recipe {plan.recipe.name!r} does not fine-tune: there is nothing to share between "
            f"{distributed.world_size} workers (run it in one process)"
        )
    if data is None and plan.recipe is not None and plan.recipe.only_finetunes:
        raise SettingError(
            f"recipe {plan.recipe.name!r} only fine-tunes (every table and the MLP kept): it needs "
            "--data (distilling the checkpoint from itself would change nothing)"
        )
    train_device = distributed.device if distributed is not None else resolve_device(device)
    check_chunk_rows(chunk_rows)
    timer = StageTimer()
    with timer("data"):
        train_ds, valid_ds = load_data(
            job,
            data,
            valid,
            on_bad_line=on_bad_line,
            dense_transform=dense_transform,
            loader=loader,
            columns=columns,
        )
        transform = agreed_transform(
            (ds.dense_transform, _name(src))
            for ds, src in ((train_ds, data), (valid_ds, valid if valid is not None else data))
            if ds is not None
        )
        slices = validation_slices(data, valid, train_ds, valid_ds)
        for what, ds in (("training", train_ds), ("validation", valid_ds)):
            if ds is not None:
                mode = "streamed" if isinstance(ds, StreamedData) else "in memory"
                _log.info(
                    "%s data: %d rows (%s) of %s",
                    what,
                    len(ds),
                    mode,
                    _name(data if what == "training" or valid is None else valid),
                )
    if control:  # before any work: a control that cannot run stops the job here
        check_control(plan, train_ds, None if distributed is None else distributed.world_size)
    report = slices.report if slices is not None else None
    names = job.spec.feature_names
    notes: list[str] = [f"warning: {w}" for w in plan.warnings]
    if loader is not None and loader.stream == "on":
        notes.extend(
            f"{_name(src)} is an .npz dataset, read whole (streaming reads Criteo text and npy days)"
            for src, ds in ((data, train_ds), (valid, valid_ds))
            if src is not None and not isinstance(src, Dataset) and isinstance(ds, Dataset)
        )
    metrics: dict[str, dict | None] = {
        "baseline": None,
        "before_finetune": None,
        "compressed": None,
    }
    scores = {}  # score histograms for the report's ROC and calibration curves
    if report is not None and is_main:
        with timer("evaluate"):
            metrics["baseline"], scores["baseline"] = evaluate_with_histogram(
                job.module, report, names
            )

    with timer("quantize"):
        counts = (
            row_counts(train_ds, job.spec) if train_ds is not None and plan.share_groups else None
        )
        with chunking(chunk_rows):
            model, shared = prepare_model(job.module, job.spec, plan, counts)
        calibrate(  # [mlp] activations = "int8": fixed input ranges, compress.train.calibration
            model,
            train_ds if train_ds is not None else (slices.select if slices is not None else None),
            names,
            (plan.recipe.finetune or TrainConfig()).seed,
        )
    for g in shared:
        notes.extend(g.notes)
    train_result = inputs = loss = None
    if plan.needs_finetune:
        config = plan.recipe.finetune or TrainConfig()
        if steps is not None:
            config = replace(config, steps=steps)
        if report is not None and is_main:  # quantized / projected, not yet fine-tuned
            with timer("evaluate"):
                metrics["before_finetune"] = evaluate_model(model, report, names)
        select = slices.select if slices is not None else None
        finetune_start = time.perf_counter()
        workers = None
        if distributed is not None:
            from compress.train.distributed.data_parallel import DataParallel

            workers = DataParallel(distributed, config)
        model = on_device(model, train_device)
        inputs = (  # recorded with the training state: --resume refuses changed inputs
            None
            if state_path is None
            else run_inputs(job.module, job.spec, plan, train_ds, valid_ds, config.seed)
        )
        if train_ds is not None:
            loss = {}
            if config.target == "teacher":  # distil from the original on the real inputs
                from compress.train.teacher import teacher_loss

                loss["loss_fn"] = teacher_loss(job.module)
            train_result = fit(
                model,
                train_ds,
                select,
                names,
                config,
                state_path=state_path,
                resume=resume,
                log=log,
                inputs=inputs,
                distributed=workers,
                **loss,
            )
        else:
            from compress.train.distill import distill

            notes.append(
                "no --data given: fine-tuned by distillation from the original model on inputs sampled "
                "from its own tables; fine-tune on real click data for best quality"
            )
            train_result = distill(
                job.module,
                model,
                job.spec,
                config,
                valid=select,
                state_path=state_path,
                resume=resume,
                log=log,
                inputs=inputs,
                distributed=workers,
            )
        model = on_device(model, torch.device("cpu"))
        timer.add("finetune", time.perf_counter() - finetune_start)
        if workers is not None:
            notes.extend(workers.notes)
        if not is_main:  # rank 0 converts, evaluates and writes; this worker is done
            return None
        if slices is not None and config.keep_best:
            train_result.selected_on = {
                "slice": slices.select_name,
                "rows": len(slices.select),
                "metric": config.select_on,
            }
        if train_result.best_step == 0:
            notes.append(
                f"fine-tuning did not improve {config.select_on} on the selection slice at any "
                "evaluation: the model before fine-tuning is kept"
            )
    with timer("convert"), chunking(chunk_rows):
        model = convert_model(model, staging_dir)
    if report is not None:
        with timer("evaluate"):
            metrics["compressed"], scores["compressed"] = evaluate_with_histogram(
                model, report, names
            )
        release_pages(staged_tensors(model))  # the pages of staged tables it read
    else:
        notes.append("no validation data: AUC before/after not measured")
    control_run = None
    if control and train_result is None:
        metrics["control"] = metrics["baseline"]
        notes.append(NO_FINETUNE_NOTE)
    elif control:
        with timer("control"):
            control_run = run_control(
                job,
                plan.recipe,
                config,
                train_ds,
                slices.select if slices is not None else None,
                report,
                device=train_device,
                loss=loss,
                log=log,
            )
        metrics["control"] = control_run.metrics
    report_data = None
    if collect_report:  # a pass over every table: only for a report
        with timer("report"):
            report_data = collect_report_data(
                job,
                plan,
                model,
                shared,
                scores=scores,
                slices=slices,
                train_data=train_ds,
                train_name=_name(data),
                counts=counts,
                finetuned=train_result is not None,
                control=None if control_run is None else control_run.report_json(),
                checkpoint_sha256=None if inputs is None else inputs["checkpoint"],
            )
            release_pages(staged_tensors(model))
    return CompressionResult(
        spec=job.spec,
        recipe=plan.recipe,
        plan=plan,
        model=model,
        metrics=metrics,
        train=train_result,
        shared=shared,
        notes=notes,
        seconds=time.perf_counter() - t0,
        source=job.source,
        one_hot_features=one_hot_features(train_ds if train_ds is not None else valid_ds, names),
        dense_transform=transform,
        data={
            "train": _name(data),
            "valid": _name(valid)
            if valid is not None
            else (f"last {HOLDOUT_FRACTION:.0%} of {_name(data)}" if data is not None else None),
            "select": slices.select_name if slices is not None else None,
            "report": slices.report_name if slices is not None else None,
        },
        timings=dict(timer.seconds)
        | ({"data_wait": train_result.data_wait} if train_result is not None else {})
        | (
            {"communication": train_result.communication}
            if train_result is not None and train_result.distributed is not None
            else {}
        ),
        loader=_loader_report(train_ds, valid_ds, train_result),
        report_data=report_data,
    )


def logged_evaluations(log: Callable[[dict], None] | None) -> Callable[[dict], None]:
    """``log`` (the caller's, if any) that also sends each fine-tuning evaluation to this
    module's logger at INFO (``compress.pipeline``)."""

    def both(entry: dict) -> None:
        m = entry.get("metrics")
        scores = f", selection auc {m['auc']:.4f} logloss {m['logloss']:.4f}" if m else ""
        loss = entry.get("loss")
        run = f"{entry['run']} " if entry.get("run") else ""
        _log.info(
            "%sstep %s: loss %s%s",
            run,
            entry.get("step"),
            "-" if loss is None else f"{loss:.4f}",
            scores,
        )
        if log is not None:
            log(entry)

    return both


def one_hot_features(
    data: Dataset | StreamedData | None, names: tuple[str, ...]
) -> tuple[str, ...]:
    """The features of ``names`` whose every bag in ``data`` holds exactly one id (none without
    data): the exporter looks them up apart from multi-hot ones, so they skip pooling. A streamed
    set knows its own (:attr:`StreamedData.one_hot_features`: every feature of Criteo text and
    npy days)."""
    if data is None or len(data) == 0:
        return ()
    if isinstance(data, StreamedData):
        return tuple(f for f in names if f in data.one_hot_features)
    return tuple(f for f in names if bool((data.lengths(f) == 1).all()))


def row_counts(data: Dataset | StreamedData, spec: DLRMSpec) -> dict[str, torch.Tensor]:
    """How often each row of each table occurs in ``data`` (over all features the table serves;
    a streamed set is read once for it)."""
    if isinstance(data, StreamedData):
        return data.id_counts(spec)
    counts = {}
    for t in spec.tables:
        c = np.zeros(t.num_embeddings, dtype=np.int64)
        for f in t.feature_names:
            c += np.bincount(data.values[f], minlength=t.num_embeddings)[: t.num_embeddings]
        counts[t.name] = torch.from_numpy(c)
    return counts


def _loader_report(
    train: Dataset | StreamedData | None,
    valid: Dataset | StreamedData | None,
    result: TrainResult | None,
) -> dict | None:
    """``CompressionResult.loader``: how each input was read, and what the training loader did."""
    if train is None and valid is None:
        return None
    modes = {
        k: ("stream" if isinstance(d, StreamedData) else "memory")
        for k, d in (("train", train), ("valid", valid))
        if d is not None
    }
    report: dict = {"mode": modes}
    if result is not None and result.loader is not None:
        report.update({k: v for k, v in result.loader.items() if k != "mode"})
    return report


def _dataset(
    job: LoadedModel, source, loader: LoaderSettings | None = None, **kwargs
) -> Dataset | StreamedData | None:
    if source is None or isinstance(source, Dataset):
        return source
    return open_data(source, job.spec, settings=loader, **kwargs)


def _name(source) -> str | None:
    if source is None:
        return None
    if isinstance(source, Dataset):
        return "<in-memory dataset>"
    return str(source) if isinstance(source, str | Path) else BATCHES_NAME
