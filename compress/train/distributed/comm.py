"""The collectives of a data-parallel run, counting what each rank hands them.

Every tensor a rank sends goes through a :class:`Comm` method, which adds the tensor's bytes
(``numel * element_size``, what the backend is given to send) and the seconds spent in the call to
:class:`CommStats`, by purpose (``header``, ``embedding``, ``dense`` every step; ``control`` for
rank 0's decisions and the replica checks). ``bytes_per_step`` in ``--json`` is measured here.

A collective that fails because another worker went away (its sockets closed, a timeout) raises
:class:`~compress.train.distributed.failures.WorkerLost`, one line naming what was being
exchanged; the launcher reports the worker that failed first.

Objects (rank 0's metrics) travel as JSON, never pickled: ``json`` round-trips floats exactly.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from compress.errors import first_line
from compress.train.distributed.context import DistContext
from compress.train.distributed.failures import WorkerLost

T = TypeVar("T")
#: What the backends say when a peer went away (gloo raises a plain RuntimeError for it).
_LOST_PEER_SIGNS = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "timed out",
    "timeout",
    "socket",
    "nccl",
)
#: The purposes counted every training step (``bytes_per_step``).
STEP_PURPOSES = ("header", "embedding", "dense")


@dataclass
class CommStats:
    """Bytes handed to collectives by this rank, by purpose; seconds inside them; calls."""

    sent: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    calls: int = 0

    def add(self, purpose: str, nbytes: int, seconds: float) -> None:
        self.sent[purpose] = self.sent.get(purpose, 0) + int(nbytes)
        self.seconds[purpose] = self.seconds.get(purpose, 0.0) + seconds
        self.calls += 1

    def step_bytes(self) -> int:
        """Bytes of the per-step purposes (header, embedding, dense)."""
        return sum(self.sent.get(p, 0) for p in STEP_PURPOSES)

    def step_seconds(self) -> float:
        """Seconds inside the per-step collectives (waiting for the other ranks included)."""
        return sum(self.seconds.get(p, 0.0) for p in STEP_PURPOSES)


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def is_lost_peer(error: BaseException) -> bool:
    """Whether ``error`` from a collective means another worker went away."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(s in text for s in _LOST_PEER_SIGNS)


class Comm:
    """Collectives over the default process group, on ``ctx.device``, counted in :attr:`stats`."""

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx
        self.stats = CommStats()

    @contextmanager
    def _call(self, purpose: str, sent: int) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        except Exception as e:
            if is_lost_peer(e):
                raise WorkerLost(
                    f"lost contact with another worker while exchanging {purpose} ({first_line(e)})"
                ) from e
            raise
        self.stats.add(purpose, sent, time.perf_counter() - start)

    def all_gather(self, tensor: torch.Tensor, purpose: str) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (all the same shape and dtype), in rank order."""
        out = [torch.empty_like(tensor) for _ in range(self.ctx.world_size)]
        with self._call(purpose, nbytes(tensor)):
            dist.all_gather(out, tensor.contiguous())
        return out

    def all_gather_padded(
        self, tensor: torch.Tensor, lengths: list[int], purpose: str
    ) -> list[torch.Tensor]:
        """Every rank's 1-D ``tensor`` whose lengths (``lengths[r]`` on rank ``r``, known to every
        rank) differ: each is padded to the longest (backends gather equal sizes), the padding
        counted as sent, and cut off again."""
        longest = max(lengths)
        mine = lengths[self.ctx.rank]
        if tensor.numel() != mine:
            raise ValueError(f"message of {tensor.numel()} elements, {mine} announced")
        padded = tensor
        if mine < longest:
            padded = torch.zeros(longest, dtype=tensor.dtype, device=tensor.device)
            padded[:mine] = tensor
        gathered = self.all_gather(padded, purpose)
        return [g[:n] for g, n in zip(gathered, lengths, strict=True)]

    def all_reduce_sum(self, tensor: torch.Tensor, purpose: str) -> None:
        """Sum ``tensor`` over the ranks, in place."""
        with self._call(purpose, nbytes(tensor)):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def broadcast(self, tensor: torch.Tensor, purpose: str, src: int = 0) -> None:
        """Rank ``src``'s ``tensor`` into every rank's (in place)."""
        sent = nbytes(tensor) if self.ctx.rank == src else 0
        with self._call(purpose, sent):
            dist.broadcast(tensor, src=src)

    def share(self, value: T | None, purpose: str = "control", src: int = 0) -> T:
        """Rank ``src``'s JSON-able ``value`` on every rank (the others pass anything, e.g.
        ``None``): what rank ``src`` decided, applied everywhere."""
        device = self.ctx.device
        if self.ctx.rank == src:
            data = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)
            size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
        else:
            data, size = None, torch.zeros(1, dtype=torch.int64, device=device)
        self.broadcast(size, purpose, src)
        buf = data.to(device) if data is not None else torch.empty(int(size), dtype=torch.uint8)
        buf = buf.to(device)
        self.broadcast(buf, purpose, src)
        return json.loads(bytes(buf.cpu().numpy()).decode())

    def barrier(self, purpose: str = "control") -> None:
        with self._call(purpose, 0):
            dist.barrier()


def json_ready(value: Any) -> Any:
    """``value`` with numpy and torch scalars turned into Python numbers (for :meth:`Comm.share`)."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value
