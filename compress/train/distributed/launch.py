"""``--nproc N``: run the main job on N worker processes of this machine through PyTorch's elastic
agent, the launcher behind ``torchrun`` (``torch.distributed.run``).

The command line calls :func:`run_workers` with its own arguments; each worker runs ``python -m
compress`` with them, as ``torchrun --standalone --nproc-per-node N -m compress ...`` would (a
``c10d`` rendezvous on a free local port; ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
and ``MASTER_PORT`` set for each), and finds out from that environment that it is a worker
(:mod:`compress.train.distributed.context`). The launching process holds the output lock for the
whole job (:data:`~compress.train.distributed.worker.LAUNCHER_ENV` tells rank 0 so) and prints nothing while the workers run: rank 0
prints.

Failures. The agent watches the workers every :data:`MONITOR_INTERVAL` seconds; when one ends with
an error or is killed, the others are stopped (SIGTERM, then SIGKILL after
:data:`SHUTDOWN_TIMEOUT` seconds) and :func:`run_workers` raises one
:class:`~compress.train.distributed.failures.WorkerFailed` naming the first cause
(:func:`~compress.train.distributed.failures.root_cause`). The artifacts are written atomically
by rank 0, so a failed job leaves no partial output. With ``max_restarts`` K the agent starts the
workers again up to K times, and they resume from the last saved training state; a worker's own
error that a restart cannot change (bad input, the quality gate, Ctrl-C, SIGTERM) ends the job at
once.

Ctrl-C or SIGTERM to the launching process is passed to the workers (they clean up as a single
process does) and raised here as :class:`Interrupted`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from torch.distributed.elastic.agent.server.api import RunResult, WorkerSpec
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous import registry as rdzv_registry

from compress.train.distributed.failures import (
    Failure,
    WorkerFailed,
    describe,
    read_record,
    root_cause,
)
from compress.train.distributed.worker import LAUNCHER_ENV

#: Seconds between the agent's looks at the workers.
MONITOR_INTERVAL = 0.1
#: Seconds a stopped worker gets to clean up before SIGKILL.
SHUTDOWN_TIMEOUT = 10
#: Seconds the workers get to meet (rendezvous) when they start.
RENDEZVOUS_TIMEOUT = 120
#: Exit codes a restart cannot change: bad input, the quality gate, Ctrl-C, SIGTERM.
FINAL_EXIT_CODES = frozenset({2, 3, 130, 143})
#: The loggers of the agent and the rendezvous (quiet: the failure is reported in one line).
_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher")
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class Interrupted(Exception):
    """The launching process got ``signum`` (SIGINT or SIGTERM); the workers were stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass(frozen=True)
class LaunchSettings:
    """``--nproc``, ``--max-restarts``, and variables the workers get besides the launcher's own
    environment (``env``; :data:`LAUNCHER_ENV` is always set)."""

    nproc: int
    max_restarts: int = 0
    env: tuple[tuple[str, str], ...] = ()


class _Agent(LocalElasticAgent):
    """The local elastic agent, except that a worker's final error ends the job without restarts."""

    def _monitor_workers(self, worker_group) -> RunResult:  # type: ignore[no-untyped-def]
        result = super()._monitor_workers(worker_group)
        if result.is_failed() and final_failure([f.exitcode for f in result.failures.values()]):
            self._remaining_restarts = 0
        return result


def final_failure(exit_codes: Sequence[int]) -> bool:
    """Whether workers that ended with ``exit_codes`` failed in a way a restart cannot change: one
    of :data:`FINAL_EXIT_CODES`, and no worker killed by a signal (a killed worker is the cause;
    the others' errors, such as a truncated message from it refused as bad input, follow from
    it)."""
    return any(c in FINAL_EXIT_CODES for c in exit_codes) and not any(c < 0 for c in exit_codes)


def worker_threads(nproc: int) -> int:
    """Threads per worker: this machine's CPUs shared out (at least one)."""
    return max(1, (os.cpu_count() or 1) // nproc)


def run_workers(arguments: Sequence[str], settings: LaunchSettings, state_hint: str = "") -> None:
    """Run ``python -m compress *arguments`` on ``settings.nproc`` workers until all end.

    Raises:
        WorkerFailed: a worker failed (after any restarts); one line about the first cause, with
            ``state_hint`` (what ``--resume`` continues from) where training could continue.
        Interrupted: this process got SIGINT or SIGTERM.
    """
    env = {**dict(settings.env), LAUNCHER_ENV: str(os.getpid())}
    if "OMP_NUM_THREADS" not in os.environ:  # the user's setting wins
        env["OMP_NUM_THREADS"] = str(worker_threads(settings.nproc))
    with _quiet_agent(), _environment(env), tempfile.TemporaryDirectory(prefix="dqrm-") as logs:
        rdzv = RendezvousParameters(
            backend="c10d",
            endpoint="localhost:0",
            run_id=f"dqrm-{uuid.uuid4().hex}",
            min_nodes=1,
            max_nodes=1,
            timeout=RENDEZVOUS_TIMEOUT,
        )
        spec = WorkerSpec(
            role="dqrm-compress",
            local_world_size=settings.nproc,
            entrypoint=sys.executable,
            args=("-m", "compress", *arguments),
            rdzv_handler=rdzv_registry.get_rendezvous_handler(rdzv),
            max_restarts=settings.max_restarts,
            monitor_interval=MONITOR_INTERVAL,
        )
        agent = _Agent(
            spec=spec,
            logs_specs=DefaultLogsSpecs(log_dir=logs),
            shutdown_timeout=SHUTDOWN_TIMEOUT,
        )
        try:
            result = agent.run()
        except SignalException as e:
            raise Interrupted(int(e.sigval)) from None
        finally:
            spec.rdzv_handler.shutdown()
    if result.is_failed():
        failures = [
            Failure(rank, f.pid, f.exitcode, read_record(f.error_file_data))
            for rank, f in result.failures.items()
        ]
        cause = root_cause(failures)
        if cause is None:  # pragma: no cover - a failed result always names a failure
            raise WorkerFailed("the workers failed")
        raise describe(cause, state_hint)


@contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """``env`` added to this process's environment (the workers inherit it), then restored."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def _quiet_agent() -> Iterator[None]:
    """The agent's loggers silenced, and the signal handlers it installs undone afterwards (a
    caller such as a test keeps its own)."""
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    levels = [lg.level for lg in loggers]
    handlers = {s: signal.getsignal(s) for s in _SIGNALS}
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if threading.current_thread() is threading.main_thread():
            for s, h in handlers.items():
                if h is not None:
                    signal.signal(s, h)
