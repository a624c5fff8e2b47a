"""Master weights that cost only the rows fine-tuning changes: copy-on-write maps of checkpoint tables.

A table that fine-tuning updates needs a writable copy of its weights (the checkpoint is never
written). When the table is a memory-mapped checkpoint's (:func:`compress.io.table_stream.
file_range`), :func:`cow_copy` makes that copy a **private map of the same bytes of the file**
(``mmap`` with ``MAP_PRIVATE``): it reads the file until a page is written, and a written page
becomes the process's own (copy on write). Making the copy reads nothing, and fine-tuning pays
for the pages of the rows it changes, not for the table: the 12.58 GB of the Criteo Terabyte
shape's tables cost about 2 GB after 50 steps of distillation. The file is never modified.

A page of the file that is only *read* through the map is the page cache's, yet it counts in the
process's resident memory (RSS) while it is mapped, and the kernel maps up to 16 cached
neighbours of every page a read faults in ("fault-around"). So:

- before a training lookup, :func:`prefault` asks the kernel to fault the pages of the looked-up
  rows in for writing (``MADV_POPULATE_WRITE``, Linux 5.14): the optimizer writes those rows
  anyway, and a write fault copies one page without mapping its neighbours; before a lookup that
  does not train, it faults them in for reading (``MADV_POPULATE_READ``), again without
  neighbours;
- :func:`release_clean` drops the file pages a map holds mapped (``MADV_DONTNEED`` on runs of
  pages the process does not own, found in ``/proc/self/pagemap``, :mod:`compress.io.pagemap`;
  never a written page), and :class:`ResidentGuard` calls it on every map when the process's
  file-backed resident memory has grown by a budget since the last release (after an
  evaluation pass or a table-wise ``max|W|`` scan read whole tables through their maps);
- whole-table readers (:func:`compress.io.table_stream.row_chunks`: convert, fingerprints) read
  the file and take the pages the process owns from memory, so they map nothing either;
- :func:`changed_rows` lists the rows that differ from the file (and their values) and
  :func:`reset_rows` returns a map to the file's bytes plus given rows: a training state saves
  only those rows (:mod:`compress.train.snapshot`).

Where this cannot be done the copy is made in memory, as before (:func:`compress.io.table_stream.
copy_rows`): a table that is not a mapped file's (a DCP checkpoint, an fp16 table upcast on
load, a live module), a file replaced since it was mapped, and any table where the process cannot
read its pagemap (written pages could not be told from the file's). An ``madvise`` advice the
kernel does not have is skipped (memory, never values, changes).
"""

from __future__ import annotations

import mmap
import os
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from compress.errors import CheckpointError
from compress.io.pagemap import PAGE, file_pages, own_pages, page_entries, page_span, runs
from compress.io.table_stream import MIN_FILE_READ_BYTES, FileRange, file_range

__all__ = [
    "CowMap",
    "ResidentGuard",
    "changed_rows",
    "cow_copy",
    "cow_map_of",
    "live_maps",
    "prefault",
    "release_clean",
    "reset_rows",
]

#: ``madvise`` advice numbers (Linux, ``include/uapi/asm-generic/mman-common.h``); Python's
#: ``mmap`` module names neither
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23
#: Bytes of rows compared at a time by :func:`changed_rows` (read from the file into one buffer).
COMPARE_BYTES = 4 << 20

#: advice numbers this kernel refused (``EINVAL``): not asked again
_refused: set[int] = set()


@dataclass(eq=False)
class CowMap:
    """One private map of a table's bytes in a file (see the module docstring).

    ``address`` and ``nbytes``: where the table's bytes are in this process; ``base``: where the
    ``mmap`` starts (page-aligned, at or before ``address``); ``written``: per page of the
    table, whether :func:`prefault` already faulted it in for writing (then it is the process's
    own, and stays so).
    """

    _mm: weakref.ref
    address: int
    base: int
    nbytes: int
    rows: int
    row_bytes: int
    source: FileRange
    written: np.ndarray = field(repr=False)

    @property
    def mm(self) -> mmap.mmap | None:
        """The ``mmap`` object (``None`` once the table it backs was freed)."""
        return self._mm()

    @property
    def first_page(self) -> int:
        return self.address // PAGE

    @property
    def pages(self) -> int:
        return page_span(self.address, self.nbytes)[1]

    def advise(self, advice: int, first: int, count: int) -> bool:
        """``madvise(advice)`` on ``count`` pages of the table from its page ``first``; ``False``
        when the map is gone or the kernel does not know ``advice`` (then it is not asked again)."""
        mm = self.mm
        if mm is None or advice in _refused or count <= 0:
            return False
        start = (self.first_page + first) * PAGE - self.base
        try:
            mm.madvise(advice, start, count * PAGE)
        except OSError as e:
            if e.errno == 22:  # EINVAL: an advice this kernel does not have
                _refused.add(advice)
                return False
            raise
        return True


#: live maps by the address of their table's first byte
_maps: dict[int, CowMap] = {}


def cow_copy(t: torch.Tensor) -> torch.Tensor | None:
    """A private copy-on-write map of ``t``'s bytes in the file they are mapped from (shape and
    dtype of ``t``), or ``None`` when ``t`` is not a file's mapped bytes, is smaller than
    :data:`~compress.io.table_stream.MIN_FILE_READ_BYTES` (copy it), or its file was replaced.

    The returned tensor owns its map: it is unmapped when the tensor (and every view of it) is
    freed. Writing to it never writes the file.
    """
    t = t.detach()
    if t.dim() == 0 or t.numel() * t.element_size() < MIN_FILE_READ_BYTES:
        return None
    source = file_range(t)
    if source is None or page_entries(t.data_ptr() // PAGE, 1) is None:
        return None  # not a file's bytes; or no pagemap, without which written pages are unknown
    fd = _open_source(source)
    if fd is None:
        return None  # replaced since it was mapped
    try:
        start = source.offset - source.offset % mmap.ALLOCATIONGRANULARITY
        mm = mmap.mmap(
            fd,
            source.offset + source.nbytes - start,
            flags=mmap.MAP_PRIVATE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=start,
        )
    finally:
        os.close(fd)
    raw = np.frombuffer(mm, dtype=np.uint8, count=source.nbytes, offset=source.offset - start)
    out = torch.from_numpy(raw).view(t.dtype).view(t.shape)
    rows = t.shape[0]
    cow = CowMap(
        _mm=weakref.ref(mm),
        address=out.data_ptr(),
        base=out.data_ptr() - (source.offset - start),
        nbytes=source.nbytes,
        rows=rows,
        row_bytes=source.nbytes // rows if rows else 0,
        source=source,
        written=np.zeros(page_span(out.data_ptr(), source.nbytes)[1], dtype=bool),
    )
    _maps[cow.address] = cow
    weakref.finalize(mm, _maps.pop, cow.address, None)
    return out


def cow_map_of(t: torch.Tensor) -> CowMap | None:
    """The :class:`CowMap` whose whole table ``t`` is (``None``: ``t`` is not one, or a part)."""
    cow = _maps.get(t.data_ptr()) if t.device.type == "cpu" else None
    if cow is None or cow.mm is None or t.numel() * t.element_size() != cow.nbytes:
        return None
    return cow if t.is_contiguous() else None


def live_maps() -> list[CowMap]:
    """Every copy-on-write map alive in this process."""
    return [m for m in list(_maps.values()) if m.mm is not None]


def _row_pages(cow: CowMap, ids: torch.Tensor) -> np.ndarray:
    """The table's page numbers (sorted, unique) holding the rows ``ids`` (ids outside the table
    are left out: the lookup reports them)."""
    r = ids.detach().reshape(-1).to(torch.int64).numpy()
    r = r[(r >= 0) & (r < cow.rows)]
    if r.size == 0:
        return r
    lead = cow.address - cow.first_page * PAGE
    first = (lead + r * cow.row_bytes) // PAGE
    if PAGE % cow.row_bytes == 0 and lead % cow.row_bytes == 0:
        return np.unique(first)  # no row crosses a page boundary
    last = (lead + (r + 1) * cow.row_bytes - 1) // PAGE
    return np.unique(np.concatenate([first, last]))


def prefault(cow: CowMap, ids: torch.Tensor, write: bool) -> None:
    """Fault in the pages of rows ``ids`` before a lookup reads them: for writing (``write``: the
    rows are about to be trained, each page becomes the process's own) or for reading, either way
    without the kernel's fault-around (see the module docstring). Pages already faulted in for
    writing are skipped. Only memory changes: the values read are the same either way."""
    advice = MADV_POPULATE_WRITE if write else MADV_POPULATE_READ
    if advice in _refused:
        return
    pages = _row_pages(cow, ids)
    if write:
        pages = pages[~cow.written[pages]]
    if pages.size == 0:
        return
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = pages[np.concatenate(([0], breaks))]
    stops = pages[np.concatenate((breaks - 1, [pages.size - 1]))] + 1
    for s, e in zip(starts.tolist(), stops.tolist(), strict=True):
        if not cow.advise(advice, s, e - s):
            return
    if write:
        cow.written[pages] = True


def release_clean(cow: CowMap) -> int:
    """Unmap the file pages ``cow`` holds mapped (pages it only read), keeping every page the
    process owns (written); the bytes released. 0 when the pagemap cannot be read."""
    entries = page_entries(cow.first_page, cow.pages)
    if entries is None:
        return 0
    starts, stops = runs(file_pages(entries))
    released = 0
    for s, e in zip(starts, stops, strict=True):
        if not cow.advise(mmap.MADV_DONTNEED, int(s), int(e - s)):
            break
        released += int(e - s) * PAGE
    return released


def _file_resident() -> int:
    """Bytes of this process's resident memory that are file pages or shared memory
    (``/proc/self/statm``, third field); 0 without ``/proc``."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[2]) * PAGE
    except (OSError, ValueError, IndexError):
        return 0


class ResidentGuard:
    """Releases the clean pages of every live map (:func:`release_clean`) once the process's
    file-backed resident memory has grown by ``budget`` bytes since the last release.

    :meth:`check` is cheap (one read of ``/proc/self/statm``); call it after work that may read
    maps (a lookup).
    """

    def __init__(self, budget: int = 256 << 20) -> None:
        self.budget = budget
        self.mark = _file_resident()

    def check(self) -> int:
        """Release when over budget; the bytes released."""
        now = _file_resident()
        if now - self.mark <= self.budget:
            self.mark = min(self.mark, now)
            return 0
        released = sum(release_clean(m) for m in live_maps())
        self.mark = _file_resident()
        return released


def _open_source(source: FileRange) -> int | None:
    """A descriptor of the file ``source`` maps, or ``None`` when the path no longer names that
    file (deleted, replaced) or it is shorter than the table."""
    try:
        fd = os.open(source.path, os.O_RDONLY)
    except OSError:
        return None
    st = os.fstat(fd)
    if (st.st_ino, (os.major(st.st_dev), os.minor(st.st_dev))) != (
        source.inode,
        source.device,
    ) or st.st_size < source.offset + source.nbytes:
        os.close(fd)
        return None
    return fd


def _pread(fd: int, into: np.ndarray, offset: int, path: str) -> None:
    view = memoryview(into.reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise CheckpointError(
                f"{path}: ends at byte {offset + done:,}, inside a table fine-tuning maps "
                "(truncated while it was being read?)"
            )
        done += n


def _overlay_own_pages(into: np.ndarray, memory: np.ndarray, own: np.ndarray, at: int) -> None:
    """Copy into ``into`` (bytes read from the file) the bytes of ``memory`` (the same bytes of
    the table, as mapped) that lie on owned pages. ``own``: per page, from the page holding the
    first byte; ``at``: the first byte's offset in that page's grid (page ``k`` starts
    ``k * PAGE - at`` bytes into the block). Whole pages are copied as rows of a page view,
    the partial first and last pages as slices: no byte of a page not owned is read."""
    n = into.size
    r0 = at % PAGE
    first_full = 0 if r0 == 0 else PAGE - r0  # where the first whole page starts
    if r0 and own[0]:
        into[: min(first_full, n)] = memory[: min(first_full, n)]
    full = max(0, (n - first_full) // PAGE)
    if full:
        k0 = 0 if r0 == 0 else 1  # its index in ``own``
        pages = np.lib.stride_tricks.as_strided(
            into[first_full:], shape=(full, PAGE), strides=(PAGE, 1), writeable=True
        )
        source = np.lib.stride_tricks.as_strided(
            memory[first_full:], shape=(full, PAGE), strides=(PAGE, 1), writeable=False
        )
        pick = np.flatnonzero(own[k0 : k0 + full])
        pages[pick] = source[pick]
    end = first_full + full * PAGE
    if end < n and own[-1]:
        into[end:] = memory[end:]


def changed_rows(cow: CowMap, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(ids, values)``: the rows of ``cow``'s table ``t`` whose bytes differ from the file's
    (sorted int64 ids) and their values; ``None`` when the pagemap cannot be read or the path no
    longer names the mapped file (then any row may differ).

    Only rows on pages the process owns can differ. Where a block of rows holds such pages, the
    file's bytes are read and the owned pages' bytes copied over them from memory; rows are
    compared there. Nothing else is read through the map: a row that straddles an owned page and
    a file page is not faulted in (which would map the file page and its neighbours).
    """
    entries = page_entries(cow.first_page, cow.pages)
    if entries is None:
        return None
    own = own_pages(entries)
    tail = tuple(t.shape[1:])
    if cow.rows == 0 or not own.any():
        return torch.zeros(0, dtype=torch.int64), torch.zeros((0, *tail), dtype=t.dtype)
    lead = cow.address - cow.first_page * PAGE
    rb = cow.row_bytes
    memory = t.detach().reshape(-1).view(torch.uint8).numpy()
    block = max(1, COMPARE_BYTES // rb)
    from_file = np.empty((block, rb), dtype=np.uint8)
    merged = np.empty((block, rb), dtype=np.uint8)
    found, values = [], []
    fd = _open_source(cow.source)
    if fd is None:
        return None  # the file at that path is no longer the one mapped: compare impossible
    try:
        for a in range(0, cow.rows, block):
            b = min(a + block, cow.rows)
            p0, p1 = (lead + a * rb) // PAGE, (lead + b * rb - 1) // PAGE
            if not own[p0 : p1 + 1].any():
                continue
            n = b - a
            _pread(fd, from_file[:n], cow.source.offset + a * rb, cow.source.path)
            merged[:n] = from_file[:n]
            _overlay_own_pages(
                merged[:n].reshape(-1), memory[a * rb : b * rb], own[p0 : p1 + 1], lead + a * rb
            )
            # rows off the owned pages hold the file's bytes in both: compare whole rows, as
            # 8-byte words where the row width allows
            word = np.uint64 if rb % 8 == 0 else np.uint8
            differ = np.flatnonzero((merged[:n].view(word) != from_file[:n].view(word)).any(axis=1))
            found.append(differ + a)
            values.append(merged[differ].copy())
    finally:
        os.close(fd)
    if not found:
        return torch.zeros(0, dtype=torch.int64), torch.zeros((0, *tail), dtype=t.dtype)
    ids = torch.from_numpy(np.concatenate(found).astype(np.int64))
    rows = torch.from_numpy(np.concatenate(values)).view(t.dtype).reshape(-1, *tail)
    return ids, rows


def reset_rows(cow: CowMap, t: torch.Tensor, ids: torch.Tensor, values: torch.Tensor) -> None:
    """Make ``cow``'s table ``t`` the file's bytes again, except rows ``ids``, set to ``values``:
    every page the process owns is dropped (``MADV_DONTNEED`` on a private map reads the file
    again), then the rows are written. ``t``'s version counter moves, as for any in-place write.
    ``ValueError`` when the map cannot be dropped."""
    if not cow.advise(mmap.MADV_DONTNEED, 0, cow.pages):
        raise ValueError("cannot reset a copy-on-write table (madvise refused)")
    cow.written[:] = False
    with torch.no_grad():
        t.index_copy_(0, ids.to(torch.int64), values.to(t.dtype))
