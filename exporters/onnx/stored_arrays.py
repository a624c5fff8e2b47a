"""Graph initializers that are stored arrays: pointed at in their ``.npy`` files, never copied.

An artifact directory stores every table once (``tables/<t>.npy``, ``shared/<g>.npy``, ...), and
every MLP tensor once (``dense/<key>.npy``). Its ONNX graphs read those arrays as they are
(:mod:`exporters.onnx.stacked_rows`, the methods' ``onnx_rows``, float MLP weights in their
``[out, in]`` order, :func:`exporters.onnx.dense.add_linear`), so instead of copying them into a
graph its initializers use ONNX external data (https://onnx.ai/onnx/repo-docs/ExternalData.html):
``location`` the file, relative to the graph's directory, ``offset`` the payload's position in
the file (past the ``.npy`` header; page aligned when written by :mod:`compress.io.npy_aligned`,
as the table files are), ``length`` its bytes.

A graph initializer is recognised as a stored array by memory, not by name: it is a C-contiguous
view of one of the memory-mapped files (:class:`StoredArray`, as
:func:`~exporters.artifacts.read.artifacts_from_manifest` maps them), so a reshape of a stored
array is a reference too, and anything computed from one (a cast, a copy) is not.

ONNX and ONNX Runtime refuse locations that leave the graph's directory (``..``): a graph that
points at stored arrays must sit above them (the artifact directory's ``model.onnx``,
``dense_arch.onnx`` and ``over_arch.onnx`` are at its root).

Example::

    stored = stored_arrays(arts)                          # every table and dense file, mapped
    refs = references(gb.initializers, stored, root)      # {initializer name: TensorReference}
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from onnx import TensorProto, helper

from compress.methods.handler import SHARED_ROLE


@dataclass(frozen=True)
class StoredArray:
    """A memory-mapped ``.npy`` file: ``path`` (absolute), its mapped payload ``array`` and the
    payload's byte ``offset`` in the file."""

    path: Path
    array: np.ndarray
    offset: int


@dataclass(frozen=True)
class TensorReference:
    """Where an initializer's bytes lie: ``location`` (POSIX, relative to the graph's
    directory), ``offset`` and ``length`` in bytes."""

    location: str
    offset: int
    length: int

    def tensor(self, name: str, value: np.ndarray) -> TensorProto:
        """The external-data TensorProto of initializer ``name`` holding ``value``'s bytes."""
        tensor = TensorProto(
            name=name, data_type=helper.np_dtype_to_tensor_dtype(value.dtype), dims=value.shape
        )
        tensor.data_location = TensorProto.EXTERNAL
        for key, val in (
            ("location", self.location),
            ("offset", self.offset),
            ("length", self.length),
        ):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(val)
        return tensor


def stored_arrays(arts) -> list[StoredArray]:  # noqa: ANN001 - exporters.artifacts.read.Artifacts
    """The table, shared-array and dense-weight files of a loaded artifact directory, as mapped
    in ``arts`` (the very arrays its graph tables and float MLP layers hold)."""
    out: list[StoredArray] = []

    def add(rel: str, array: np.ndarray) -> None:
        if isinstance(array, np.memmap):
            out.append(StoredArray((arts.path / rel).resolve(), array, int(array.offset)))

    for t in arts.parsed.tables:
        for role, rel in t.files.items():
            add(rel, arts.tables[t.name].arrays[role])
    for g in arts.parsed.shared_arrays:
        for role, rel in g.files.items():
            add(rel, arts.tables[g.tables[0]].arrays[SHARED_ROLE + role])
    for d in arts.parsed.dense:
        add(d.file, arts.dense[d.key])
    return out


def _address(array: np.ndarray) -> int:
    return int(array.__array_interface__["data"][0])


def find_reference(
    value: object, stored: list[StoredArray], graph_dir: Path
) -> TensorReference | None:
    """The reference of ``value`` when it is a non-empty C-contiguous view of one of the
    ``stored`` files, else ``None``; ``ValueError`` when that file is not under ``graph_dir``
    (ONNX refuses such a location)."""
    if not isinstance(value, np.ndarray) or not value.size or not value.flags.c_contiguous:
        return None
    start = _address(value)
    for s in stored:
        base = _address(s.array)
        if base <= start and start + value.nbytes <= base + s.array.nbytes:
            rel = os.path.relpath(s.path, Path(graph_dir).resolve())
            location = PurePosixPath(Path(rel).as_posix())
            if location.is_absolute() or ".." in location.parts:
                raise ValueError(f"{s.path} is not under the graph's directory {graph_dir}")
            return TensorReference(location.as_posix(), s.offset + start - base, value.nbytes)
    return None


def references(
    initializers: Mapping[str, object], stored: list[StoredArray], graph_dir: Path
) -> dict[str, TensorReference]:
    """``{initializer name: reference}`` for every initializer that is a stored array."""
    out = {}
    for name, value in initializers.items():
        ref = find_reference(value, stored, graph_dir)
        if ref is not None:
            out[name] = ref
    return out
