"""What the training loop does differently on a worker of a data-parallel run.

:func:`compress.train.loop.fit` takes a :class:`DataParallel` and calls it at a few points; every
rank runs the same loop over the same sequence of global batches:

- **Shares** (:func:`share_bounds`): the global batch of step ``k`` is the one a single process
  would train on at step ``k`` (same seed, same ``batch_size``); rank ``r`` of ``W`` takes its rows
  ``[r*B//W, (r+1)*B//W)``. The shares are disjoint and their union is the global batch; a
  streamed input is read by every rank in the same seeded order and each keeps its share.
- **Loss scale** (:meth:`DataParallel.loss_scale`): a rank's mean loss is multiplied by
  ``rows / B``, so the ranks' gradients add up to the gradient of the global batch's mean loss
  (per sample exactly the single process's ``1/B`` when ``W`` divides ``B``).
- **Exchange** (:meth:`DataParallel.step`, :mod:`.grad_exchange`) between backward and the
  optimizer step: every rank ends with the same summed gradient and the global loss.
- **One rank decides, all apply** (:meth:`DataParallel.agree`): rank 0 evaluates on the selection
  slice; its metrics are sent to every rank, which then take the same keep-best decision and log
  the same history. Only rank 0 copies and restores the best weights, saves the training state and
  (after the loop) converts and writes; the others end with the loop.
- **Replicas** (:meth:`DataParallel.check_replicas`, :mod:`.replicas`): at every evaluation and at
  the end the ranks compare digests of their weights (table-wise QAT scales, refreshed from
  ``max|W|`` on each rank, included).
- **State** (:meth:`DataParallel.state_extras`): the INT8 dense exchange's error-feedback residuals
  of every rank travel with rank 0's saved state; ``--resume`` with the same number of workers
  restores each rank's own, with another number they restart from zero (nothing else in the state
  depends on the number of workers: shares are cut from the same global batches).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from compress.errors import DqrmError, SettingError
from compress.train.config import TrainConfig
from compress.train.distributed import accounting, capacity
from compress.train.distributed.comm import Comm, json_ready
from compress.train.distributed.context import DistContext
from compress.train.distributed.grad_exchange import ExchangeSettings, GradExchange
from compress.train.distributed.replicas import digest, first_difference


class ReplicasDiffer(DqrmError):
    """The ranks' weights differ (a bug or faulty hardware, not an input): exit code 1."""

    exit_code = 1


def share_bounds(batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of a global batch of ``batch_size`` that rank ``rank`` trains on."""
    return rank * batch_size // world_size, (rank + 1) * batch_size // world_size


def exchange_settings(config: TrainConfig) -> ExchangeSettings:
    """The recipe's gradient widths (``None`` means 32)."""
    return ExchangeSettings(config.embedding_grad_bits or 32, config.mlp_grad_bits or 32)


class DataParallel:
    """The loop's hooks for worker ``ctx`` (see the module docstring)."""

    def __init__(self, ctx: DistContext, config: TrainConfig) -> None:
        if config.batch_size < ctx.world_size:
            raise SettingError(
                f"batch_size {config.batch_size} is smaller than the {ctx.world_size} workers: "
                "every worker needs at least one row of each batch"
            )
        self.ctx = ctx
        self.settings = exchange_settings(config)
        self.optimizer = config.optimizer
        self.comm = Comm(ctx)
        self.exchange: GradExchange | None = None
        self.params: list[nn.Parameter] = []
        self.seconds = 0.0
        self.notes: list[str] = []

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    def share(self, batch_size: int) -> tuple[int, int]:
        """This rank's rows of each global batch."""
        return share_bounds(batch_size, self.ctx.rank, self.ctx.world_size)

    def attach(self, tables: Sequence[nn.Parameter], dense: Sequence[nn.Parameter]) -> None:
        """The trained parameters (the loop's two optimizer groups), in the same order on every
        rank; refuses replicas whose optimizer state does not fit this machine
        (:mod:`.capacity`)."""
        capacity.check(tables, self.optimizer, self.ctx.local_world_size)
        self.params = [*tables, *dense]
        self.exchange = GradExchange(tables, dense, self.comm, self.settings)

    @staticmethod
    def loss_scale(rows: int, batch_size: int) -> float:
        """What a rank's mean loss over ``rows`` rows is multiplied by: its share of the batch."""
        return rows / batch_size

    def step(self, local_loss: float) -> float:
        """Exchange the gradients (every rank ends with their sum); the global mean loss."""
        if self.exchange is None:
            raise RuntimeError("DataParallel.attach() was not called")
        start = time.perf_counter()
        loss = self.exchange.step(local_loss)
        self.seconds += time.perf_counter() - start
        return loss

    def agree(self, value: object) -> object:
        """Rank 0's ``value`` (metrics, JSON-ready) on every rank."""
        return self.comm.share(json_ready(value) if self.is_main else None)

    def check_replicas(self, model: nn.Module, step: int) -> None:
        """Stop with one line when this rank's weights differ from rank 0's."""
        mine = digest(model)
        theirs = self.comm.share(mine if self.is_main else None)
        key = first_difference(model, mine, theirs)
        if key is not None:
            raise ReplicasDiffer(
                f"rank {self.ctx.rank}: after step {step} its copy of {key} differs from rank 0's "
                "(the workers' weights must stay identical; this is a bug, please report it)"
            )

    def state_extras(self) -> dict:
        """What rank 0 saves with the training state for the others (a collective: every rank
        calls it at every save)."""
        extras: dict = {"world_size": self.ctx.world_size, "residuals": None}
        mine = self.exchange.residual_state() if self.exchange is not None else None
        if mine is not None:
            residuals = self.comm.all_gather(mine["residual"].to(self.device), "control")
            extras["residuals"] = {
                "key": mine["key"],
                "per_rank": [r.cpu() for r in residuals],
            }
        return extras

    def load_state_extras(self, saved: dict | None) -> None:
        """Restore this rank's residual from a saved state (zero when there is none, or the state
        was saved by another number of workers)."""
        if self.exchange is None:
            raise RuntimeError("DataParallel.attach() was not called")
        residuals = (saved or {}).get("residuals")
        same_world = (saved or {}).get("world_size") == self.ctx.world_size
        if residuals is None or not same_world:
            self.exchange.load_residual_state(None)
            if residuals is not None:
                self.notes.append(
                    f"resumed with {self.ctx.world_size} workers from a state saved by "
                    f"{saved['world_size']}: the MLP gradients' error feedback restarts from zero"  # type: ignore[index]
                )
            return
        self.exchange.load_residual_state(
            {"key": residuals["key"], "residual": residuals["per_rank"][self.ctx.rank]}
        )

    def report(self) -> dict:
        """The ``distributed`` object of ``--json`` (:mod:`.accounting`)."""
        if self.exchange is None:
            raise RuntimeError("DataParallel.attach() was not called")
        return accounting.report(
            self.ctx,
            self.settings,
            self.params,
            self.exchange.counts,
            self.comm.stats,
            self.seconds,
        )
