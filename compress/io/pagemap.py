"""Which pages of a file mapping this process holds as its own memory (``/proc/self/pagemap``).

A private file mapping (``mmap`` ``MAP_PRIVATE``: what ``torch.load(..., mmap=True)`` makes, and
the copy-on-write master weights of :mod:`compress.io.cow_map`) reads the file until a page is
written; the written page is then the process's own copy (anonymous memory), and the file no
longer says what the mapping holds there. Linux reports each page's state in
``/proc/self/pagemap``, one 64-bit entry a page (``Documentation/admin-guide/mm/pagemap.rst``):

- bit 63, present in RAM; bit 62, swapped out;
- bit 61, a file page (or shared anonymous memory): the page cache's page, mapped as it is.

A page that is present or swapped and **not** a file page is the process's own: its bytes must be
read from memory. Every other page of a private file mapping (not present, or a file page) holds
the file's bytes. The frame-number bits need privileges; the flags used here do not.

numpy only: importing this module imports no torch.
"""

from __future__ import annotations

import mmap
import os

import numpy as np

PAGE = mmap.PAGESIZE
_PAGEMAP = "/proc/self/pagemap"
_PRESENT = np.uint64(1 << 63)
_SWAPPED = np.uint64(1 << 62)
_FILE = np.uint64(1 << 61)
#: pagemap entries read at a time (8 bytes each: 8 MiB, the entries of 4 GiB of mapping)
ENTRIES_PER_READ = 1 << 20


def page_span(address: int, nbytes: int) -> tuple[int, int]:
    """``(first page, pages)``: the page numbers holding bytes ``address .. address + nbytes``."""
    if nbytes <= 0:
        return address // PAGE, 0
    first = address // PAGE
    return first, (address + nbytes - 1) // PAGE - first + 1


def page_entries(first_page: int, pages: int) -> np.ndarray | None:
    """The pagemap entries (uint64) of ``pages`` pages from page number ``first_page``, or
    ``None`` when this process cannot read its pagemap (no ``/proc``, a restricted kernel)."""
    out = np.empty(pages, dtype=np.uint64)
    try:
        fd = os.open(_PAGEMAP, os.O_RDONLY)
    except OSError:
        return None
    try:
        raw = memoryview(out.view(np.uint8))
        done = 0
        while done < pages:
            n = min(ENTRIES_PER_READ, pages - done)
            got = os.preadv(fd, [raw[done * 8 : (done + n) * 8]], (first_page + done) * 8)
            if got <= 0 or got % 8:
                return None
            done += got // 8
    except OSError:
        return None
    finally:
        os.close(fd)
    return out


def own_pages(entries: np.ndarray) -> np.ndarray:
    """Which pages (bool per entry) the process holds as its own: present or swapped, not a file
    page."""
    return ((entries & (_PRESENT | _SWAPPED)) != 0) & ((entries & _FILE) == 0)


def file_pages(entries: np.ndarray) -> np.ndarray:
    """Which pages (bool per entry) are page-cache pages mapped into the process (present file
    pages): resident memory that :func:`compress.io.cow_map.release_clean` can give back."""
    return ((entries & _PRESENT) != 0) & ((entries & _FILE) != 0)


def runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, stops)`` of the runs of ``True`` in a bool array (``stops`` exclusive)."""
    m = np.concatenate(([False], np.asarray(mask, dtype=bool), [False])).view(np.int8)
    edges = np.flatnonzero(np.diff(m))
    return edges[0::2], edges[1::2]


def own_byte_ranges(address: int, nbytes: int) -> list[tuple[int, int]] | None:
    """The byte ranges ``(start, stop)`` relative to ``address``, clipped to ``0 .. nbytes``, of
    the pages in ``address .. address + nbytes`` that the process holds as its own (see the module
    docstring); ``[]`` when none is, ``None`` when the pagemap cannot be read (then nothing is
    known: read the bytes from memory)."""
    first, pages = page_span(address, nbytes)
    if pages == 0:
        return []
    entries = page_entries(first, pages)
    if entries is None:
        return None
    starts, stops = runs(own_pages(entries))
    base = first * PAGE - address
    return [
        (max(0, base + int(s) * PAGE), min(nbytes, base + int(e) * PAGE))
        for s, e in zip(starts, stops, strict=True)
    ]
