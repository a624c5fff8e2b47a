"""Content fingerprints: sha256 digests that say whether two inputs hold the same values.

The training state records them so that ``--resume`` continues only the run it was saved from
(:mod:`compress.train.inputs`); ``--valid`` rows identical to ``--data`` rows are refused with
them (:mod:`compress.data.separation`). Digests cover what a reader returned (arrays and tensors
with their names, dtypes and shapes), so they also see options that change what a file reads as,
and JSON in one canonical spelling (:func:`canonical_json`, also the artifact manifest's). Files
are hashed as bytes (:func:`sha256_file`: the checksums an artifact manifest lists).

Arrays are fed to sha256 in 8 MiB pieces; above :data:`BAR_BYTES` a progress bar counts them on a
terminal (:mod:`compress.progress`). torch is imported only to hash tensors: reading an artifact
directory (file checksums, the manifest digest) needs numpy alone.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compress import progress

if TYPE_CHECKING:
    import torch

#: Bytes handed to sha256 at a time.
CHUNK_BYTES = 8 << 20
#: Inputs at least this large get a progress bar (on a terminal); smaller ones hash in well under
#: a second.
BAR_BYTES = 256 << 20


def canonical_json(obj: Any) -> str:
    """The canonical JSON text of ``obj``: sorted keys, compact separators, ASCII only."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def sha256_json(obj: Any) -> str:
    """Hex sha256 of :func:`canonical_json` of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode("ascii")).hexdigest()


def sha256_file(path: str | Path, chunk: int = CHUNK_BYTES) -> str:
    """Hex sha256 of the bytes of the file at ``path``, read ``chunk`` bytes at a time (the
    checksum an artifact manifest records for each of its files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_tensor(array: object) -> bool:
    """Whether ``array`` is a torch tensor (one exists only once torch is imported, so numpy
    callers never import it)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(array, torch.Tensor)


def as_bytes(array: np.ndarray | torch.Tensor) -> np.ndarray:
    """The bytes of ``array`` (C order) as a flat ``uint8`` array, without a copy when it is
    already contiguous on the CPU."""
    if is_tensor(array):
        import torch

        t = array.detach().cpu().contiguous()
        return t.reshape(-1).view(torch.uint8).numpy()
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def array_header(name: str, array: np.ndarray | torch.Tensor) -> bytes:
    """What :func:`sha256_arrays` feeds sha256 before an array's bytes: its name, dtype and shape
    (a caller that reads the bytes itself, chunk by chunk, feeds the same)."""
    return canonical_json([name, str(array.dtype), list(array.shape)]).encode("ascii")


def sha256_arrays(
    named: Iterable[tuple[str, np.ndarray | torch.Tensor]], desc: str = "fingerprint"
) -> str:
    """Hex sha256 over ``(name, dtype, shape, bytes)`` of each array, in the order given (callers
    sort by name where order carries no meaning)."""
    items = list(named)
    total = sum(_nbytes(a) for _, a in items)
    bar = progress.byte_bar(total, desc) if total >= BAR_BYTES else None
    h = hashlib.sha256()
    try:
        for name, array in items:
            h.update(array_header(name, array))
            for piece in _pieces(array):
                h.update(piece)
                if bar is not None:
                    bar.update(piece.size)
    finally:
        if bar is not None:
            bar.close()
    return h.hexdigest()


def _pieces(array: np.ndarray | torch.Tensor) -> Iterable[np.ndarray]:
    """The bytes of ``array`` (C order) in pieces of at most :data:`CHUNK_BYTES`: a memory-mapped
    tensor read from its file (:func:`compress.io.table_stream.row_chunks`, so hashing a
    checkpoint maps none of its pages), anything else one array's copy at a time, if any."""
    if is_tensor(array):
        import torch

        from compress.io.table_stream import row_chunks

        flat = array.detach().cpu().contiguous().reshape(-1)
        per = max(1, CHUNK_BYTES // max(1, flat.element_size()))
        for _, _, values in row_chunks(flat, per):
            yield values.view(torch.uint8).numpy()
        return
    data = as_bytes(array)
    for start in range(0, data.size, CHUNK_BYTES):
        yield data[start : start + CHUNK_BYTES]


def _nbytes(array: np.ndarray | torch.Tensor) -> int:
    if is_tensor(array):
        return array.numel() * array.element_size()
    return int(array.nbytes)


def sha256_state_dict(state: Mapping[str, torch.Tensor], desc: str = "fingerprint") -> str:
    """Hex sha256 of a state dict's tensors (keys sorted): the weights as loaded, whatever file
    format or dtype they were read from."""
    return sha256_arrays(((k, state[k]) for k in sorted(state)), desc)
