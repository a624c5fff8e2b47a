"""The fine-tuning loop: seeded, evaluated every N steps, keeps the best step, resumable.

One loop serves FP32 training (the demo), quantization-aware fine-tuning and parameter-sharing
fine-tuning: the model decides what its forward does; the loop only feeds batches, steps two
optimizers (one for embedding parameters, one for the rest) and evaluates.

Determinism: the batch sequence is a pure function of ``(seed, step)`` (each epoch is a permutation
drawn from ``numpy.random.default_rng([seed, epoch])``), and :func:`fit` saves the model, optimizers
and counters to ``state_path`` every ``checkpoint_every`` steps. Resuming from that file replays
exactly the steps an uninterrupted run would have taken, so both end with identical weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from compress.data.batches import Batch
from compress.data.dataset import Dataset
from compress.data.stream import StreamedData
from compress.errors import DqrmError, os_error_in, os_error_reason
from compress.io.atomic_file import atomic_open
from compress.methods.qat_embedding import track_scale_updates
from compress.progress import enabled as progress_enabled
from compress.train import snapshot
from compress.train.config import OPTIMIZERS, SELECT_METRICS, TrainConfig
from compress.train.device import follow_model, model_device, scores_on_cpu
from compress.train.evaluate import predict_with_labels
from compress.train.inputs import changed_input
from compress.train.metrics import evaluate
from compress.train.rowwise_adagrad import RowwiseAdagrad

if TYPE_CHECKING:  # the distributed hooks are imported only by the runs that use them
    from compress.train.distributed.data_parallel import DataParallel


@dataclass
class TrainResult:
    """``best_step``: the evaluation with the best ``config.select_on`` metric on the validation
    rows given to :func:`fit` (``None`` when none was given: nothing was selected).
    ``selected_on``: which rows and metric chose the kept weights, filled in by the pipeline
    (JSON-ready; ``None`` when nothing was selected: no validation rows, or ``keep_best`` off)."""

    steps: int
    best_step: int | None
    best_metrics: dict | None
    final_metrics: dict | None
    seconds: float
    samples_per_second: float
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0
    selected_on: dict | None = None
    #: seconds the loop waited for its next training batch (reading, shuffling, building it)
    data_wait: float = 0.0
    #: what a streamed training set's loader did (:meth:`compress.data.stream.LoaderStats.to_json`;
    #: ``None`` for an in-memory set)
    loader: dict | None = None
    #: a data-parallel run's exchange (:mod:`compress.train.distributed.accounting`; ``None`` for
    #: a single process) and the seconds the exchanges took
    distributed: dict | None = None
    communication: float = 0.0


LossFn = Callable[[nn.Module, Batch], torch.Tensor]
ScoreFn = Callable[[nn.Module, Batch], torch.Tensor]


def default_score(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Logits ``[B]`` of a TorchRec DLRM."""
    return model(batch.dense, batch.sparse).reshape(-1)


def is_better(metric: str, new: dict, old: dict) -> bool:
    """Whether evaluation ``new`` beats ``old`` on ``metric``: lower log loss or higher AUC."""
    if metric == "logloss":
        return new["logloss"] < old["logloss"]
    if metric == "auc":
        return new["auc"] > old["auc"]
    raise ValueError(
        f"unknown selection metric {metric!r} (choose from {', '.join(SELECT_METRICS)})"
    )


def bce_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(default_score(model, batch), batch.labels)


def batch_stream(
    data: Dataset,
    feature_names: tuple[str, ...],
    batch_size: int,
    seed: int,
    start_step: int,
    share: tuple[int, int] | None = None,
) -> Iterator[Batch]:
    """Endless shuffled batches; the batch at step ``k`` depends only on ``(seed, k)``.
    ``share``: only rows ``[lo, hi)`` of each batch (a data-parallel worker's share)."""
    n = len(data)
    per_epoch = max(1, n // batch_size)
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        for i in range(offset, per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            if share is not None:
                idx = idx[share[0] : share[1]]
            yield data.take(idx).to_batch(feature_names)
            step += 1


def training_batches(
    data: Dataset | StreamedData,
    feature_names: tuple[str, ...],
    batch_size: int,
    seed: int,
    start_step: int,
    share: tuple[int, int] | None = None,
) -> Iterator[Batch]:
    """Endless training batches from step ``start_step``: :func:`batch_stream` for an in-memory
    set; for a streamed one its :meth:`~compress.data.stream.StreamedData.train_batches` (passes
    through a seeded shuffle buffer, read by worker processes; ``close()`` stops them).
    ``share``: rows ``[lo, hi)`` of each batch only (a data-parallel worker's share of the same
    global batches)."""
    if isinstance(data, Dataset):
        return batch_stream(data, feature_names, batch_size, seed, start_step, share)
    if share is None:
        return data.train_batches(feature_names, batch_size, seed, start_step)
    return data.train_batches(feature_names, batch_size, seed, start_step, share=share)


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(embedding parameters, dense parameters): a parameter belongs to the embeddings when its
    name contains ``embedding_bag`` or ``sparse_arch``."""
    emb, dense = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (emb if ("sparse_arch" in name or "embedding_bag" in name) else dense).append(p)
    return emb, dense


def make_optimizer(
    kind: str, params: list[nn.Parameter], lr: float
) -> torch.optim.Optimizer | None:
    if not params:
        return None
    if kind == "adagrad":
        return torch.optim.Adagrad(params, lr=lr)
    if kind == "rowwise_adagrad":
        return RowwiseAdagrad(params, lr=lr)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise DqrmError(f"unknown optimizer {kind!r} (choose from {', '.join(OPTIMIZERS)})")


def fit(
    model: nn.Module,
    train: Dataset | StreamedData,
    valid: Dataset | StreamedData | None,
    feature_names: tuple[str, ...],
    config: TrainConfig,
    *,
    loss_fn: LossFn = bce_loss,
    score_fn: ScoreFn = default_score,
    state_path: str | Path | None = None,
    resume: bool = False,
    log: Callable[[dict], None] | None = None,
    stop_after: int | None = None,
    inputs: Mapping[str, str] | None = None,
    distributed: DataParallel | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``config.total_steps(len(train))`` steps.

    With ``config.keep_best`` and a validation set, the weights of the evaluation with the best
    ``config.select_on`` metric are restored at the end; that set is only for selection (report
    metrics on other rows). ``log`` receives one dict per evaluation (step, loss, metrics,
    samples/s). ``stop_after`` ends the run early after that many steps (as an interruption
    would), leaving the resumable state at ``state_path``. ``inputs`` (fingerprints of what the
    run depends on, :func:`compress.train.inputs.run_inputs`) are saved with the state, and
    ``resume`` refuses a state whose recorded inputs differ, naming the input that changed.

    ``distributed``: this process is one worker of a data-parallel run
    (:mod:`compress.train.distributed.data_parallel`): it trains on its share of every global
    batch, exchanges gradients before each optimizer step, and applies rank 0's evaluations;
    only rank 0 saves the state and keeps the best weights. A model on another device than the CPU
    gets its batches moved there.
    """
    torch.manual_seed(config.seed)
    total = config.total_steps(len(train))
    if len(train) < config.batch_size:
        raise DqrmError(
            f"training data has {len(train)} samples, fewer than one batch of {config.batch_size}"
        )
    emb_params, dense_params = split_parameters(model)
    opt_emb = make_optimizer(config.optimizer, emb_params, config.lr_embedding)
    opt_dense = make_optimizer(config.dense_optimizer_kind(), dense_params, config.lr_dense)
    optimizers = [o for o in (opt_emb, opt_dense) if o is not None]
    if distributed is not None:
        distributed.attach(emb_params, dense_params)
    device = model_device(model)
    loss_fn, score_fn = follow_model(loss_fn, device), scores_on_cpu(score_fn, device)
    keeps_weights = distributed is None or distributed.is_main  # others never restore or save
    if opt_emb is not None:
        # table-wise QAT scales refresh from a summary kept up to date after each step (exact)
        track_scale_updates(model, opt_emb)

    step, best_step, best_metrics, best_state, history = 0, None, None, None, []
    running = 0.0  # exponential moving average of the training loss, as logged
    state_path = Path(state_path) if state_path else None
    if state_path is not None:  # a run killed while saving left its temporary file
        state_tmp(state_path).unlink(missing_ok=True)
    resumed_from = 0
    if resume:
        if state_path is None or not state_path.exists():
            raise DqrmError(f"--resume: no saved training state at {state_path}")
        saved = load_state(state_path)
        if inputs is not None:
            changed = changed_input(saved.get("inputs"), inputs)
            if changed is not None:
                raise DqrmError(
                    f"{state_path}: cannot --resume: {changed}; give the same inputs, or run "
                    "without --resume to start afresh"
                )
        if not same_settings(saved["config"], asdict(config)) or saved["total"] != total:
            raise DqrmError(
                f"{state_path}: saved training state was made with different settings "
                f"({_settings_diff(saved['config'], asdict(config), saved['total'], total)}); "
                "run without --resume to start afresh"
            )
        try:
            snapshot.restore(model, saved["model"])
            for opt, s in zip(optimizers, saved["optimizers"], strict=True):
                opt.load_state_dict(s)
            if distributed is not None:
                distributed.load_state_extras(saved.get("distributed"))
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise DqrmError(
                f"{state_path}: saved training state does not fit this model ({_first_line(e)}); "
                "run without --resume to start afresh"
            ) from e
        step, best_step, best_metrics, history = (
            saved["step"],
            saved["best_step"],
            saved["best_metrics"],
            saved["history"],
        )
        best_state = saved.get("best_state") if keeps_weights else None
        running = saved["running_loss"]
        torch.set_rng_state(saved["torch_rng"])
        resumed_from = step

    def evaluate_now() -> dict | None:
        if valid is None:
            return None
        metrics = None
        if keeps_weights:
            model.eval()
            logits, labels = predict_with_labels(
                lambda b: score_fn(model, b),
                valid,
                feature_names,
                config.eval_batch_size,
                desc="valid",
            )
            model.train()
            metrics = evaluate(logits, labels)
        if distributed is not None:  # rank 0 evaluated; every rank applies its metrics
            metrics = distributed.agree(metrics)  # type: ignore[assignment]
        return metrics

    def save_state() -> None:
        if state_path is None:
            return
        extras = distributed.state_extras() if distributed is not None else None
        if not keeps_weights:
            return  # rank 0 saves for every rank
        state = {
            "config": asdict(config),
            "total": total,
            "step": step,
            "model": snapshot.take(model, keep=False),  # a checkpoint map: its changed rows
            "optimizers": [o.state_dict() for o in optimizers],
            "best_step": best_step,
            "best_metrics": best_metrics,
            "best_state": best_state,
            "history": history,
            "torch_rng": torch.get_rng_state(),
            "running_loss": running,
            "inputs": None if inputs is None else dict(inputs),
        }
        if extras is not None:
            state["distributed"] = extras
        write_state(state, state_path)

    # a streamed set starts reading (and filling its shuffle buffer) now, during the evaluation
    share = None if distributed is None else distributed.share(config.batch_size)
    stream = training_batches(
        train, feature_names, config.batch_size, config.seed, step, share=share
    )
    data_wait = 0.0
    try:
        if step == 0 and valid is not None and config.keep_best:
            # step 0 competes too: fine-tuning never returns a model worse than it started from
            metrics = evaluate_now()
            best_step, best_metrics = 0, metrics
            best_state = snapshot.take(model, keep=True) if keeps_weights else None
            entry = {"step": 0, "loss": None, "metrics": metrics, "samples_per_second": 0.0}
            history.append(entry)
            if log is not None:
                log(entry)

        model.train()
        t0 = time.perf_counter()
        samples = 0
        bar = _bar(total, step)
        end = total if stop_after is None else min(total, step + stop_after)
        while step < end:
            waited = time.perf_counter()
            batch = next(stream)
            data_wait += time.perf_counter() - waited
            loss = loss_fn(model, batch)
            if distributed is not None:  # this rank's part of the global batch's mean loss
                loss = loss * distributed.loss_scale(len(batch), config.batch_size)
            for o in optimizers:
                o.zero_grad(set_to_none=True)
            loss.backward()
            # every rank now gets the gradient summed over the ranks, and the global loss
            shared_loss = None if distributed is None else distributed.step(loss.item())
            for o in optimizers:
                o.step()
            step += 1
            samples += len(batch) if distributed is None else config.batch_size
            value = loss.item() if shared_loss is None else shared_loss
            if not math.isfinite(value):
                raise DqrmError(
                    f"fine-tuning diverged at step {step} (loss {value}); lower the learning rates "
                    f"(lr_embedding {config.lr_embedding}, lr_dense {config.lr_dense})"
                )
            running = 0.98 * running + 0.02 * value if step > 1 else value
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{running:.4f}", sps=f"{samples / (time.perf_counter() - t0):,.0f}"
                )
            is_eval = (config.eval_every and step % config.eval_every == 0) or step == total
            if is_eval:
                metrics = evaluate_now()
                entry = {
                    "step": step,
                    "loss": running,
                    "metrics": metrics,
                    "samples_per_second": samples / (time.perf_counter() - t0),
                }
                history.append(entry)
                if log is not None:
                    log(entry)
                if distributed is not None:
                    distributed.check_replicas(model, step)
                if metrics is not None and (
                    best_metrics is None or is_better(config.select_on, metrics, best_metrics)
                ):
                    best_step, best_metrics = step, metrics
                    if config.keep_best and step != total and keeps_weights:
                        best_state = snapshot.take(model, keep=True)
                    elif config.keep_best:
                        best_state = None  # the final weights are the best ones
            if state_path is not None and (step % config.checkpoint_every == 0 or step == end):
                save_state()
        if distributed is not None:
            distributed.check_replicas(model, step)
    finally:  # a streamed set's workers end with the loop, also on an error or Ctrl-C
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    final_metrics = history[-1]["metrics"] if history and history[-1]["step"] == step else None
    if step == total and config.keep_best and best_state is not None and best_step != total:
        snapshot.restore(model, best_state)
    model.eval()
    return TrainResult(
        steps=step,
        best_step=best_step,
        best_metrics=best_metrics,
        final_metrics=final_metrics,
        seconds=seconds,
        samples_per_second=samples / seconds if seconds > 0 else 0.0,
        history=history,
        resumed_from=resumed_from,
        data_wait=data_wait,
        loader=stream.stats.to_json() if hasattr(stream, "stats") else None,
        distributed=None if distributed is None else distributed.report(),
        communication=0.0 if distributed is None else distributed.seconds,
    )


STATE_KEYS = frozenset(
    {"config", "total", "step", "model", "optimizers", "best_step", "best_metrics", "history"}
    | {"torch_rng", "running_loss"}
)


def state_tmp(state_path: Path) -> Path:
    """Where :func:`write_state` writes before renaming onto ``state_path``."""
    return state_path.with_suffix(".tmp")


def write_state(state: dict, state_path: Path) -> None:
    """Save ``state`` to ``state_path`` atomically (a temporary file, flushed, then renamed): a
    kill leaves the previous state. An OS error (a full disk) is one :class:`DqrmError` naming
    ``state_path``, with the temporary file removed."""
    try:
        # to a file, not a path: to a path, torch reports ENOSPC as a bare RuntimeError
        with atomic_open(state_path, state_tmp(state_path)) as f:
            torch.save(state, f)
    except Exception as e:
        cause = os_error_in(e)
        if cause is not None:
            raise DqrmError(f"{state_path}: {os_error_reason(cause)}") from e
        raise


def load_state(state_path: Path) -> dict:
    """The training state saved at ``state_path`` (``weights_only``); one-line :class:`DqrmError`
    naming the file when it is truncated, corrupt or not a training state."""
    afresh = "run without --resume to start afresh"
    try:
        saved = torch.load(state_path, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, refused global: all the file's fault
        raise DqrmError(
            f"{state_path}: truncated or corrupt training state ({_first_line(e)}); {afresh}"
        ) from e
    missing = STATE_KEYS - saved.keys() if isinstance(saved, dict) else STATE_KEYS
    if missing:
        raise DqrmError(
            f"{state_path}: not a training state (no {', '.join(sorted(missing))}); {afresh}"
        )
    return saved


def same_settings(saved: object, now: dict) -> bool:
    """Whether a saved state's fine-tuning settings are ``now``'s. A setting added since the state
    was saved counts as the same while it is unset (``None``): states saved before
    ``embedding_grad_bits`` / ``mlp_grad_bits`` existed still resume."""
    if not isinstance(saved, dict):
        return False
    return {k: v for k, v in now.items() if k in saved or v is not None} == saved


def _settings_diff(saved: object, now: dict, saved_total: object, total: int) -> str:
    """``key saved -> now`` for the fine-tuning settings that differ (at most three)."""
    old = saved if isinstance(saved, dict) else {}
    parts = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in now.items() if old.get(k) != v]
    if not parts and saved_total != total:
        parts = [f"total steps {saved_total!r} -> {total}"]
    return ", ".join(parts[:3]) + (", ..." if len(parts) > 3 else "") or "settings differ"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


def _bar(total: int, initial: int):
    if not progress_enabled():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, leave=False)
