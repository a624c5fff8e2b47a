"""What a worker process of a data-parallel run does differently from a single process.

- **Quiet ranks.** Rank 0 prints (the plan, progress, the report, its errors); the other ranks
  print nothing: no progress bars, no warnings (:func:`quiet`).
- **Errors.** A worker that ends on an error it can name (the job's one-line errors, a lost peer,
  Ctrl-C, SIGTERM) leaves a failure record for the launcher
  (:func:`compress.train.distributed.failures.write_record`). Under ``--nproc`` the launcher
  prints the one line about the first cause, so no worker prints its error line; under a plain
  ``torchrun`` rank 0 prints its own (the others stay quiet, ``torchrun`` lists their records).

:func:`report` is what the command line's error handling calls; it answers whether the line should
still be printed. This module imports no torch.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

from compress import progress
from compress.train.distributed.failures import WorkerLost, write_record

#: Set for the workers ``--nproc`` starts (:mod:`compress.train.distributed.launch`; kept here so
#: that reading it imports no torch).
LAUNCHER_ENV = "DQRM_LAUNCHER_PID"


@dataclass(frozen=True)
class WorkerRole:
    """This worker's ``rank`` and whether it prints its own error lines (``speaks``)."""

    rank: int
    speaks: bool


_role: WorkerRole | None = None


def launched_by_nproc() -> bool:
    """Whether ``--nproc`` (not a user's torchrun) started this worker."""
    return bool(os.environ.get(LAUNCHER_ENV))


def activate(rank: int) -> WorkerRole:
    """Make this process worker ``rank``: quiet unless rank 0, errors recorded for the launcher."""
    global _role
    _role = WorkerRole(rank=rank, speaks=rank == 0 and not launched_by_nproc())
    if rank != 0:
        quiet()
    return _role


def deactivate() -> None:
    """Back to a plain process (tests run several jobs in one interpreter)."""
    global _role
    _role = None


def quiet() -> None:
    """No progress bars, warnings or library log lines from this process."""
    progress.set_enabled(False)
    warnings.simplefilter("ignore")
    logging.getLogger("torch").setLevel(logging.ERROR)


def report(kind: str, message: str, exit_code: int) -> bool:
    """Record why this process ends (``kind``: ``error``, ``interrupted``, ``terminated``; an
    ``error`` that is a lost peer is recorded as ``worker_lost`` by :func:`error_kind`). Returns
    whether the caller should print its line: always in a plain process."""
    if _role is None:
        return True
    write_record(kind, message, exit_code, _role.rank)
    return _role.speaks


def error_kind(error: BaseException) -> str:
    """``worker_lost`` for a collective that lost its peer, else ``error``."""
    return "worker_lost" if isinstance(error, WorkerLost) else "error"
