"""``.npy`` files whose payload starts on a page boundary (what an ONNX graph maps in place).

The ``.npy`` format (numpy's ``numpy.lib.format``, version 1.0) is a 10-byte prefix, an ASCII
header dictionary padded with spaces and ended by ``\\n``, then the raw array. The format allows
any amount of padding; numpy pads to 64 bytes. Here the header is padded so that the payload
starts at :data:`PAYLOAD_ALIGNMENT` (4096 bytes, one page): an ONNX graph can then point its
external data at ``offset = 4096`` of the file (page aligned, so ONNX Runtime maps the bytes
instead of copying them), and every reader of ``.npy`` files (``numpy.load``, with or without
``mmap_mode``) reads it unchanged. A file costs at most 4 KiB more than numpy's.

* :func:`aligned_npy_header` -- the header bytes for a dtype and shape (deterministic: the same
  array gives the same bytes).
* :func:`save_npy_aligned` -- write a whole array (in slices, never a second copy of it).
* :func:`open_npy_aligned` -- create the file and return a writable ``numpy.memmap`` of its
  payload, for writers that fill a table chunk by chunk.

Example::

    with open("tables/t.npy", "wb") as f:
        save_npy_aligned(f, codes)               # payload at byte 4096
    np.load("tables/t.npy", mmap_mode="r")       # as any .npy
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

#: Byte offset of the payload in every file written here (a page; a multiple of numpy's 64).
PAYLOAD_ALIGNMENT = 4096
#: Bytes written per ``write`` call by :func:`save_npy_aligned`.
WRITE_CHUNK_BYTES = 64 << 20
_PREFIX = 10  # magic (6) + version (2) + header length (uint16)


def aligned_npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` 1.0 header of a C-ordered array of ``dtype`` and ``shape``, padded with
    spaces so that the payload starts at :data:`PAYLOAD_ALIGNMENT`; ``ValueError`` for a dtype
    numpy would pickle."""
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise ValueError(f"dtype {dtype} holds Python objects (no pickle in .npy files here)")
    fields = {
        "descr": np.lib.format.dtype_to_descr(dtype),
        "fortran_order": False,
        "shape": tuple(int(n) for n in shape),
    }
    text = "{" + "".join(f"{k!r}: {v!r}, " for k, v in sorted(fields.items())) + "}"
    body = text.encode("latin1")
    pad = PAYLOAD_ALIGNMENT - _PREFIX - len(body) - 1
    if pad < 0:
        raise ValueError(f".npy header of shape {list(shape)} longer than {PAYLOAD_ALIGNMENT}")
    length = len(body) + pad + 1
    return np.lib.format.magic(1, 0) + struct.pack("<H", length) + body + b" " * pad + b"\n"


def save_npy_aligned(handle: BinaryIO, array: np.ndarray) -> int:
    """Write ``array`` (C order) as a ``.npy`` file to the binary ``handle``, payload at
    :data:`PAYLOAD_ALIGNMENT`; returns the bytes written. Short writes are an ``OSError``."""
    arr = np.asarray(array)
    if not arr.flags.c_contiguous:  # (np.ascontiguousarray would also make 0-d arrays 1-d)
        arr = np.ascontiguousarray(arr)
    header = aligned_npy_header(arr.dtype, arr.shape)
    _write_all(handle, header)
    flat = arr.reshape(-1).view(np.uint8) if arr.size else np.zeros(0, np.uint8)
    for start in range(0, flat.size, WRITE_CHUNK_BYTES):
        _write_all(handle, memoryview(flat[start : start + WRITE_CHUNK_BYTES]))
    return len(header) + flat.size


def _write_all(handle: BinaryIO, data: bytes | memoryview) -> None:
    written = handle.write(data)
    if written is not None and written != len(data):
        raise OSError(f"short write: {written} of {len(data)} bytes")


def open_npy_aligned(path: str | Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Create ``path`` as a ``.npy`` file of ``dtype`` and ``shape`` (zeros, payload at
    :data:`PAYLOAD_ALIGNMENT`) and return a writable ``numpy.memmap`` of its payload (``flush()``
    it before others read the file); an empty array has nothing to map and is returned as is."""
    dtype = np.dtype(dtype)
    header = aligned_npy_header(dtype, shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    with open(path, "wb") as f:
        _write_all(f, header)
        f.truncate(len(header) + nbytes)
    if nbytes == 0:  # mmap cannot map zero bytes
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r+", offset=len(header), shape=tuple(shape))
