"""Arrays written to files as they are made, then memory-mapped back: converted tables that never
sit whole in memory.

A model's converted tables (packed codes, per-row scales) can be gigabytes. With a staging
directory (``pipeline.compress(..., staging_dir=...)``; the main job makes one beside ``--out``,
:func:`exporters.artifacts.atomic_dir.table_staging`) conversion writes each array chunk by chunk
into a ``.npy`` file there (:class:`NpyWriter`: the page-aligned header of
:mod:`compress.io.npy_aligned`, then the rows as they come, hashed as they are written), and the
converted model holds a memory map of the file (:func:`map_staged`) instead of the array. The
artifact writer then moves the file into the artifact directory rather than writing a second copy,
and records the sha256 taken while writing (:func:`staged_array_of`, :func:`move_or_copy`): the
bytes are the ones :func:`compress.io.npy_aligned.save_npy_aligned` writes for the same array. (A
second export of the same model writes the arrays from the maps, which stay valid.)

Mapped pages a lookup touches count toward the process's resident memory (RSS) until they are
released: :func:`release_pages` drops them (``madvise(MADV_DONTNEED)``; the bytes stay in the
file and the page cache and are read again on the next touch). The pipeline and the export call
it after each pass that reads the tables (evaluation, the report, the parity check's reference).
The map is private (copy-on-write), so a write to a converted table never reaches the file; nothing
in this project writes one, and :func:`release_pages` would discard such a write.

Example::

    with NpyWriter(staging, "t_cat_0", np.uint8, (rows, 8)) as w:
        for chunk in chunks:
            w.write(chunk)
    staged = w.staged                    # path, sha256, size
    codes = map_staged(staged)           # torch.Tensor [rows, 8] over the file
    release_pages([codes])               # after a pass over it
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import mmap
import os
import shutil
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compress.io.npy_aligned import aligned_npy_header

__all__ = [
    "NpyWriter",
    "StagedArray",
    "move_or_copy",
    "map_staged",
    "release_pages",
    "staged_array_of",
    "staged_tensors",
]

#: Bytes a copy (:func:`move_or_copy` across file systems) reads at a time.
COPY_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class StagedArray:
    """A complete ``.npy`` file written by :class:`NpyWriter`: where it is, what it holds, the
    sha256 of its bytes, and the identity of the file when it was finished (``size``, ``inode``,
    ``device``, ``mtime_ns``, ``ctime_ns``), which :meth:`unchanged` compares before the hash is
    trusted (``ctime_ns``: a write that set the modification time back still changes it)."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    sha256: str
    size: int
    inode: int
    device: int
    mtime_ns: int
    ctime_ns: int

    @property
    def payload_bytes(self) -> int:
        return self.size - self.offset

    def unchanged(self, path: Path | None = None) -> bool:
        """Whether the file at ``path`` (default: where it was written) is still the one written:
        same inode, device, size, modification and status-change times."""
        try:
            st = os.stat(self.path if path is None else path)
        except OSError:
            return False
        return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns) == (
            self.inode,
            self.device,
            self.size,
            self.mtime_ns,
            self.ctime_ns,
        )

    def same_inode(self, path: Path) -> bool:
        """Whether ``path`` is the inode written, of the size and modification time written (what
        a rename keeps: it changes the status-change time)."""
        try:
            st = os.stat(path)
        except OSError:
            return False
        return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns) == (
            self.inode,
            self.device,
            self.size,
            self.mtime_ns,
        )


def _new_file(directory: Path, name: str) -> tuple[int, Path]:
    """A new file ``<name>.npy`` in ``directory`` (``<name>.<n>.npy`` when taken), open for
    writing, with the mode a plain ``open(path, "w")`` gives (the artifact's file it becomes)."""
    stem = name.replace(os.sep, "_")
    for n in itertools.count():
        path = directory / (f"{stem}.npy" if n == 0 else f"{stem}.{n}.npy")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


class NpyWriter:
    """Write one array of ``dtype`` and ``shape`` as a page-aligned ``.npy`` file in
    ``directory``, its rows in order (:meth:`write`, any number at a time), hashing the bytes as
    they go. Used as a context manager: the file is complete when the block ends (:attr:`staged`)
    or removed when the block raises or left the array incomplete. The file is ``<name>.npy``
    (``<name>.<n>.npy`` when that exists) with the usual mode of a new file."""

    def __init__(
        self, directory: str | Path, name: str, dtype: np.dtype | str, shape: tuple[int, ...]
    ) -> None:
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(n) for n in shape)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.rows_total = self.shape[0] if self.shape else 1
        self.rows_done = 0
        self.staged: StagedArray | None = None
        header = aligned_npy_header(self.dtype, self.shape)
        fd, self.path = _new_file(Path(directory), name)
        self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self._offset = len(header)
        try:
            self._put(header)
        except BaseException:
            self._discard()
            raise

    def __enter__(self) -> NpyWriter:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            self._discard()
            return
        self.finish()

    def _put(self, data: bytes | memoryview) -> None:
        try:
            written = self._file.write(data)
        except OSError as e:  # a failed write names no file: this one
            raise self._named(e) from e
        if written is not None and written != len(data):
            raise OSError(None, f"short write: {written} of {len(data)} bytes", str(self.path))
        self._hash.update(data)

    def _named(self, error: OSError) -> OSError:
        if error.filename:
            return error
        return OSError(error.errno, error.strerror or str(error), str(self.path))

    def write(self, rows: np.ndarray | torch.Tensor) -> None:
        """Append ``rows`` (``[m, *shape[1:]]`` of the array's dtype, the next ``m`` rows; the
        whole array for a 0-d one)."""
        if isinstance(rows, torch.Tensor):
            rows = rows.detach().numpy()
        rows = np.asarray(rows)
        expect = self.shape[1:] if self.shape else ()
        if rows.dtype != self.dtype or (self.shape and tuple(rows.shape[1:]) != expect):
            raise ValueError(
                f"{self.path.name}: rows {rows.dtype} {list(rows.shape)} do not continue a "
                f"{self.dtype} {list(self.shape)} array"
            )
        m = rows.shape[0] if self.shape else 1
        if self.rows_done + m > self.rows_total:
            raise ValueError(
                f"{self.path.name}: {self.rows_done + m} rows written to an array of "
                f"{self.rows_total}"
            )
        if rows.size:
            self._put(memoryview(np.ascontiguousarray(rows).reshape(-1).view(np.uint8)))
        self.rows_done += m

    def finish(self) -> StagedArray:
        """Close the complete file and describe it (``ValueError`` when rows are missing)."""
        if self.staged is not None:
            return self.staged
        if self.rows_done != self.rows_total:
            self._discard()
            raise ValueError(
                f"{self.path.name}: {self.rows_done} of {self.rows_total} rows written"
            )
        try:
            self._file.flush()
            st = os.fstat(self._file.fileno())
            self._file.close()
        except OSError as e:
            self._discard()
            raise self._named(e) from e
        except BaseException:
            self._discard()
            raise
        self.staged = StagedArray(
            self.path,
            self.dtype.str,
            self.shape,
            self._offset,
            self._hash.hexdigest(),
            st.st_size,
            st.st_ino,
            st.st_dev,
            st.st_mtime_ns,
            st.st_ctime_ns,
        )
        return self.staged

    def _discard(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass  # (the buffered rest of a write that failed already)
        finally:
            self.path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# Maps


@dataclass(frozen=True)
class _Mapped:
    staged: StagedArray
    address: int  # of the payload
    map_ref: weakref.ref  # the mmap.mmap


_MAPPED: dict[int, _Mapped] = {}  # payload address -> its map, while the map lives
_LOCK = threading.Lock()


def map_staged(staged: StagedArray) -> torch.Tensor:
    """A tensor of ``staged``'s dtype and shape over a private memory map of its file: nothing
    is read until used (then only the pages used). The map lives as long as the tensor (or a view
    of it) does."""
    dtype = np.dtype(staged.dtype)
    if staged.payload_bytes == 0:  # mmap cannot map an empty payload
        return torch.from_numpy(np.zeros(staged.shape, dtype))
    with open(staged.path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), staged.size, access=mmap.ACCESS_COPY)
    array = np.frombuffer(mapped, dtype=dtype, offset=staged.offset).reshape(staged.shape)
    address = int(array.__array_interface__["data"][0])
    entry = _Mapped(staged, address, weakref.ref(mapped))
    with _LOCK:
        _MAPPED[address] = entry
    weakref.finalize(mapped, _forget, address, entry)
    return torch.from_numpy(array)


def _forget(address: int, entry: _Mapped) -> None:
    with _LOCK:
        if _MAPPED.get(address) is entry:
            del _MAPPED[address]


def _entry_of(t: torch.Tensor) -> _Mapped | None:
    if t.device.type != "cpu" or t.numel() == 0:
        return None
    start = t.untyped_storage().data_ptr()
    with _LOCK:
        entry = _MAPPED.get(start)
    if entry is None or entry.map_ref() is None:
        return None
    return entry


def staged_array_of(t: torch.Tensor) -> StagedArray | None:
    """The staged file ``t`` is the whole of (its map's payload, as :func:`map_staged` made it:
    same bytes, dtype and shape), or ``None`` (anything else, views included)."""
    entry = _entry_of(t)
    if entry is None:
        return None
    staged = entry.staged
    same = (
        t.data_ptr() == entry.address
        and t.is_contiguous()
        and t.numel() * t.element_size() == staged.payload_bytes
        and tuple(t.shape) == staged.shape
        and t.numpy().dtype == np.dtype(staged.dtype)
    )
    return staged if same else None


def staged_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """The buffers and parameters of ``module`` that are staged maps (:func:`map_staged`)."""
    found = []
    for t in (*module.buffers(), *module.parameters()):
        if _entry_of(t) is not None:
            found.append(t)
    return found


def release_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Drop the resident pages of the staged maps behind ``tensors`` (others are ignored), so
    they no longer count toward RSS; the next read maps them again from the file. Returns how many
    maps were released."""
    done = set()
    for t in tensors:
        entry = _entry_of(t)
        if entry is None or entry.address in done:
            continue
        mapped = entry.map_ref()
        if mapped is not None and not mapped.closed:
            mapped.madvise(mmap.MADV_DONTNEED)
            done.add(entry.address)
    return len(done)


# --------------------------------------------------------------------------------------------------
# Into the artifact directory


def move_or_copy(staged: StagedArray, dest: str | Path) -> str:
    """Put the staged file at ``dest`` (a new path) and return the sha256 of ``dest``'s bytes.

    A rename where ``dest`` is on the same file system (no second copy, and the hash taken while
    writing; the file is no longer in the staging directory, and memory maps of it stay valid);
    otherwise a copy read in chunks and hashed as copied. Not a hard link: ``onnx.checker``
    refuses external data with several links. ``ValueError`` when the staged file is no longer the
    one written (moved already, removed or replaced, before or during the rename; ``dest`` may
    then hold the file that was there, for the caller to remove).
    """
    if not staged.unchanged():
        raise ValueError(f"{staged.path}: moved, changed or removed since it was written")
    dest = Path(dest)
    try:
        os.rename(staged.path, dest)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    else:
        if not staged.same_inode(dest):  # the name was pointed at another file meanwhile
            raise ValueError(f"{staged.path}: replaced while it was moved")
        return staged.sha256
    digest = hashlib.sha256()
    with open(staged.path, "rb") as src, open(dest, "wb") as out:
        while True:
            block = src.read(COPY_CHUNK_BYTES)
            if not block:
                break
            out.write(block)
            digest.update(block)
    shutil.copymode(staged.path, dest)
    if digest.hexdigest() != staged.sha256:
        raise ValueError(f"{staged.path}: its bytes changed since it was written")
    return staged.sha256
