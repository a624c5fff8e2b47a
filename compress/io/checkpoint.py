"""Read TorchRec DLRM checkpoints safely, in every form users have them.

Forms understood:

- ``torch.save(model.state_dict())`` of ``DLRM``/``DLRM_DCN``/``DLRM_Projection`` (keys at top level)
  or of ``DLRMTrain`` (every key under ``model.``);
- a dictionary holding such a state dict under ``state_dict``, ``model_state_dict`` or ``model``
  (other entries, such as optimizer state, are ignored);
- a ``torch.distributed.checkpoint`` (DCP) directory (``.metadata`` plus ``*.distcp`` files) of such
  a state dict, or of a dictionary holding one under those keys.

Files are opened with ``weights_only=True`` and memory-mapped, so reading shapes does not read the
tables. A DCP directory's ``.metadata`` pickle is read without running code and checked before any
size in it is trusted (:mod:`compress.io.dcp`); its tensors are allocated and read only by
:func:`load_tensors`.

Key order. A torch.save state dict keeps the order in which the model declared its modules. DCP
writes ``Metadata.state_dict_metadata`` in the order the saving ranks' plans list the items, rank 0
first, each rank in its own state-dict order; items written by rank 0 go to ``__0_*.distcp``
files. So the keys that have a chunk in a ``__0_`` file are listed in the saved state-dict order;
the rest (items that only other ranks wrote) are not, and are reported in
:attr:`Checkpoint.unordered_keys`.
"""

from __future__ import annotations

import logging
import math
import pickle
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from compress.errors import CheckpointError, DqrmError, first_line
from compress.io.dcp import SafeFileSystemReader, rank0_keys, read_dcp_metadata
from compress.io.pickle_depth import check_torch_file

STATE_DICT_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model")


@dataclass
class Checkpoint:
    """A checkpoint opened for reading.

    ``tensors`` maps every state-dict key to a tensor: memory-mapped for files, on the ``meta``
    device for DCP directories until :func:`load_tensors` reads them. ``unordered_keys`` are the
    keys whose position in ``tensors`` is not known to be the order of the saved state dict (only a
    DCP directory written by several ranks has any).
    """

    path: Path
    format: str  # "file" | "file:<container key>" | "dcp" | "dcp:<container key>"
    tensors: dict[str, torch.Tensor]
    unordered_keys: frozenset[str] = frozenset()
    dcp_metadata: Metadata | None = field(default=None, repr=False)

    @property
    def is_lazy(self) -> bool:
        return any(t.is_meta for t in self.tensors.values())

    @property
    def dcp_prefix(self) -> str:
        """What DCP keys carry before :attr:`tensors`' keys (``"model."`` for ``dcp:model``)."""
        return self.format.removeprefix("dcp:") + "." if self.format.startswith("dcp:") else ""


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open ``path`` (a file or a DCP directory) without reading table data.

    Raises :class:`CheckpointError` naming the path for anything that is not a readable,
    safe checkpoint holding a flat state dict of tensors.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        return _open_dcp(path)
    return _open_file(path)


# What reading a DCP checkpoint's data raises when the files are corrupt, truncated or missing:
# OS errors, torch.load's RuntimeError/UnpicklingError on a damaged slice, and the ValueError,
# KeyError, IndexError and AssertionError with which DCP reports data that disagrees with its
# metadata. Anything else (MemoryError, KeyboardInterrupt, a TypeError from a bug) propagates.
_DCP_DATA_ERRORS = (
    OSError,
    EOFError,
    RuntimeError,
    pickle.UnpicklingError,
    ValueError,
    KeyError,
    IndexError,
    AssertionError,
    zipfile.BadZipFile,
)


def load_tensors(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """Every tensor of ``ckpt`` with real data (memory-mapped where the format allows)."""
    if not ckpt.is_lazy:
        return ckpt.tensors
    prefix = ckpt.dcp_prefix
    state = {prefix + k: _allocate(ckpt.path, k, t) for k, t in ckpt.tensors.items()}
    reader = SafeFileSystemReader(str(ckpt.path), ckpt.dcp_metadata)
    try:
        with warnings.catch_warnings(), _quiet_dcp_tracebacks():
            # "torch.distributed is disabled ...": we read locally
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, no_dist=True)
    except CheckpointException as e:  # DCP wraps every failure, even KeyboardInterrupt, in this
        cause = _input_failure(e)
        what = (
            "a tensor slice is not tensor data (corrupt, or it holds other objects)"
            if isinstance(cause, pickle.UnpicklingError)
            else first_line(cause)
        )
        raise CheckpointError(
            f"{ckpt.path}: cannot read distributed checkpoint data: {what}"
        ) from cause
    return {k[len(prefix) :]: v for k, v in state.items()}


class _DropDcpTracebacks(logging.Filter):
    """Drops the records with a traceback that DCP's loader logs (on the root logger) for a
    failure it then raises: the user gets that failure as one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and Path(record.pathname).parts[-3:-1] == _DCP_PACKAGE)


_DCP_PACKAGE = ("distributed", "checkpoint")  # .../torch/distributed/checkpoint/<module>.py


@contextmanager
def _quiet_dcp_tracebacks() -> Iterator[None]:
    root, quiet = logging.getLogger(), _DropDcpTracebacks()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def _allocate(path: Path, key: str, meta: torch.Tensor) -> torch.Tensor:
    """An uninitialised CPU tensor shaped like ``meta`` (DCP fills it); a failed allocation of a
    consistent but too large checkpoint is one line naming the tensor and the bytes it needs."""
    try:
        return torch.empty(meta.shape, dtype=meta.dtype)
    except (RuntimeError, MemoryError) as e:  # torch.empty of a valid shape fails only for memory
        need = math.prod(meta.shape) * meta.dtype.itemsize
        raise CheckpointError(
            f"{path}: not enough memory to read {key} {tuple(meta.shape)} "
            f"{str(meta.dtype).removeprefix('torch.')}: {need:,} bytes needed, and this machine "
            "could not allocate them"
        ) from e


def _input_failure(e: CheckpointException) -> BaseException:
    """The first failure inside ``e`` if every failure is one that input can cause; else re-raise
    the failure that is not (a bug, MemoryError or KeyboardInterrupt must not read as bad input)."""
    failures = [exc for exc, _trace in e.failures.values()]
    for exc in failures:
        if isinstance(exc, DqrmError):
            raise exc
        if not isinstance(exc, _DCP_DATA_ERRORS):
            raise exc
    return failures[0] if failures else e


# --------------------------------------------------------------------------------------------
# Single files


def _open_file(path: Path) -> Checkpoint:
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty")
    check_torch_file(path)  # before unpickling: a tuple nested 200,000 deep crashes hashing
    is_zip = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused: the file holds pickled objects other than tensors "
            f"(loading it would run code); re-save it as a plain state dict "
            f"({first_line(e).split('. ')[0]})"
        ) from e
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint (truncated or corrupt?): {first_line(e)}"
        ) from e
    state, fmt = _find_state_dict(obj, path)
    for key, tensor in state.items():
        _check_backed(path, key, tensor)
    _check_no_aliasing(path, state)
    return Checkpoint(path=path, format=fmt, tensors=state)


def _check_backed(path: Path, key: str, t: torch.Tensor) -> None:
    """Refuse a tensor that claims more elements than its storage holds: overlapping strides (a
    stride of 0 repeats one row 200 million times from 32 bytes) or a storage too short for the
    shape. A non-contiguous layout whose elements are all distinct (a transposed view) is read."""
    if t.layout is not torch.strided:
        raise CheckpointError(f"{path}: {key} is a {t.layout} tensor; only dense tensors are read")
    if t.numel() == 0:
        return
    dims = sorted((st, n) for st, n in zip(t.stride(), t.shape, strict=True) if n > 1)
    span = 1  # elements spanned by the dims of smaller stride: each larger stride must clear it
    for stride, n in dims:
        if stride < span:
            raise CheckpointError(
                f"{path}: refused: {key} {tuple(t.shape)} has strides {tuple(t.stride())} that "
                "make elements overlap (it claims more data than the file stores); save it "
                "with .contiguous()"
            )
        span = stride * (n - 1) + span
    need = (t.storage_offset() + span) * t.element_size()
    have = t.untyped_storage().nbytes()
    if need > have:
        raise CheckpointError(
            f"{path}: refused: {key} {tuple(t.shape)} needs {need:,} bytes of storage, the file "
            f"stores {have:,} for it"
        )


def _check_no_aliasing(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    """Refuse tensors that together claim more bytes than their distinct storages hold (many
    tables viewing one storage would each be converted as if the file held them all)."""
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state.values()
    }
    claimed = sum(t.numel() * t.element_size() for t in state.values())
    stored = sum(storages.values())
    if claimed > stored:
        raise CheckpointError(
            f"{path}: refused: its tensors need {claimed:,} bytes, the file stores {stored:,} "
            "(tensors share storage)"
        )


def _find_state_dict(obj: object, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj), "file"
    for key in STATE_DICT_CONTAINER_KEYS:
        inner = obj.get(key)
        if (
            isinstance(inner, dict)
            and inner
            and all(isinstance(v, torch.Tensor) for v in inner.values())
        ):
            return dict(inner), f"file:{key}"
    raise CheckpointError(
        f"{path}: no state dict of tensors found (top-level keys: {_preview(obj.keys())}; "
        f"expected tensors, or a dict under one of {', '.join(STATE_DICT_CONTAINER_KEYS)})"
    )


# --------------------------------------------------------------------------------------------
# torch.distributed.checkpoint directories


def _open_dcp(path: Path) -> Checkpoint:
    meta_path = path / ".metadata"
    if not meta_path.exists():
        contents = sorted(p.name for p in path.iterdir())
        what = "directory is empty" if not contents else f"holds {_preview(contents)}"
        raise CheckpointError(
            f"{path}: not a torch.distributed.checkpoint directory (no .metadata file; {what})"
        )
    metadata = read_dcp_metadata(meta_path)
    items = metadata.state_dict_metadata
    prefix, fmt = _dcp_container(items)
    tensors: dict[str, torch.Tensor] = {}
    for key, item in items.items():
        if isinstance(item, TensorStorageMetadata) and key.startswith(prefix):
            tensors[key[len(prefix) :]] = torch.empty(
                item.size, dtype=item.properties.dtype, device="meta"
            )
    if not tensors:
        raise CheckpointError(f"{path}: distributed checkpoint holds no tensors")
    ordered = rank0_keys(metadata)
    unordered = frozenset(k for k in tensors if prefix + k not in ordered)
    return Checkpoint(
        path=path, format=fmt, tensors=tensors, unordered_keys=unordered, dcp_metadata=metadata
    )


def _dcp_container(items: Mapping[str, object]) -> tuple[str, str]:
    """``("model.", "dcp:model")`` when the saved dict held the state dict under a container key
    beside other entries (DCP flattens ``{"model": sd, "epoch": 3}`` to ``model.<key>`` and
    ``epoch``); ``("", "dcp")`` when every key belongs to the state dict."""
    for key in STATE_DICT_CONTAINER_KEYS:
        inside = [
            k
            for k, v in items.items()
            if k.startswith(key + ".") and isinstance(v, TensorStorageMetadata)
        ]
        if inside and any(not k.startswith(key + ".") for k in items):
            return key + ".", f"dcp:{key}"
    return "", "dcp"


def _preview(items, limit: int = 6) -> str:
    items = [str(i) for i in items]
    head = ", ".join(items[:limit])
    return head + (f", ... ({len(items)} in all)" if len(items) > limit else "")
