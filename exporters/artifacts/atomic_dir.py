"""Output directories that faults never leave half-written: a lock, staging, a crash-safe swap.

Everything lives beside ``out`` under hidden names derived from it::

    .<out>.lock              taken (``flock``) by the one run writing ``out``; holds its pid
    .<out>.partial-<id>      a directory being built; after a swap, the old output being deleted
    .<out>.old-<id>          the previous output between the two renames of the fallback swap
    .<out>.tables-<id>       converted tables written while the run converts them
                             (:func:`table_staging`), moved into the stage when it is built

A run on ``out`` holds :func:`output_lock` from its start to its end, so a second run on the same
``out`` is refused at once (one line naming the lock file and the holder's pid). Under the lock,
:func:`recover` first repairs what a killed run left: when ``out`` is missing and a ``.old-*``
directory exists, a kill fell between the two renames of the fallback swap, and the old output is
renamed back (the killed run did not finish, so its ``out`` is what was there before it); then every
``.partial-*``, ``.old-*`` and ``.tables-*`` of ``out`` is removed (but the ``.tables-*`` this
process is using). An ``out`` that is itself a symbolic link is
refused before the lock is taken (the swap would replace the link, not fill its target).

The swap (:func:`swap_in`) never leaves nothing at ``out`` that :func:`recover` cannot put back:

- ``renameat2(RENAME_EXCHANGE)`` (Linux 3.15+, glibc 2.28+, most local file systems) exchanges
  the staged directory and ``out`` in one atomic step; the old output is then at the stage's
  name and is deleted. A kill at any moment leaves ``out`` complete, old or new.
- Where the exchange is not available: rename ``out`` to ``.<out>.old-<id>``, rename the stage to
  ``out``, rename the old one to the stage's name and delete it. Only a kill between the first two
  renames leaves ``out`` missing, and then ``.<out>.old-<id>`` is the complete old output, which
  the next run restores. (An ``.old-*`` directory is never deleted in place, so it is always
  complete.)

An ``OSError`` while staging (a full disk, no permission, a read-only file system, a quota), or an
error raised while handling one, becomes one :class:`~compress.errors.ArtifactError` naming the
path, with the stage removed.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from compress.errors import ArtifactError, DqrmError, os_error_in, os_error_reason
from compress.io.atomic_file import temp_dir_beside

_PARTIAL = "partial-"
_OLD = "old-"
_TABLES = "tables-"
_TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")  # tempfile's name alphabet
_AT_FDCWD = -100
_RENAME_EXCHANGE = 1 << 1
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}


def lock_path(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.lock"


# --------------------------------------------------------------------------------------------
# the lock


@dataclass
class _Held:
    fd: int
    path: Path
    count: int


_HELD: dict[tuple[int, int], _Held] = {}  # (st_dev, st_ino) of the lock file -> this process's hold


@dataclass
class OutputLock:
    """A hold on ``.<out>.lock``; re-entrant within one process (the CLI and ``save`` both take
    it). :meth:`release` once per :func:`output_lock`; the last release deletes the file."""

    path: Path
    _key: tuple[int, int]
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        held = _HELD[self._key]
        held.count -= 1
        if held.count == 0:
            del _HELD[self._key]
            # unlinked while still held: a waiter that opened this inode re-checks the path
            Path(held.path).unlink(missing_ok=True)
            os.close(held.fd)

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def output_lock(out_dir: Path) -> OutputLock:
    """Take ``.<out>.lock`` without waiting; :class:`ArtifactError` naming it and the holder's pid
    when another process holds it, or naming ``out`` when it is a symbolic link
    (:func:`refuse_symlink`). Creates ``out``'s parent directory."""
    out_dir = Path(out_dir)
    refuse_symlink(out_dir)
    path = lock_path(out_dir)
    _mkdir_parent(out_dir)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ArtifactError(f"{path}: cannot create the lock file: {os_error_reason(e)}") from e
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if key in _HELD:  # this process holds it already
            os.close(fd)
            _HELD[key].count += 1
            return OutputLock(path, key)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "another process"
            raise ArtifactError(
                f"{path}: {out_dir} is being written by another run ({who}); wait for it to "
                "finish or choose another --out"
            ) from None
        except OSError as e:
            os.close(fd)
            raise ArtifactError(f"{path}: cannot lock: {os_error_reason(e)}") from e
        if not _same_file(path, key):  # the previous holder released (and deleted) it meanwhile
            os.close(fd)
            continue
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as e:  # a full disk, a quota: no empty lock file is left behind
            path.unlink(missing_ok=True)
            os.close(fd)
            raise ArtifactError(f"{path}: cannot write the lock file: {os_error_reason(e)}") from e
        _HELD[key] = _Held(fd, path, 1)
        return OutputLock(path, key)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _same_file(path: Path, key: tuple[int, int]) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == key


def _mkdir_parent(out_dir: Path) -> None:
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(f"{e.filename or out_dir.parent}: {os_error_reason(e)}") from e


# --------------------------------------------------------------------------------------------
# recovery


@dataclass(frozen=True)
class Recovery:
    """What :func:`recover` did: the output it put back (or ``None``) and what it removed."""

    restored: Path | None
    removed: tuple[Path, ...]


def _named(out_dir: Path, kind: str) -> list[Path]:
    """Entries beside ``out_dir`` named ``.<out>.<kind><token>``, the names this module makes (a
    random token after the prefix), whatever they are."""
    prefix = f".{out_dir.name}.{kind}"
    try:
        entries = list(out_dir.parent.iterdir())
    except FileNotFoundError:
        return []
    return [
        p
        for p in entries
        if p.name.startswith(prefix)
        and len(p.name) > len(prefix)
        and set(p.name[len(prefix) :]) <= _TOKEN_CHARS
    ]


def leftovers(out_dir: Path, kind: str) -> list[Path]:
    """``.<out>.partial-*`` (``kind="partial-"``) or ``.<out>.old-*`` (``"old-"``) directories,
    oldest first; only names this module makes (a random token after the prefix)."""
    found = [p for p in _named(Path(out_dir), kind) if p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))


def refuse_symlink(out_dir: Path) -> None:
    """:class:`ArtifactError` when ``out_dir`` itself is a symbolic link: the output would replace
    the link, not fill its target, so it is refused before anything is written (a link among its
    parent directories is fine)."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink():
        raise ArtifactError(
            f"{out_dir}: a symbolic link (to {os.readlink(out_dir)}); the output directory must "
            "not be a link: give its target, or another --out"
        )


def recover(out_dir: Path) -> Recovery:
    """Repair what a killed run on ``out_dir`` left (call it holding :func:`output_lock`): put the
    old output back when a swap was cut between its renames, then remove every leftover."""
    out_dir = Path(out_dir)
    olds = leftovers(out_dir, _OLD)
    restored = None
    if olds and not os.path.lexists(out_dir):
        source = olds.pop()  # the newest; there is only ever one unless recovery itself was cut
        legacy = source / "x"  # earlier versions moved the old output to .<out>.old-<id>/x
        try:
            if [p.name for p in source.iterdir()] == ["x"] and legacy.is_dir():
                os.rename(legacy, out_dir)
                olds.append(source)
            else:
                os.rename(source, out_dir)
        except OSError as e:
            raise ArtifactError(
                f"{source}: cannot put the previous output back at {out_dir}: {os_error_reason(e)}"
            ) from e
        restored = out_dir
    stale_tables = [p for p in leftovers(out_dir, _TABLES) if p.resolve() not in _LIVE_TABLES]
    removed = (*leftovers(out_dir, _PARTIAL), *olds, *stale_tables)
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    # a link swapped out of ``out`` by versions that accepted a symbolic link as the output
    links = tuple(p for p in _named(out_dir, _PARTIAL) if p.is_symlink())
    for p in links:
        p.unlink(missing_ok=True)
    return Recovery(restored, (*removed, *links))


# --------------------------------------------------------------------------------------------
# staging and the swap


@contextmanager
def staging(out_dir: Path) -> Iterator[Path]:
    """A new empty ``.<out>.partial-<id>`` directory beside ``out_dir`` (with the usual mode),
    removed when the block ends whatever happens (after :func:`swap_in` it holds the old output).
    An ``OSError`` in the block becomes one :class:`ArtifactError` naming the path."""
    out_dir = Path(out_dir)
    _mkdir_parent(out_dir)
    with ExitStack() as removal:
        try:
            stage = removal.enter_context(temp_dir_beside(out_dir, _PARTIAL))
        except OSError as e:
            raise ArtifactError(f"{out_dir.parent}: {os_error_reason(e)}") from e
        try:
            stage.chmod(0o777 & ~umask())  # mkdtemp makes it private; the output: the usual mode
            yield stage
        except Exception as e:
            cause = None if isinstance(e, DqrmError) else os_error_in(e)
            if cause is None:
                raise
            where = _user_path(cause, stage, out_dir)
            raise ArtifactError(f"{where}: {_reason(cause, stage)}") from e


_LOW_SPACE = 1 << 20


def _reason(error: OSError, stage: Path) -> str:
    """The OS's reason; for an ``OSError`` without errno (``ndarray.tofile``'s short write, as
    ``numpy.save`` to a path does: "40000 requested and 3968 written") on a file system with
    under 1 MiB left, "no space left on device", which is what the short write was."""
    if error.errno is None:
        try:
            st = os.statvfs(stage)
        except OSError:
            return os_error_reason(error)
        if st.f_bavail * st.f_frsize < _LOW_SPACE:
            return os_error_reason(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    return os_error_reason(error)


def _user_path(error: OSError, stage: Path, out_dir: Path) -> Path:
    """The path to name for ``error``: a file in the stage under its final name in ``out_dir``;
    ``out_dir`` when the error names no file (a failed ``write`` does not)."""
    if not error.filename:
        return out_dir
    path = Path(os.fsdecode(error.filename))
    try:
        return out_dir / path.relative_to(stage)
    except ValueError:
        return path


_LIVE_TABLES: set[Path] = set()  # this process's table_staging directories (resolved)


@contextmanager
def table_staging(out_dir: Path) -> Iterator[Path]:
    """A new private directory ``.<out>.tables-<id>`` beside ``out_dir`` for the tables a run
    converts straight into files (``pipeline.compress(..., staging_dir=...)``,
    :mod:`compress.io.staged_arrays`); the artifact writer moves them into its stage, on the same
    file system. Removed when the block ends, whatever happens; one a killed run left is removed
    by the next :func:`recover` of ``out``. Hold :func:`output_lock` around the block. An
    ``OSError`` making it is an :class:`ArtifactError` naming the directory."""
    out_dir = Path(out_dir)
    _mkdir_parent(out_dir)
    with ExitStack() as removal:
        try:
            tables = removal.enter_context(temp_dir_beside(out_dir, _TABLES))
        except OSError as e:
            raise ArtifactError(f"{out_dir.parent}: {os_error_reason(e)}") from e
        live = tables.resolve()
        _LIVE_TABLES.add(live)
        removal.callback(_LIVE_TABLES.discard, live)
        yield tables


@contextmanager
def table_errors(out_dir: Path, tables: Path | None) -> Iterator[None]:
    """An ``OSError`` writing a file in ``tables`` (a :func:`table_staging` directory; a full disk
    most often) in the block becomes one :class:`ArtifactError` naming ``out_dir``, whose files
    they are; any other error passes as it is."""
    try:
        yield
    except Exception as e:
        cause = None if tables is None or isinstance(e, DqrmError) else os_error_in(e)
        if cause is None or not _within(cause.filename, Path(tables)):
            raise
        raise ArtifactError(f"{out_dir}: {_reason(cause, Path(tables))}") from e


def _within(filename: object, directory: Path) -> bool:
    if not filename:
        return False
    try:
        Path(os.fsdecode(filename)).resolve().relative_to(directory.resolve())
    except ValueError:
        return False
    return True


def swap_in(stage: Path, out_dir: Path) -> None:
    """Make the complete ``stage`` the directory at ``out_dir``; the old output, if any, ends at
    ``stage`` (the caller deletes it). See the module docstring for what a kill leaves."""
    if not os.path.lexists(out_dir):
        os.rename(stage, out_dir)
        return
    if exchange(stage, out_dir):
        return
    prefix = f".{out_dir.name}.{_PARTIAL}"
    old = out_dir.parent / f".{out_dir.name}.{_OLD}{stage.name[len(prefix) :]}"
    os.rename(out_dir, old)
    try:
        os.rename(stage, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    os.rename(old, stage)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with ``renameat2(RENAME_EXCHANGE)``; ``False`` where the system
    or file system cannot (the caller falls back to two renames)."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


_RENAMEAT2: list = []  # cached libc function (or None)


def _renameat2():
    if not _RENAMEAT2:
        fn = None
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).renameat2
            except (OSError, AttributeError):
                fn = None
        if fn is not None:
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
            fn.argtypes += [ctypes.c_uint]
            fn.restype = ctypes.c_int
        _RENAMEAT2.append(fn)
    return _RENAMEAT2[0]


class PlainWriter:
    """Only the ``write`` of a binary file. ``numpy.save`` writes to it through Python, so a full
    disk raises ``OSError(ENOSPC)``; given the file itself it calls ``ndarray.tofile``, whose short
    write is an ``OSError`` with no errno ("40000 requested and 3968 written")."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file

    def write(self, data: bytes) -> int:
        return self._file.write(data)


def umask() -> int:
    """The process umask (read without changing it for longer than two calls)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
