"""Read TorchRec DLRM checkpoints safely, in every form users have them.

Forms understood:

- ``torch.save(model.state_dict())`` of ``DLRM``/``DLRM_DCN``/``DLRM_Projection`` (keys at top level)
  or of ``DLRMTrain`` (every key under ``model.``);
- a dictionary holding such a state dict under ``state_dict``, ``model_state_dict`` or ``model``
  (other entries, such as optimizer state, are ignored);
- a ``torch.distributed.checkpoint`` directory (``.metadata`` plus ``*.distcp`` files).

Files are opened with ``weights_only=True`` and memory-mapped, so reading shapes does not read the
tables. The DCP ``.metadata`` file is a plain pickle: it is read with an unpickler that only admits
DCP's own metadata classes and torch's dtype/layout/size objects, never arbitrary code.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from compress.errors import CheckpointError

STATE_DICT_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model")


@dataclass
class Checkpoint:
    """A checkpoint opened for reading.

    ``tensors`` maps every state-dict key to a tensor: memory-mapped for files, on the ``meta``
    device for DCP directories until :func:`load_tensors` reads them.
    """

    path: Path
    format: str  # "file" | "file:<container key>" | "dcp"
    tensors: dict[str, torch.Tensor]

    @property
    def is_lazy(self) -> bool:
        return any(t.is_meta for t in self.tensors.values())


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


def load_tensors(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """Every tensor of ``ckpt`` with real data (memory-mapped where the format allows)."""
    if not ckpt.is_lazy:
        return ckpt.tensors
    state = {k: torch.empty(t.shape, dtype=t.dtype) for k, t in ckpt.tensors.items()}
    try:
        dcp.load(state, storage_reader=_SafeFileSystemReader(str(ckpt.path)), no_dist=True)
    except Exception as e:  # DCP raises a CheckpointException wrapping per-rank failures
        raise CheckpointError(
            f"{ckpt.path}: cannot read distributed checkpoint data: {_first_line(e)}"
        ) from e
    return state


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
    metadata = _read_dcp_metadata(meta_path)

    tensors: dict[str, torch.Tensor] = {}
    for key, item in metadata.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            tensors[key] = torch.empty(item.size, dtype=item.properties.dtype, device="meta")
    if not tensors:
        raise CheckpointError(f"{path}: distributed checkpoint holds no tensors")
    return Checkpoint(path=path, format="dcp", tensors=tensors)


def _read_dcp_metadata(meta_path: Path) -> Metadata:
    data = meta_path.read_bytes()
    try:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except CheckpointError as e:
        raise CheckpointError(f"{meta_path}: {e}") from e
    except Exception as e:  # any unpickling failure of a corrupt file
        raise CheckpointError(f"{meta_path}: corrupt DCP metadata: {_first_line(e)}") from e


_DCP_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
)
_BUILTINS = {"set", "frozenset", "slice", "complex"}
_PATHS = {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"}


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only DCP metadata classes, paths, OrderedDict, and torch dtypes/layouts/Size."""

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle protocol
        if module in _DCP_MODULES:
            obj = super().find_class(module, name)
            if isinstance(obj, type):
                return obj
        elif (
            module == "collections"
            and name == "OrderedDict"
            or (module == "builtins" and name in _BUILTINS)
            or (module == "pathlib" and name in _PATHS)
        ):
            return super().find_class(module, name)
        elif module == "torch":
            obj = getattr(torch, name, None)
            if obj is torch.Size or isinstance(
                obj, torch.dtype | torch.layout | torch.memory_format
            ):
                return obj
        elif module == "torch.serialization" and name == "_get_layout":
            return super().find_class(module, name)
        raise CheckpointError(f"refused: metadata pickle references {module}.{name}")


class _SafeFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader with its ``.metadata`` read by the restricted unpickler."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = _read_dcp_metadata(Path(self.path) / ".metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# --------------------------------------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def _preview(items, limit: int = 6) -> str:
    items = [str(i) for i in items]
    head = ", ".join(items[:limit])
    return head + (f", ... ({len(items)} in all)" if len(items) > limit else "")
