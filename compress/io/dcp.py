"""The ``.metadata`` file of a ``torch.distributed.checkpoint`` directory, read without running
code and checked before any size in it is trusted.

The DCP ``.metadata`` file is a plain pickle. :func:`read_dcp_metadata` reads it with
:class:`_RestrictedUnpickler`, which resolves only an explicit list of (module, name) pairs (DCP's
metadata classes, torch's ``Size``, dtypes and layout lookup, and paths), builds only instances
of those classes, and refuses anything else before it is constructed; the result is then checked
field by field (chunks tile each tensor exactly, storage files are plain names inside the
directory and hold the bytes they claim, each chunk's slice holds at least its elements' bytes,
and all tensors together need no more bytes than the data files hold), so no size in the
metadata makes the reader allocate memory that the files do not back.
:class:`SafeFileSystemReader` is DCP's reader with its metadata read this way.

Key order. DCP writes ``Metadata.state_dict_metadata`` in the order the saving ranks' plans list
the items, rank 0 first, each rank in its own state-dict order; items written by rank 0 go to
``__0_*.distcp`` files (:func:`rank0_keys`).
"""

from __future__ import annotations

import io
import math
import pathlib
import pickle
import re
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.serialization
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from compress.errors import CheckpointError, first_line
from compress.io.pickle_depth import check_pickle_bytes

_RANK0_FILE = re.compile(r"__0_\d+\.distcp$")


def rank0_keys(metadata: Metadata) -> frozenset[str]:
    """Keys with a chunk stored in a ``__0_*.distcp`` file: the ones rank 0's save plan wrote,
    which DCP lists in rank 0's state-dict order before any other rank's (module docstring)."""
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
        data = meta_path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{meta_path}: cannot read: {e.strerror or e}") from e
    check_pickle_bytes(data, str(meta_path))  # a tuple nested 200,000 deep crashes hashing
    # From memory, not the file: a length field in the pickle (BINBYTES8 of 2^62) then reads what
    # the file holds instead of allocating what the field claims.
    unpickler = _RestrictedUnpickler(io.BytesIO(data))
    try:
        metadata = unpickler.load()
    except CheckpointError as e:
        raise CheckpointError(f"{meta_path}: {e}") from e
    except _PICKLE_ERRORS as e:
        raise CheckpointError(f"{meta_path}: corrupt DCP metadata: {first_line(e)}") from e
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
    _check_header_fields(md, fail)
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


def _check_header_fields(md: Metadata, fail: Callable[[str], CheckpointError]) -> None:
    """The fields beside the tensors have the types DCP declares (``planner_data`` is free-form
    and unused when loading): DCP's reader would otherwise fail on them with its own traceback."""
    if md.version is not None and not isinstance(md.version, str):
        raise fail(f"version is a {type(md.version).__name__}, not a string")
    meta = md.storage_meta
    if meta is None:
        return
    if type(meta) is not StorageMeta:
        raise fail(f"storage_meta is a {_clean(type(meta).__name__)}, not a StorageMeta")
    checkpoint_id = getattr(meta, "checkpoint_id", None)
    if not isinstance(checkpoint_id, str | pathlib.PurePath | None):
        raise fail(f"storage_meta.checkpoint_id is a {type(checkpoint_id).__name__}")
    for name in ("save_id", "load_id"):  # absent from metadata of older torch versions
        if not isinstance(getattr(meta, name, None), str | None):
            raise fail(f"storage_meta.{name} is a {type(getattr(meta, name)).__name__}")
    modules = getattr(meta, "modules", [])
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise fail("storage_meta.modules is not a list of strings")


def _check_tensor_entry(
    key: str, item: TensorStorageMetadata, fail: Callable[[str], CheckpointError]
) -> None:
    props, size, chunks = item.properties, item.size, item.chunks
    if not isinstance(props, TensorProperties) or not isinstance(props.dtype, torch.dtype):
        raise fail(f"{key!r}: no tensor dtype")
    if props.layout is not torch.strided:
        raise fail(f"{key!r}: layout {_clean(str(props.layout))} is not strided (dense)")
    if type(props.requires_grad) is not bool or type(props.pin_memory) is not bool:
        raise fail(f"{key!r}: requires_grad/pin_memory are not booleans")
    if not isinstance(props.memory_format, torch.memory_format):
        raise fail(f"{key!r}: memory_format is not a torch.memory_format")
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


class SafeFileSystemReader(FileSystemReader):
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


def _clean(text: str) -> str:
    """``text`` fit for a one-line message (escaped if not printable, at most 100 chars)."""
    text = str(text)
    return (text if text.isprintable() else ascii(text))[:100]
