"""Read TorchRec DLRM checkpoints safely, in every form users have them.

Forms understood:

- ``torch.save(model.state_dict())`` of ``DLRM``/``DLRM_DCN``/``DLRM_Projection`` (keys at top level)
  or of ``DLRMTrain`` (every key under ``model.``);
- a dictionary holding such a state dict under ``state_dict``, ``model_state_dict`` or ``model``
  (other entries, such as optimizer state, are ignored);
- a ``torch.distributed.checkpoint`` (DCP) directory (``.metadata`` plus ``*.distcp`` files) of such
  a state dict, or of a dictionary holding one under those keys.

Files are opened with ``weights_only=True`` and memory-mapped, so reading shapes does not read the
tables. The DCP ``.metadata`` file is a plain pickle. It is read by :class:`_RestrictedUnpickler`,
which resolves only an explicit list of (module, name) pairs (DCP's metadata classes, torch's
``Size``, dtypes and layout lookup, and paths), builds only instances of those classes, and refuses
anything else before it is constructed; the result is then checked field by field (chunks tile
each tensor exactly, storage files are plain names inside the directory and hold the bytes they
claim, each chunk's slice holds at least its elements' bytes, and all tensors together need no more
bytes than the data files hold), so no size in the metadata makes the reader allocate memory that
the files do not back.

Key order. A torch.save state dict keeps the order in which the model declared its modules. DCP
writes ``Metadata.state_dict_metadata`` in the order the saving ranks' plans list the items, rank 0
first, each rank in its own state-dict order; items written by rank 0 go to ``__0_*.distcp``
files. So the keys that have a chunk in a ``__0_`` file are listed in the saved state-dict order;
the rest (items that only other ranks wrote) are not, and are reported in
:attr:`Checkpoint.unordered_keys`.
"""

from __future__ import annotations

import io
import math
import pathlib
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
import torch.serialization
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from compress.errors import CheckpointError, DqrmError

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
    reader = _SafeFileSystemReader(str(ckpt.path), ckpt.dcp_metadata)
    try:
        with warnings.catch_warnings():  # "torch.distributed is disabled ...": we read locally
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, no_dist=True)
    except CheckpointException as e:  # DCP wraps every failure, even KeyboardInterrupt, in this
        cause = _input_failure(e)
        what = (
            "a tensor slice is not tensor data (corrupt, or it holds other objects)"
            if isinstance(cause, pickle.UnpicklingError)
            else _first_line(cause)
        )
        raise CheckpointError(
            f"{ckpt.path}: cannot read distributed checkpoint data: {what}"
        ) from cause
    return {k[len(prefix) :]: v for k, v in state.items()}


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
    is_zip = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused: the file holds pickled objects other than tensors "
            f"(loading it would run code); re-save it as a plain state dict "
            f"({_first_line(e).split('. ')[0]})"
        ) from e
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint (truncated or corrupt?): {_first_line(e)}"
        ) from e
    state, fmt = _find_state_dict(obj, path)
    return Checkpoint(path=path, format=fmt, tensors=state)


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


_RANK0_FILE = re.compile(r"__0_\d+\.distcp$")


def rank0_keys(metadata: Metadata) -> frozenset[str]:
    """Keys with a chunk stored in a ``__0_*.distcp`` file: the ones rank 0's save plan wrote,
    which DCP lists in rank 0's state-dict order before any other rank's (see module docstring)."""
    storage = metadata.storage_data if isinstance(metadata.storage_data, dict) else {}
    return frozenset(
        index.fqn
        for index, info in storage.items()
        if isinstance(info, dcp_filesystem._StorageInfo)
        and _RANK0_FILE.fullmatch(str(info.relative_path))
    )


# What a damaged or hostile pickle makes the pure-Python unpickler raise. MemoryError and
# RecursionError are not here: they propagate as themselves.
_PICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,  # includes UnicodeDecodeError
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    struct.error,
    OverflowError,
)


def read_dcp_metadata(meta_path: Path) -> Metadata:
    """The checked :class:`Metadata` of a DCP directory's ``.metadata`` file (see module docstring).

    Raises :class:`CheckpointError` naming ``meta_path`` for a refused, corrupt or inconsistent file.
    """
    try:
        # From memory, not the file: a length field in the pickle (BINBYTES8 of 2^62) then reads
        # what the file holds instead of allocating what the field claims.
        metadata = _RestrictedUnpickler(io.BytesIO(meta_path.read_bytes())).load()
    except CheckpointError as e:
        raise CheckpointError(f"{meta_path}: {e}") from e
    except OSError as e:
        raise CheckpointError(f"{meta_path}: cannot read: {e.strerror or e}") from e
    except _PICKLE_ERRORS as e:
        raise CheckpointError(f"{meta_path}: corrupt DCP metadata: {_first_line(e)}") from e
    _check_metadata(metadata, meta_path)
    return metadata


# The dataclasses of torch.distributed.checkpoint.metadata that a .metadata pickle builds.
_DCP_METADATA_CLASSES = (
    Metadata,
    StorageMeta,
    MetadataIndex,
    TensorStorageMetadata,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    TensorProperties,
)


def _allowed_globals() -> dict[tuple[str, str], object]:
    """Every (module, name) a ``.metadata`` pickle written by DCP's FileSystemWriter references,
    mapped to the object it stands for. Enumerated from ``dcp.save`` of TorchRec DLRM, DLRM_DCN,
    DLRM_Projection and DLRMTrain state dicts (fp32/fp16/bf16, with non-tensor entries)."""
    metadata_classes = (*_DCP_METADATA_CLASSES, dcp_metadata._MEM_FORMAT_ENCODING)
    allowed: dict[tuple[str, str], object] = {
        ("torch.distributed.checkpoint.metadata", c.__name__): c for c in metadata_classes
    }
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = (
        dcp_filesystem._StorageInfo
    )
    allowed[("torch", "Size")] = torch.Size
    # A dtype pickles as its bare name in module torch (torch.float32 -> "float32").
    for value in vars(torch).values():
        if isinstance(value, torch.dtype):
            allowed[("torch", str(value).removeprefix("torch."))] = value
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    # StorageMeta.checkpoint_id may be a path; keep it as a pure path (no file-system access).
    for module in ("pathlib", "pathlib._local"):
        for name in ("PosixPath", "PurePosixPath", "Path"):
            allowed[(module, name)] = pathlib.PurePosixPath
        for name in ("WindowsPath", "PureWindowsPath"):
            allowed[(module, name)] = pathlib.PureWindowsPath
    return allowed


_ALLOWED_GLOBALS = _allowed_globals()
_CALLABLES = frozenset(id(v) for v in _ALLOWED_GLOBALS.values() if callable(v))
_BUILDABLE = (*_DCP_METADATA_CLASSES, dcp_filesystem._StorageInfo)


class _RestrictedUnpickler(pickle._Unpickler):
    """A pickle reader that constructs only DCP metadata.

    ``find_class`` answers from :data:`_ALLOWED_GLOBALS` by exact (module, name): no import, no
    dotted names, nothing reached through a module's globals. The pure-Python unpickler is used so
    that its calls can be checked too: REDUCE and NEWOBJ only call allowed classes/functions, and
    BUILD only sets the state of instances of DCP's metadata dataclasses (never of a class).
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> object:
        obj = _ALLOWED_GLOBALS.get((module, name))
        if obj is None:
            raise CheckpointError(
                f"refused: the metadata pickle references {_clean(module)}.{_clean(name)}, "
                "which is not a DCP metadata class (loading it could run code); nothing was run"
            )
        return obj

    def _load_reduce(self) -> None:
        _check_callable(self.stack[-2])
        pickle._Unpickler.load_reduce(self)

    def _load_newobj(self) -> None:
        _check_callable(self.stack[-2])
        pickle._Unpickler.load_newobj(self)

    def _load_newobj_ex(self) -> None:
        _check_callable(self.stack[-3])
        pickle._Unpickler.load_newobj_ex(self)

    def _load_build(self) -> None:
        target = self.stack[-2]
        if type(target) not in _BUILDABLE:
            raise CheckpointError(
                f"refused: the metadata pickle sets the state of a {_clean(type(target).__name__)}"
            )
        pickle._Unpickler.load_build(self)

    dispatch[pickle.REDUCE[0]] = _load_reduce
    dispatch[pickle.NEWOBJ[0]] = _load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = _load_newobj_ex
    dispatch[pickle.BUILD[0]] = _load_build


def _check_callable(obj: object) -> None:
    if id(obj) not in _CALLABLES:
        raise CheckpointError(f"refused: the metadata pickle calls a {_clean(type(obj).__name__)}")


# ---- checking what was unpickled


def _check_metadata(md: object, meta_path: Path) -> None:
    """Raise :class:`CheckpointError` unless ``md`` is DCP metadata whose tensors are fully
    covered by chunks stored in readable files of the directory."""

    def fail(what: str) -> CheckpointError:
        return CheckpointError(f"{meta_path}: not valid DCP metadata: {what}")

    if type(md) is not Metadata:
        raise fail(f"holds a {type(md).__name__}")
    items = md.state_dict_metadata
    if not isinstance(items, dict):
        raise fail("state_dict_metadata is not a dict")
    storage = md.storage_data
    if not isinstance(storage, dict):
        raise fail("no storage_data (only FileSystemWriter checkpoints are read)")
    file_sizes: dict[str, int] = {}
    tensor_bytes = 0
    for key, item in items.items():
        if not isinstance(key, str):
            raise fail(f"key {key!r} is not a string")
        if isinstance(item, BytesStorageMetadata):
            continue
        if not isinstance(item, TensorStorageMetadata):
            raise fail(f"{key!r}: entry is a {type(item).__name__}")
        _check_tensor_entry(key, item, fail)
        itemsize = item.properties.dtype.itemsize
        for chunk in item.chunks:
            info = storage.get(MetadataIndex(key, chunk.offsets))
            _check_storage(key, info, meta_path.parent, file_sizes, fail)
            need = math.prod(chunk.sizes) * itemsize
            if info.length < need:
                raise fail(
                    f"{key!r}: a chunk of {tuple(chunk.sizes)} needs {need:,} bytes, its storage "
                    f"in {info.relative_path} holds {info.length:,}"
                )
        tensor_bytes += math.prod(item.size) * itemsize
    on_disk = sum(file_sizes.values())
    if tensor_bytes > on_disk:  # chunks sharing storage bytes: more tensor data than the files hold
        raise fail(f"its tensors need {tensor_bytes:,} bytes, its data files hold {on_disk:,}")


def _check_tensor_entry(
    key: str, item: TensorStorageMetadata, fail: Callable[[str], CheckpointError]
) -> None:
    props, size, chunks = item.properties, item.size, item.chunks
    if not isinstance(props, TensorProperties) or not isinstance(props.dtype, torch.dtype):
        raise fail(f"{key!r}: no tensor dtype")
    if not _is_shape(size):
        raise fail(f"{key!r}: size {size!r} is not a shape")
    if not isinstance(chunks, list) or not all(isinstance(c, ChunkStorageMetadata) for c in chunks):
        raise fail(f"{key!r}: chunks are not a list of ChunkStorageMetadata")
    covered = 0
    for c in chunks:
        if not (_is_shape(c.offsets) and _is_shape(c.sizes)):
            raise fail(f"{key!r}: chunk offsets/sizes are not shapes")
        if len(c.offsets) != len(size) or len(c.sizes) != len(size):
            raise fail(f"{key!r}: a chunk has {len(c.sizes)} dims, the tensor {len(size)}")
        if any(o + s > n for o, s, n in zip(c.offsets, c.sizes, size, strict=True)):
            raise fail(f"{key!r}: chunk at {tuple(c.offsets)} runs past size {tuple(size)}")
        covered += math.prod(c.sizes)  # Python ints: torch.Size.numel() wraps around int64
    if covered != math.prod(size):
        raise fail(
            f"{key!r}: chunks hold {covered} elements but the tensor has {math.prod(size)} "
            "(missing or overlapping shards)"
        )
    pair = _first_overlap(chunks)
    if pair is not None:  # as many elements as the tensor, two sharing some: others uncovered
        a, b = (tuple(chunks[i].offsets) for i in pair)
        raise fail(f"{key!r}: the chunks at {a} and {b} overlap (part of the tensor has no data)")


def _first_overlap(chunks: list[ChunkStorageMetadata]) -> tuple[int, int] | None:
    """Indices of two chunks (in-bounds boxes) that share an element, or None. Sorted by their
    start in dim 0, each box is compared only with the later boxes that start before it ends there
    (one comparison per neighbour for row-wise shards)."""
    if len(chunks) < 2 or len(chunks[0].offsets) == 0:
        return None
    lo = np.array([tuple(c.offsets) for c in chunks], dtype=np.int64)
    hi = lo + np.array([tuple(c.sizes) for c in chunks], dtype=np.int64)
    order = np.flatnonzero((hi > lo).all(axis=1))  # empty chunks share nothing
    order = order[np.argsort(lo[order, 0], kind="stable")]
    lo, hi = lo[order], hi[order]
    for i in range(len(order) - 1):
        end = int(np.searchsorted(lo[:, 0], hi[i, 0], side="left"))
        if end <= i + 1:
            continue
        meets = ((lo[i + 1 : end] < hi[i]) & (lo[i] < hi[i + 1 : end])).all(axis=1)
        if meets.any():
            return int(order[i]), int(order[i + 1 + int(meets.argmax())])
    return None


def _check_storage(
    key: str,
    info: object,
    root: Path,
    file_sizes: dict[str, int],
    fail: Callable[[str], CheckpointError],
) -> None:
    if not isinstance(info, dcp_filesystem._StorageInfo):
        raise fail(f"{key!r}: a chunk has no storage entry")
    name = info.relative_path
    if not isinstance(name, str) or not name or name in (".", "..") or re.search(r"[/\\]", name):
        raise fail(f"{key!r}: storage file {name!r} is not a plain file name in the directory")
    for field_name in ("offset", "length"):
        value = getattr(info, field_name)
        if type(value) is not int or value < 0:
            raise fail(f"{key!r}: storage {field_name} {value!r} is not a byte count")
    if getattr(info, "transform_descriptors", None):  # a compressed slice may expand to anything
        raise fail(
            f"{key!r}: storage is transformed ({_clean(str(info.transform_descriptors))}); only "
            "uncompressed FileSystemWriter checkpoints are read (re-save without _extensions)"
        )
    if name not in file_sizes:
        file = root / name
        if file.is_symlink():
            raise fail(
                f"{key!r}: data file {name} is a symbolic link (refused: it may lead outside)"
            )
        if not file.is_file():
            raise fail(f"{key!r}: data file {name} is missing")
        file_sizes[name] = file.stat().st_size
    if info.offset + info.length > file_sizes[name]:
        raise fail(
            f"{key!r}: {name} has {file_sizes[name]} bytes, the chunk ends at "
            f"{info.offset + info.length} (truncated?)"
        )


def _is_shape(value: object) -> bool:
    return isinstance(value, torch.Size) and all(type(n) is int and 0 <= n < 2**62 for n in value)


class _SafeFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader with its ``.metadata`` read by the restricted unpickler."""

    def __init__(self, path: str, metadata: Metadata | None = None) -> None:
        super().__init__(path)
        self._checked_metadata = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = self._checked_metadata or read_dcp_metadata(Path(self.path) / ".metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# --------------------------------------------------------------------------------------------


def _clean(text: str) -> str:
    """``text`` fit for a one-line message (escaped if not printable, at most 100 chars)."""
    text = str(text)
    return (text if text.isprintable() else ascii(text))[:100]


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def _preview(items, limit: int = 6) -> str:
    items = [str(i) for i in items]
    head = ", ".join(items[:limit])
    return head + (f", ... ({len(items)} in all)" if len(items) > limit else "")
