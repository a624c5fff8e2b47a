"""Which process of a data-parallel run this is, read from the environment PyTorch's launcher sets.

``torchrun`` (``torch.distributed.run``) and ``--nproc`` (:mod:`compress.train.distributed.launch`)
both start workers with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` set; :func:`start` joins the process group they describe: gloo for ``--device
cpu``, NCCL for ``--device cuda`` (each local rank on its own GPU, ``cuda:<LOCAL_RANK>``).

The device is the only thing that differs between a CPU and a CUDA run: tensors that travel are
made on :attr:`DistContext.device`, and nothing here assumes the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from compress.errors import SettingError
from compress.train.device import resolve_device

#: What every torch.distributed launcher sets for each worker.
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
#: How long a collective waits for the other ranks. Rank 0 evaluates alone while the others wait
#: at the next collective, so this is long; a worker that dies does not make the others wait for
#: it (their collectives fail at once, and the launcher stops the job).
COLLECTIVE_TIMEOUT = timedelta(hours=2)


def launched() -> bool:
    """Whether a torch.distributed launcher started this process (its variables are all set)."""
    return all(os.environ.get(k) for k in LAUNCH_ENV)


@dataclass(frozen=True)
class DistContext:
    """This worker: ``rank`` of ``world_size``, ``local_rank`` of ``local_world_size`` on its
    machine, the process group's ``backend``, the ``device`` it trains on, and how often the
    launcher restarted the workers."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    restart_count: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that evaluates, saves, writes and prints."""
        return self.rank == 0


def env_int(name: str, default: int | None = None) -> int:
    """An integer the launcher set; a :class:`SettingError` naming it when it is not one."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        if default is None:
            raise SettingError(f"{name} is not set: start the workers with torchrun or --nproc")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingError(f"{name}={raw!r} is not an integer") from None
    if value < 0:
        raise SettingError(f"{name}={raw!r} must be >= 0")
    return value


def start(device_name: str) -> DistContext:
    """Join the process group the launcher's environment describes, on ``--device device_name``."""
    rank, world = env_int("RANK"), env_int("WORLD_SIZE")
    if world < 1 or rank >= world:
        raise SettingError(f"RANK={rank} does not fit WORLD_SIZE={world}")
    local_rank = env_int("LOCAL_RANK", 0)
    device = resolve_device(device_name, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        extra = {"device_id": device} if device.type == "cuda" else {}
        restarts = env_int("TORCHELASTIC_RESTART_COUNT", 0)
        store = attempt_store(world, restarts)
        if store is None:
            dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, **extra)
        else:
            dist.init_process_group(
                backend,
                store=store,
                rank=rank,
                world_size=world,
                timeout=COLLECTIVE_TIMEOUT,
                **extra,
            )
    return DistContext(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        backend=backend,
        device=device,
        restart_count=env_int("TORCHELASTIC_RESTART_COUNT", 0),
        local_world_size=max(1, env_int("LOCAL_WORLD_SIZE", world)),
    )


def attempt_store(world: int, restarts: int) -> dist.Store | None:
    """The elastic agent's store, its keys prefixed by this attempt (``None`` when the agent does
    not share its store: ``init_process_group``'s own ``env://`` then makes one).

    The agent keeps one store for all its attempts; without a prefix, workers restarted after a
    failure (``--max-restarts``) read the addresses the killed attempt's workers published there
    and their process group fails to connect."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        env_int("MASTER_PORT"),
        world,
        is_master=False,
        timeout=COLLECTIVE_TIMEOUT,
    )
    return dist.PrefixStore(f"dqrm-compress/attempt-{restarts}/", store)


def stop() -> None:
    """Leave the process group (a no-op when none was joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()
