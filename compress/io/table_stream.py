"""Read big tables chunk by chunk: bounded memory whatever the model's size.

Checkpoints are memory-mapped (:mod:`compress.io.checkpoint`), and a mapped file's pages count
toward the process's resident memory (RSS) once they are read: a whole-table pass through the
mapping (a scan for NaN, a quantizer, a projection) leaves the whole table resident. The passes
that read every row of a table (the load-time finite check, table-wise ``max|W|``, conversion,
the ROBE-Z projection) go through :func:`row_chunks` instead:

* a table whose bytes are a memory-mapped file's (found in ``/proc/self/maps``, the file still
  the one that is mapped) is read with ``preadv`` into two reusable chunk buffers (a thread reads
  the next chunk while the caller works on this one): none of its pages is mapped into the
  process by the pass, so RSS grows by two chunks, not by the table (the file stays in the page
  cache, which is not the process's memory). Pages of a private map that the process wrote (a
  copy-on-write master weight, :mod:`compress.io.cow_map`) are not the file's: they are copied
  from memory (:mod:`compress.io.pagemap` says which);
* any other table (in memory: fine-tuned weights, a live module, an fp16 checkpoint upcast on
  load, a DCP checkpoint) is read as views of itself.

The chunk size is what bounds memory. Default: :data:`compress.quant.packing.CHUNK_ELEMENTS`
float32 values (4 MiB: 65,536 rows of a dim-16 table, 16,384 of dim 64); set a number of rows with
``dqrm-compress ... --chunk-rows N``, ``pipeline.compress(..., chunk_rows=N)`` or the
:func:`chunking` context.

While a :func:`progress_bytes` bar is open, every chunk read counts its bytes on it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compress import progress
from compress.errors import CheckpointError, SettingError
from compress.io.pagemap import own_byte_ranges
from compress.quant.packing import chunk_rows as default_chunk_rows
from compress.quant.packing import slice_chunks

__all__ = [
    "FileRange",
    "check_chunk_rows",
    "chunk_rows_for",
    "chunk_rows_setting",
    "chunking",
    "copy_rows",
    "file_range",
    "progress_bytes",
    "row_chunks",
    "within_chunk",
]

_MAPS = Path("/proc/self/maps")
#: Tensors smaller than this are read through their mapping (looking up the file costs more than
#: the few pages they leave resident).
MIN_FILE_READ_BYTES = 1 << 20

_chunk_rows: ContextVar[int | None] = ContextVar("dqrm_chunk_rows", default=None)
_bar: ContextVar[object | None] = ContextVar("dqrm_chunk_bar", default=None)
_in_chunk: ContextVar[bool] = ContextVar("dqrm_in_chunk", default=False)


# --------------------------------------------------------------------------------------------------
# The chunk size


def check_chunk_rows(rows: object) -> int | None:
    """``rows`` as the chunk size in rows (``None``: the default); a :class:`SettingError` for
    anything but a positive integer."""
    if rows is None:
        return None
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise SettingError(f"chunk_rows must be a positive whole number of rows, got {rows!r}")
    return int(rows)


@contextmanager
def chunking(rows: int | None) -> Iterator[None]:
    """Within the block, whole-table passes read ``rows`` rows at a time (``None``: the default,
    :data:`~compress.quant.packing.CHUNK_ELEMENTS` float32 values a chunk)."""
    token = _chunk_rows.set(check_chunk_rows(rows))
    try:
        yield
    finally:
        _chunk_rows.reset(token)


def chunk_rows_setting() -> int | None:
    """The rows a chunk the :func:`chunking` setting asks for (``None``: the default)."""
    return _chunk_rows.get()


def chunk_rows_for(dim: int) -> int:
    """Rows per chunk of a ``dim``-wide table: the :func:`chunking` setting, else
    :func:`compress.quant.packing.chunk_rows` of ``dim``."""
    rows = _chunk_rows.get()
    return rows if rows is not None else default_chunk_rows(dim)


# --------------------------------------------------------------------------------------------------
# Where a tensor's bytes are in a file


@dataclass(frozen=True)
class FileRange:
    """Bytes ``offset .. offset + nbytes`` of the file at ``path`` (device and inode as mapped).

    ``private``: the mapping is private (``MAP_PRIVATE``, as ``torch.load(mmap=True)`` and the
    copy-on-write tables of :mod:`compress.io.cow_map` map): a page written through it is the
    process's own copy, and the file no longer holds those bytes (:mod:`compress.io.pagemap`).
    """

    path: str
    offset: int
    nbytes: int
    device: tuple[int, int]
    inode: int
    private: bool = False


@dataclass(frozen=True)
class _Mapping:
    start: int
    end: int
    offset: int
    device: tuple[int, int]
    inode: int
    path: str
    private: bool = False


def _parse_maps_line(line: str) -> _Mapping | None:
    """One ``/proc/<pid>/maps`` line (``start-end perms offset major:minor inode [path]``)."""
    parts = line.rstrip("\n").split(maxsplit=5)
    if len(parts) < 5:
        return None
    start, _, end = parts[0].partition("-")
    major, _, minor = parts[3].partition(":")
    path = parts[5] if len(parts) == 6 else ""
    try:
        return _Mapping(
            int(start, 16),
            int(end, 16),
            int(parts[2], 16),
            (int(major, 16), int(minor, 16)),
            int(parts[4]),
            path,
            parts[1][3:4] == "p",
        )
    except ValueError:
        return None


def _mappings_at(*addresses: int) -> list[_Mapping | None]:
    """The mapping holding each address (``None``: none, or no ``/proc`` here)."""
    found: list[_Mapping | None] = [None] * len(addresses)
    try:
        with open(_MAPS) as f:
            for line in f:
                m = _parse_maps_line(line)
                if m is None:
                    continue
                for i, a in enumerate(addresses):
                    if found[i] is None and m.start <= a < m.end:
                        found[i] = m
    except OSError:
        return found
    return found


def file_range(t: torch.Tensor) -> FileRange | None:
    """Where the bytes of ``t`` lie in a file, when ``t`` is a contiguous CPU tensor whose memory
    is a mapping of that file (a memory-mapped checkpoint, a ``numpy.memmap``) and the file at that
    path is still the one mapped; ``None`` otherwise (memory, a deleted or replaced file, no
    ``/proc``)."""
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or not t.is_contiguous() or nbytes == 0:
        return None
    first, last = _mappings_at(t.data_ptr(), t.data_ptr() + nbytes - 1)
    if first is None or last is None or first.inode == 0 or not first.path.startswith("/"):
        return None
    offset = first.offset + (t.data_ptr() - first.start)
    if (last.inode, last.device, last.path) != (first.inode, first.device, first.path) or (
        last.offset + (t.data_ptr() + nbytes - 1 - last.start) != offset + nbytes - 1
    ):
        return None  # the range crosses into another mapping
    try:
        st = os.stat(first.path)
    except OSError:
        return None
    same = (st.st_ino, (os.major(st.st_dev), os.minor(st.st_dev))) == (first.inode, first.device)
    if not same or st.st_size < offset + nbytes:
        return None
    return FileRange(first.path, offset, nbytes, first.device, first.inode, first.private)


# --------------------------------------------------------------------------------------------------
# Reading


def row_chunks(
    t: torch.Tensor, chunk: int | None = None
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(start, stop, rows)`` for consecutive chunks of ``t``'s rows (``chunk`` rows each,
    default :func:`chunk_rows_for` of its row width), in order (the
    :data:`~compress.quant.packing.Chunks` the quantizers take).

    A memory-mapped ``t`` (of at least :data:`MIN_FILE_READ_BYTES`) is read from its file into two
    chunk buffers taken in turn (the next chunk is read while the caller works on this one): a
    chunk is valid until the next one is asked for (copy what must outlive it). Any other ``t``
    is read as views of itself. Either way the bytes are ``t``'s; each chunk counts on an open
    :func:`progress_bytes` bar.
    """
    t = t.detach()
    if t.dim() == 0:
        t = t.reshape(1)
    width = t[0].numel() if t.shape[0] else 1
    chunk = chunk_rows_for(max(1, width)) if chunk is None else int(chunk)
    row_bytes = width * t.element_size()
    big = t.numel() * t.element_size() >= MIN_FILE_READ_BYTES and not _in_chunk.get()
    source = file_range(t) if big else None
    chunks = slice_chunks(t, chunk) if source is None else _read_chunks(t, chunk, source)
    bar = _bar.get()
    for start, stop, rows in chunks:
        yield start, stop, rows
        if bar is not None:
            bar.update((stop - start) * row_bytes)


def _read_chunks(
    t: torch.Tensor, chunk: int, source: FileRange
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Chunks of ``t`` read from ``source`` into two buffers taken in turn: while the caller works
    on one chunk, a thread reads the next (``preadv`` releases the GIL, and so do the compiled
    quantizers), so reading and quantizing overlap on two cores."""
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    rows = t.shape[0]
    row_bytes = source.nbytes // rows
    buffers = [
        torch.empty((min(chunk, rows), *t.shape[1:]), dtype=t.dtype)
        for _ in range(2 if rows > chunk else 1)
    ]
    raws = [memoryview(b.view(-1).view(torch.uint8).numpy()) for b in buffers]
    fd = os.open(source.path, os.O_RDONLY)
    pool = ThreadPoolExecutor(1, thread_name_prefix="dqrm-read") if len(buffers) > 1 else None

    def read(index: int) -> None:
        start = index * chunk
        n = (min(start + chunk, rows) - start) * row_bytes
        where = source.offset + start * row_bytes
        _read_exactly(fd, raws[index % len(raws)][:n], where, source.path)

    try:
        st = os.fstat(fd)
        if (st.st_ino, (os.major(st.st_dev), os.minor(st.st_dev))) != (
            source.inode,
            source.device,
        ):
            raise CheckpointError(f"{source.path}: replaced while it was being read")
        pending: Future | None = None
        count = -(-rows // chunk)
        for index in range(count):
            if pending is None:
                read(index)
            else:
                pending.result()
            pending = pool.submit(read, index + 1) if pool and index + 1 < count else None
            start = index * chunk
            stop = min(start + chunk, rows)
            if source.private:  # pages written through a private map: the file lacks them
                _own_pages_from_memory(t, start, stop, raws[index % len(raws)], row_bytes)
            yield start, stop, buffers[index % len(buffers)][: stop - start]
    finally:
        if pool is not None:
            pool.shutdown(wait=True)  # a read in flight finishes before its file is closed
        os.close(fd)


def _own_pages_from_memory(
    t: torch.Tensor, start: int, stop: int, into: memoryview, row_bytes: int
) -> None:
    """Copy into ``into`` (rows ``start .. stop`` of ``t`` as read from the file) the bytes of the
    pages of those rows that the process holds as its own (written through a private map,
    :mod:`compress.io.pagemap`): the file does not hold them. An unreadable pagemap means no
    copy-on-write table exists (:func:`compress.io.cow_map.cow_copy` makes none then), and a
    private map that nothing wrote is the file's bytes."""
    address = t.data_ptr() + start * row_bytes
    ranges = own_byte_ranges(address, (stop - start) * row_bytes)
    if not ranges:
        return
    memory = t.reshape(-1).view(torch.uint8).numpy()
    dest = np.frombuffer(into, dtype=np.uint8)
    lead = start * row_bytes
    for a, b in ranges:
        dest[a:b] = memory[lead + a : lead + b]


def _read_exactly(fd: int, into: memoryview, offset: int, path: str) -> None:
    done = 0
    while done < len(into):
        n = os.preadv(fd, [into[done:]], offset + done)
        if n == 0:
            raise CheckpointError(
                f"{path}: ends at byte {offset + done:,}, before the tensor it held (truncated "
                "while it was being read?)"
            )
        done += n


@contextmanager
def progress_bytes(total: int, desc: str) -> Iterator[None]:
    """A progress bar of ``total`` bytes (on a terminal, :mod:`compress.progress`) that every
    chunk :func:`row_chunks` reads within the block counts on."""
    bar = progress.byte_bar(total, desc)
    token = _bar.set(bar)
    try:
        yield
    finally:
        _bar.reset(token)
        if bar is not None:
            bar.close()


@contextmanager
def within_chunk() -> Iterator[None]:
    """Within the block, passes over rows read a chunk that an enclosing pass holds in memory
    already: they count on no :func:`progress_bytes` bar (the enclosing pass counted it) and read
    it as views of itself, without looking for a file behind it."""
    bar, inside = _bar.set(None), _in_chunk.set(True)
    try:
        yield
    finally:
        _in_chunk.reset(inside)
        _bar.reset(bar)


def copy_rows(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` in memory, read chunk by chunk (:func:`row_chunks`): a memory-mapped ``t``
    costs its copy and one chunk, never its mapped pages as well."""
    t = t.detach()
    if t.dim() == 0:
        return t.clone()
    out = torch.empty(t.shape, dtype=t.dtype)
    for start, stop, rows in row_chunks(t):
        out[start:stop].copy_(rows)
    return out
