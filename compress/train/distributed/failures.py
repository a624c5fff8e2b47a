"""What a failed worker leaves behind, and how the launcher names the one failure that matters.

When one worker of a data-parallel run fails, the others fail right after it (their collectives
lose a peer) or are stopped by the launcher; a user needs one line about the first cause, not one
per worker. Each worker that ends on an error it can name writes a **failure record** to the file
PyTorch's elastic agent gives it (``TORCHELASTIC_ERROR_FILE``, the agent's own error-file format,
so ``torchrun`` shows it too) with a ``kind``:

- ``error``: the job's own one-line error (bad input, the quality gate: exit 2 or 3, or a worker
  error with exit 1);
- ``worker_lost``: a collective failed because another worker went away (a consequence);
- ``interrupted`` / ``terminated``: Ctrl-C or SIGTERM (the launcher stopping it, or a user).

A worker killed outright (SIGKILL, the kernel's out-of-memory killer) writes nothing. The launcher
(:func:`root_cause`) prefers an ``error`` (rank 0's if it has one), then a worker that died by a
signal without a record, then a lost worker, then an interruption.

This module imports no torch: the command line reads it before deciding anything.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass

from compress.errors import DqrmError

#: The record kinds, most telling first (:func:`root_cause`).
KINDS = ("error", "killed", "worker_lost", "interrupted", "terminated")
#: The most of a record's message that is shown (a worker writes one line).
MESSAGE_CHARS = 2000
#: Set by PyTorch's elastic agent (torchrun, ``--nproc``): where a worker writes its failure record.
ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"


class WorkerLost(DqrmError):
    """A collective failed because another worker of the run went away (killed, crashed, or
    stopped on its own error): a consequence, exit code 1, never the root cause reported."""

    exit_code = 1


class WorkerFailed(DqrmError):
    """A data-parallel job stopped because a worker failed; the message names the worker and why.
    The exit code is the failed worker's own when it is one of this tool's (2 bad input, 3 the
    quality gate, 130, 143), else 1."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Failure:
    """One failed worker as the launcher saw it: ``exitcode`` (negative: killed by that signal)
    and the record it wrote (``None``: it wrote none)."""

    rank: int
    pid: int
    exitcode: int
    record: dict | None = None

    @property
    def kind(self) -> str:
        if self.record is not None and self.record.get("kind") in KINDS:
            return str(self.record["kind"])
        return "killed" if self.exitcode < 0 else "error"

    @property
    def seconds(self) -> float:
        """When the record was written (``inf`` without one: after anything recorded)."""
        if self.record is None:
            return float("inf")
        try:
            return float(self.record.get("time", "inf"))
        except (TypeError, ValueError):
            return float("inf")


def write_record(kind: str, message: str, exit_code: int, rank: int) -> None:
    """Write this worker's failure record where the elastic agent reads it (nothing when no agent
    started this process). A file that cannot be written is skipped: the exit code still says it."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    record = {"kind": kind, "rank": rank, "exit_code": exit_code, "time": repr(time.time())}
    data = {
        "message": {
            "message": message,
            "extraInfo": {"timestamp": str(int(time.time())), "dqrm": json.dumps(record)},
        }
    }
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f)
    except OSError:
        pass


def read_record(error_file_data: object) -> dict | None:
    """The record :func:`write_record` wrote, from the JSON the elastic agent read back (``None``
    when the worker wrote none, or the agent's own format)."""
    try:
        message = error_file_data["message"]  # type: ignore[index]
        record = json.loads(message["extraInfo"]["dqrm"])
        lines = str(message["message"]).strip().splitlines()
        record["message"] = lines[0][:MESSAGE_CHARS] if lines else ""  # one line, as written
    except (KeyError, TypeError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def root_cause(failures: Iterable[Failure]) -> Failure | None:
    """The failure to report: the earliest ``error`` (rank 0's first), else a worker killed by a
    signal without a record, else the earliest lost worker, else the earliest interruption."""
    items = list(failures)
    for kind in KINDS:
        found = [f for f in items if f.kind == kind]
        if found:
            return min(found, key=lambda f: (f.rank != 0 or kind != "error", f.seconds, f.rank))
    return None


def describe(failure: Failure, state_hint: str) -> WorkerFailed:
    """One line for ``failure`` (``state_hint``: what ``--resume`` would continue from, or ``""``)
    with the exit code the launcher ends with."""
    record = failure.record or {}
    message = str(record.get("message", "")).strip()
    if failure.kind == "killed":
        return WorkerFailed(
            f"worker rank {failure.rank} (pid {failure.pid}) was killed by "
            f"{_signal_name(-failure.exitcode)}; the job stopped and wrote nothing{state_hint}"
        )
    if failure.kind == "error":
        code = record.get("exit_code", failure.exitcode)
        code = code if isinstance(code, int) and code in (2, 3) else 1
        where = "" if failure.rank == 0 else f"rank {failure.rank}: "
        text = message or f"worker exited with code {failure.exitcode}"
        hint = state_hint if code == 1 else ""
        return WorkerFailed(f"{where}{text}{hint}", code)
    if failure.kind == "worker_lost":
        return WorkerFailed(f"rank {failure.rank}: {message}{state_hint}")
    code = 130 if failure.kind == "interrupted" else 143
    return WorkerFailed(f"worker rank {failure.rank} was {failure.kind}{state_hint}", code)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
