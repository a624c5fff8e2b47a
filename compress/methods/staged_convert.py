"""Convert a prepared table straight into files: chunk by chunk, never the whole table in memory.

What ``convert_model(..., staging_dir=...)`` (:mod:`compress.methods.apply_plan`) does for every
table stored on its own. The table's rows are read a chunk at a time
(:func:`compress.io.table_stream.row_chunks`: a memory-mapped checkpoint from its file, never its
pages), each chunk is converted by the table's method exactly as the whole table would be
(:meth:`~compress.methods.handler.TableMethod.convert` of the chunk's rows, for a method whose
:attr:`~compress.methods.handler.TableMethod.converts_rows_independently`), and the arrays that
have a row per table row (packed codes, per-row scale and bias, fp16 values) are appended to
page-aligned ``.npy`` files in the staging directory (:class:`compress.io.staged_arrays.NpyWriter`,
hashed as written). The converted table then holds memory maps of those files; its other arrays (a
table-wise scale) stay in memory. Memory: one chunk of the input and its converted rows. The bytes
are the whole-table conversion's (tested for every layout and width).

A method that does not convert rows independently is converted whole, then its row arrays are
written and mapped the same way (memory: that one table while it is converted).
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.io.staged_arrays import NpyWriter, map_staged
from compress.io.table_stream import row_chunks, within_chunk
from compress.methods import registry
from compress.methods.base import ConvertedTable, PreparedTable
from compress.methods.handler import TableMethod


class RowBlock:
    """A prepared table seen through a block of its rows: ``weight`` is the block, any other
    attribute (``config``, a table-wise ``scale`` buffer, ...) the table's own. A method whose
    :attr:`~compress.methods.handler.TableMethod.converts_rows_independently` converts it into
    those rows' arrays."""

    def __init__(self, prepared: PreparedTable, rows: torch.Tensor) -> None:
        self._prepared = prepared
        self.weight = rows

    def __getattr__(self, name: str) -> Any:
        return getattr(self._prepared, name)


def row_roles(method: TableMethod, prepared: PreparedTable) -> frozenset[str]:
    """The roles of ``prepared``'s stored arrays that have one row per table row
    (:meth:`~compress.methods.handler.TableMethod.stored_arrays`)."""
    rows, dim = prepared.weight.shape
    bits = method.fields(prepared.config).bits
    specs = method.stored_arrays(rows, dim, bits)
    return frozenset(role for role, (_, shape) in specs.items() if shape and shape[0] == rows)


def convert_staged(prepared: PreparedTable, name: str, directory: str | Path) -> ConvertedTable:
    """The converted form of ``prepared`` (what its method's ``convert`` gives, byte for byte),
    its row arrays written to new files in ``directory`` as they are made and held as memory maps
    of them (see the module docstring). Nothing is left in ``directory`` when it raises."""
    method = registry.for_config(prepared.config)
    rows = prepared.weight.shape[0]
    roles = row_roles(method, prepared)
    if rows == 0 or not method.converts_rows_independently:
        return _stage_whole(method.convert(prepared, name), roles, directory)
    w = prepared.weight.detach()
    writers: dict[str, NpyWriter] = {}
    fixed: dict[str, torch.Tensor] = {}
    kind: type[ConvertedTable] | None = None
    with ExitStack() as files:  # every file removed if anything raises, complete otherwise
        for _, _, chunk in row_chunks(w):
            with within_chunk():  # counted here; the chunk is in memory
                part = method.convert(RowBlock(prepared, chunk), name)
            kind = type(part)
            for role, array in part.arrays().items():
                if role in roles:
                    if role not in writers:
                        dtype = np.dtype(array.detach().numpy().dtype)
                        shape = (rows, *array.shape[1:])
                        writers[role] = files.enter_context(
                            NpyWriter(directory, f"{name}.{role}", dtype, shape)
                        )
                    writers[role].write(array)
                elif role not in fixed:
                    fixed[role] = array.detach().clone()
                elif not torch.equal(fixed[role], array):
                    raise ValueError(
                        f"table {name!r}: {method.name} gave chunks different {role!r} arrays "
                        "(it does not convert rows independently)"
                    )
    arrays = {role: map_staged(writer.staged) for role, writer in writers.items()}
    arrays.update(fixed)
    return kind(name, rows, w.shape[1], prepared.config, arrays)


def _stage_whole(
    table: ConvertedTable, roles: frozenset[str], directory: str | Path
) -> ConvertedTable:
    """``table`` with its arrays of ``roles`` written to files in ``directory`` and mapped back."""
    arrays = table.arrays()
    staged = {}
    with ExitStack() as files:
        for role in sorted(roles & set(arrays)):
            values = arrays[role].detach().contiguous()
            writer = files.enter_context(
                NpyWriter(directory, f"{table.name}.{role}", values.numpy().dtype, values.shape)
            )
            writer.write(values)
            staged[role] = writer
    mapped = {r: map_staged(staged[r].staged) if r in staged else a for r, a in arrays.items()}
    return type(table)(table.name, table.num_embeddings, table.embedding_dim, table.config, mapped)
