"""Background worker processes that read blocks of a streamed input, delivered in block order.

:class:`BlockReader` reads a numbered sequence of tasks (task ``t`` is block part
``tasks[t % len(tasks)]`` of pass ``t // len(tasks)``) with ``workers`` processes: worker ``w``
reads the tasks ``t`` with ``t % workers == w``, in increasing order, at most ``prefetch`` blocks
ahead, and the consumer takes task ``t`` from worker ``t % workers``. The blocks therefore arrive in
task order whatever the workers' timing, and what a pass yields does not depend on the number of
workers. Memory in flight is at most ``workers * (prefetch + 2)`` blocks.

Workers are fresh interpreters (``python -m compress.data.stream_workers``) that import numpy and
the block reader only, never torch: about 0.2 s and 30-40 MB each to start. They are not forked
from the training process on purpose: a forked child keeps the parent's pages as they were when it
forked, so every page the parent writes afterwards (model weights, optimizer state) would exist
twice, and a model of gigabytes would cost gigabytes more per worker. A worker gets its job (the
indexed source, its tasks) as a pickle on its standard input and sends each block as a pickle on
its standard output.

Failures: a :class:`~compress.errors.DqrmError` in a worker (a bad line) is raised again in the
consumer, with its one-line message, when the consumer reaches that task, so the first bad line in
file order is the one reported; any other exception in a worker is raised as a ``RuntimeError``
carrying the worker's traceback; a worker that ends without a word (killed) is a
:class:`~compress.errors.DqrmError` naming how it ended. Nothing waits on a dead worker: its
output ends, and reading it stops.

Clean-up: :meth:`BlockReader.close` (also when the iteration ends, on garbage collection and at
interpreter exit) terminates the workers and waits for them. Workers run in their own session
(Ctrl-C at a terminal reaches only the training process, which decides), and end as soon as their
parent does: its end closes their standard input (and on Linux ``PR_SET_PDEATHSIG`` sends them
SIGTERM), so a killed main process leaves no orphans.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from compress.data.stream_source import BlockFiles, RowBlock, Source, Task
from compress.errors import DqrmError

#: Seconds ``close`` waits for a terminated worker before killing it.
JOIN_SECONDS = 5.0
#: The function a worker reads a task with (``module:function``); tests may name another.
READ_TASK = "compress.data.stream_source:read_task"

_PR_SET_PDEATHSIG = 1
_open_readers: weakref.WeakSet[BlockReader] = weakref.WeakSet()


class BlockReader:
    """Read tasks ``first`` to ``stop - 1`` (``stop=None``: endlessly) of ``tasks`` over
    ``source``; iterate once for ``(task number, RowBlock)`` in task order (the workers start on
    the first ``next`` and end when the iteration ends or is closed). ``workers=0`` reads in this
    process (no background work). ``read_task`` names the reading function (``module:function``,
    importable by the workers; default :data:`READ_TASK`)."""

    def __init__(
        self,
        source: Source,
        tasks: Sequence[Task],
        *,
        workers: int,
        prefetch: int = 2,
        first: int = 0,
        stop: int | None = None,
        read_task: str | None = None,
    ) -> None:
        if not tasks:
            raise ValueError("a block reader needs at least one task")
        if workers < 0 or prefetch < 1:
            raise ValueError("workers must be >= 0 and prefetch >= 1")
        self.source = source
        self.tasks = tuple(tasks)
        self.workers = workers
        self.prefetch = prefetch
        self.first = first
        self.stop = stop
        self.read_task = read_task or READ_TASK
        self._procs: list[subprocess.Popen] = []
        self._files: BlockFiles | None = None
        self._read: Callable[[Source, Task, BlockFiles], RowBlock] | None = None
        self._closed = False
        self._started = False

    def __enter__(self) -> BlockReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[tuple[int, RowBlock]]:
        self._start()
        t = self.first
        try:
            while self.stop is None or t < self.stop:
                yield t, self._get(t)
                t += 1
        finally:
            self.close()

    def pids(self) -> list[int]:
        """Process ids of the workers (empty before the first block is asked for)."""
        return [p.pid for p in self._procs]

    def close(self) -> None:
        """Stop the workers and wait for them; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
        for p in self._procs:
            try:
                p.wait(JOIN_SECONDS)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            for pipe in (p.stdin, p.stdout, p.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        if self._files is not None:
            self._files.close()
        _open_readers.discard(self)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at shutdown the modules may be gone already
            self.close()

    def _start(self) -> None:
        if self._started:
            return
        if self._closed:
            raise RuntimeError("block reader is closed")
        self._started = True
        if self.workers == 0:
            self._files = BlockFiles()
            self._read = _import(self.read_task)
            return
        _open_readers.add(self)
        for w in range(self.workers):
            proc = subprocess.Popen(
                [sys.executable, "-m", __name__],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # Ctrl-C at a terminal is the consumer's to handle
                env=_worker_env(),
            )
            self._procs.append(proc)
            job = {
                "sys_path": list(sys.path),
                "read_task": self.read_task,
                "source": self.source,
                "tasks": self.tasks,
                "worker": w,
                "workers": self.workers,
                "first": self.first,
                "stop": self.stop,
                "prefetch": self.prefetch,
            }
            assert proc.stdin is not None
            pickle.dump(job, proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            proc.stdin.flush()  # stdin stays open: its end tells the worker that we ended

    def _get(self, t: int) -> RowBlock:
        if self.workers == 0:
            assert self._files is not None and self._read is not None
            return self._read(self.source, self.tasks[t % len(self.tasks)], self._files)
        w = t % self.workers
        proc = self._procs[w]
        assert proc.stdout is not None
        try:
            kind, number, payload = pickle.load(proc.stdout)
        except (EOFError, OSError, pickle.UnpicklingError):
            raise DqrmError(
                f"data loader worker {w} (pid {proc.pid}) ended before reading block "
                f"{t % len(self.tasks)} ({_exit_reason(proc)})"
            ) from None
        if kind == "error":
            raise payload from None
        if kind == "crash":
            raise RuntimeError(f"data loader worker {w} failed:\n{payload}")
        if number != t:
            raise RuntimeError(f"data loader worker {w} sent block {number}, expected {t}")
        return payload


def _worker_env() -> dict[str, str]:
    """This environment, with the directory holding the ``compress`` package first on
    ``PYTHONPATH`` (the worker imports it before it reads the job's ``sys.path``)."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _exit_reason(proc: subprocess.Popen) -> str:
    try:
        code = proc.wait(JOIN_SECONDS)
    except subprocess.TimeoutExpired:
        return "its output ended"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    err = b""
    if proc.stderr is not None:
        with contextlib.suppress(OSError):
            err = proc.stderr.read()
    last = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
    return f"exit code {code}" + (f": {last[0][:200]}" if last[0] else "")


def _import(name: str) -> Callable:
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


# ---------------------------------------------------------------------------- the worker side


def _worker(stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Read the job from ``stdin``, then hand over ``("block", t, RowBlock)`` for every task ``t``
    of this worker on ``stdout``; on a failure ``("error", t, DqrmError)`` or
    ``("crash", t, traceback text)``, and end. Reads up to ``prefetch`` blocks ahead of the
    consumer (a thread writes while the next block is parsed)."""
    job = pickle.load(stdin)
    sys.path[:] = job["sys_path"]
    read = _import(job["read_task"])
    threading.Thread(target=_end_with_parent, args=(stdin,), daemon=True).start()
    source, tasks = job["source"], job["tasks"]
    workers, stop = job["workers"], job["stop"]
    ready: queue.Queue = queue.Queue(maxsize=job["prefetch"])
    writer = threading.Thread(target=_write, args=(ready, stdout), daemon=True)
    writer.start()
    files = BlockFiles()
    t = job["first"] + (job["worker"] - job["first"]) % workers
    try:
        while stop is None or t < stop:
            ready.put(("block", t, read(source, tasks[t % len(tasks)], files)))
            t += workers
    except DqrmError as e:
        ready.put(("error", t, e))
    except Exception:
        ready.put(("crash", t, traceback.format_exc()))
    finally:
        files.close()
        ready.put(None)
        writer.join()


def _write(ready: queue.Queue, stdout: BinaryIO) -> None:
    while (item := ready.get()) is not None:
        try:
            pickle.dump(item, stdout, protocol=pickle.HIGHEST_PROTOCOL)
            stdout.flush()
        except OSError:  # the consumer closed its end: nobody wants more
            os._exit(0)


def _end_with_parent(stdin: BinaryIO) -> None:
    """End this process once the parent is gone (its end of our standard input closes)."""
    with contextlib.suppress(OSError):
        while stdin.read(1 << 16):
            pass
    os._exit(0)


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM to this process when its parent ends."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@atexit.register
def _close_all() -> None:
    for reader in list(_open_readers):
        reader.close()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    warnings.simplefilter("ignore")  # stderr is read only once a worker has died
    _die_with_parent()
    _worker(sys.stdin.buffer, sys.stdout.buffer)
