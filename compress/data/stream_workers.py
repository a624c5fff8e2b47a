"""Background worker processes that read blocks of a streamed input, delivered in block order.

:class:`BlockReader` reads a numbered sequence of tasks (task ``t`` is block part
``tasks[t % len(tasks)]`` of pass ``t // len(tasks)``) with ``workers`` processes: worker ``w``
reads the tasks ``t`` with ``t % workers == w``, in increasing order, into its own bounded queue
(``prefetch`` blocks), and the consumer takes task ``t`` from queue ``t % workers``. The blocks
therefore arrive in task order whatever the workers' timing, and what a pass yields does not depend
on the number of workers. Memory in flight is at most ``workers * (prefetch + 2)`` blocks.

Failures: a :class:`~compress.errors.DqrmError` in a worker (a bad line) is raised again in the
consumer, with its one-line message, when the consumer reaches that task, so the first bad line in
file order is the one reported; any other exception in a worker is raised as a ``RuntimeError``
carrying the worker's traceback; a worker that dies without a word (killed) is a
:class:`~compress.errors.DqrmError` naming its exit code. Nothing waits forever on a dead worker.

Clean-up: :meth:`BlockReader.close` (also on garbage collection and at interpreter exit) terminates
the workers and waits for them. Workers ignore Ctrl-C (the terminal sends it to the whole process
group; the consumer decides), die with their parent on Linux (``PR_SET_PDEATHSIG``), and otherwise
notice a parent that is gone within a second while waiting to hand over a block, so a killed main
process leaves no orphans.

Start method: ``fork`` where the platform has it (workers start in milliseconds and import nothing),
else ``spawn``; any method works, since the worker function and its arguments are picklable. The
workers use numpy only, never torch, so forking a process whose torch thread pools are running is
safe (as in PyTorch's own ``DataLoader``).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import multiprocessing as mp
import os
import queue
import signal
import sys
import traceback
import weakref
from collections.abc import Iterator, Sequence

from compress.data.stream_source import BlockFiles, RowBlock, Source, Task, read_task
from compress.errors import DqrmError

#: Seconds between checks that a worker (or, from a worker, the parent) is still alive.
POLL_SECONDS = 0.25
#: Seconds ``close`` waits for a terminated worker before killing it.
JOIN_SECONDS = 5.0

_PR_SET_PDEATHSIG = 1
_open_readers: weakref.WeakSet[BlockReader] = weakref.WeakSet()


def default_start_method() -> str:
    """``fork`` where available, else ``spawn`` (see the module docstring)."""
    return "fork" if "fork" in mp.get_all_start_methods() else "spawn"


class BlockReader:
    """Read tasks ``first`` to ``stop - 1`` (``stop=None``: endlessly) of ``tasks`` over
    ``source``; iterate once for ``(task number, RowBlock)`` in task order (the workers start on
    the first ``next`` and end when the iteration ends or is closed). ``workers=0`` reads in this
    process (no background work)."""

    def __init__(
        self,
        source: Source,
        tasks: Sequence[Task],
        *,
        workers: int,
        prefetch: int = 2,
        first: int = 0,
        stop: int | None = None,
        start_method: str | None = None,
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
        self.start_method = start_method or default_start_method()
        self._procs: list = []
        self._queues: list = []
        self._files: BlockFiles | None = None
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
        return [p.pid for p in self._procs if p.pid is not None]

    def close(self) -> None:
        """Stop the workers and wait for them; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for p in self._procs:
            if p.is_alive():
                p.terminate()
        for p in self._procs:
            p.join(JOIN_SECONDS)
            if p.is_alive():
                p.kill()
                p.join()
        for q in self._queues:
            q.cancel_join_thread()
            q.close()
        if self._files is not None:
            self._files.close()
        _open_readers.discard(self)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at shutdown the process module may be gone
            self.close()

    def _start(self) -> None:
        if self._started:
            return
        if self._closed:
            raise RuntimeError("block reader is closed")
        self._started = True
        if self.workers == 0:
            self._files = BlockFiles()
            return
        ctx = mp.get_context(self.start_method)
        parent = os.getpid()
        _open_readers.add(self)
        for w in range(self.workers):
            q = ctx.Queue(maxsize=self.prefetch)
            p = ctx.Process(
                target=_worker_main,
                args=(self.source, self.tasks, w, self.workers, self.first, self.stop, q, parent),
                name=f"dqrm-data-{w}",
                daemon=True,
            )
            self._queues.append(q)
            self._procs.append(p)
        for p in self._procs:
            p.start()

    def _get(self, t: int) -> RowBlock:
        if self.workers == 0:
            assert self._files is not None
            return read_task(self.source, self.tasks[t % len(self.tasks)], self._files)
        w = t % self.workers
        q, p = self._queues[w], self._procs[w]
        while True:
            try:
                kind, number, payload = q.get(timeout=POLL_SECONDS)
                break
            except queue.Empty:
                if p.is_alive():
                    continue
                try:  # it may have handed over its last words just before it ended
                    kind, number, payload = q.get(timeout=POLL_SECONDS)
                    break
                except queue.Empty:
                    raise DqrmError(
                        f"data loader worker {w} (pid {p.pid}) ended before reading block "
                        f"{t % len(self.tasks)} ({_exit_reason(p.exitcode)})"
                    ) from None
        if kind == "error":
            raise payload from None
        if kind == "crash":
            raise RuntimeError(f"data loader worker {w} failed:\n{payload}")
        if number != t:
            raise RuntimeError(f"data loader worker {w} sent block {number}, expected {t}")
        return payload


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _worker_main(
    source: Source,
    tasks: tuple[Task, ...],
    worker: int,
    workers: int,
    first: int,
    stop: int | None,
    out: mp.Queue,
    parent: int,
) -> None:
    """Read every ``workers``-th task from the first ``t >= first`` with ``t % workers ==
    worker`` into ``out`` as ``("block", t, RowBlock)``; on a failure hand over
    ``("error", t, DqrmError)`` or ``("crash", t, traceback text)`` and end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the consumer to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked child must not run the CLI's handler
    _die_with_parent(parent)
    files = BlockFiles()
    t = first + (worker - first) % workers
    try:
        while stop is None or t < stop:
            block = read_task(source, tasks[t % len(tasks)], files)
            _put(out, ("block", t, block), parent)
            t += workers
    except DqrmError as e:
        _put(out, ("error", t, e), parent)
    except Exception:
        _put(out, ("crash", t, traceback.format_exc()), parent)
    finally:
        files.close()


def _put(out: mp.Queue, item: tuple, parent: int) -> None:
    """Hand ``item`` over, waiting while the queue is full; end this process once the parent is
    gone (nobody will read it)."""
    while True:
        try:
            out.put(item, timeout=POLL_SECONDS * 4)
            return
        except queue.Full:
            if os.getppid() != parent:
                os._exit(0)


def _die_with_parent(parent: int) -> None:
    """Ask Linux to send SIGTERM to this process when its parent ends; end now if it already has."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the parent check in _put remains
            pass
    if os.getppid() != parent:
        os._exit(0)


@atexit.register
def _close_all() -> None:
    for reader in list(_open_readers):
        reader.close()
