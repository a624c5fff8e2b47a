"""Row-wise artifacts as TorchRec's quantized ``EmbeddingBagCollection`` (FBGEMM kernels).

For users who serve with TorchRec instead of ONNX Runtime: :func:`quantized_ebc_from_artifacts`
builds a ``torchrec.quant.embedding_modules.EmbeddingBagCollection`` (``DataType.INT8``, ``INT4``
or ``INT2`` per table; FBGEMM's ``IntNBitTableBatchedEmbeddingBagsCodegen`` inference kernels) whose
rows are the stored rows, converted with :func:`compress.quant.fbgemm_rowwise.to_fbgemm_inference_rows` into
the kernel's layout ``[fp16 scale][fp16 bias][packed codes][zeros to 16 bytes]``. It does what
``EmbeddingBagCollection.from_float`` does after quantizing, minus the quantizing: the module is
built empty (FBGEMM allocates the rows) and the stored rows are copied in, ``chunk_rows`` at a time,
so a large table is never held twice. The state dict then holds those rows as
``embedding_bags.<table>.weight`` (wrapped in ``UInt4Tensor``/``UInt2Tensor`` at INT4/INT2, like
``from_float``'s).

Given a path, the directory is read with :func:`exporters.artifacts.read.load_artifacts` (manifest digest and
schema, every checksum, every path confined to the directory) before any row reaches FBGEMM.

Only tables whose method stores FBGEMM's row format as it is (row-wise,
:mod:`compress.methods.rowwise`) are taken; any other table is an
:class:`~compress.errors.ArtifactError`. Pooled outputs equal the ONNX graph's and the PyTorch
converted model's (the dequantization ``q * scale + bias`` is exact in both).

:func:`fbgemm_ebc` is the general builder behind it, used by
:func:`exporters.runtime.torchrec_model.load_torchrec_model`: it also takes ``fp32``/``fp16`` tables
(FBGEMM's ``FP32``/``FP16`` rows, the values as stored) and table-wise tables whose scale converts
exactly (:func:`fbgemm_data_type`): codes ``q + 2^(b-1)`` are already the stored codes, and the
row's fp16 scale ``s`` and bias ``-2^(b-1)*s`` (:func:`compress.quant.tablewise.tablewise_to_rowwise`)
make FBGEMM's ``code*s + bias`` equal ``q*s`` bit for bit. That needs ``s`` to be an fp16 value
(the table-wise quantizer rounds every scale up to one) and ``2^(b-1)*s <= 65504`` (false only for
tables whose ``max|W|`` is in the tens of thousands). Each table's method makes its rows
(:meth:`compress.methods.registry.TableMethod.fbgemm_rows`).

Example::

    ebc = quantized_ebc_from_artifacts("out/dlrm.int4_rowwise_ptq")
    model.sparse_arch.embedding_bag_collection = ebc   # a TorchRec DLRM with FBGEMM INT4 tables
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

from compress.errors import ArtifactError
from compress.io.model import embedding_bag_configs
from compress.methods import registry
from compress.quant.fbgemm_rowwise import ROW_ALIGNMENT
from exporters.artifacts.read import Artifacts, TableArrays, load_artifacts

DEFAULT_CHUNK_ROWS = 65_536


def _check_native(arts: Artifacts, table: TableArrays) -> None:
    if not registry.get(table.layout).fbgemm_native or fbgemm_data_type(table) is None:
        native = [m.name for m in registry.methods() if m.fbgemm_native]
        raise ArtifactError(
            f"{arts.path}: table {table.name!r} has layout {table.layout!r}; TorchRec's quantized "
            "EmbeddingBagCollection takes row-wise INT8/INT4/INT2 tables stored in FBGEMM's own "
            f"format only (layouts: {', '.join(native)})"
        )


def fbgemm_data_type(table: TableArrays) -> DataType | None:
    """The FBGEMM data type whose rows hold ``table`` exactly, or ``None`` when none does, as the
    table's method says (:meth:`compress.methods.registry.TableMethod.fbgemm_data_type`):
    ``fp32``/``fp16``: FP32/FP16; row-wise: INT8/INT4/INT2 by bits; table-wise: the same, when
    its scale converts exactly (see the module docstring); shared (ROBE-Z) tables: ``None``."""
    return registry.get(table.layout).fbgemm_data_type(table)


def table_configs(tables: Sequence[TableArrays]) -> list[EmbeddingBagConfig]:
    """TorchRec configs (sum pooling, FBGEMM data type of :func:`fbgemm_data_type`) of tables
    that FBGEMM holds exactly."""
    return [
        dataclasses.replace(config, data_type=fbgemm_data_type(t))
        for config, t in zip(embedding_bag_configs(tables), tables, strict=True)
    ]


def fbgemm_rows(table: TableArrays, start: int, stop: int, row_alignment: int) -> torch.Tensor:
    """Rows ``start:stop`` of any table :func:`fbgemm_data_type` accepts, in FBGEMM's layout."""
    return registry.get(table.layout).fbgemm_rows(table, start, stop, row_alignment)


def fbgemm_row_bytes(table: TableArrays, row_alignment: int) -> int:
    """Bytes per row FBGEMM's inference TBE keeps for ``table``."""
    return registry.get(table.layout).fbgemm_row_bytes(table, row_alignment)


def _row_views(ebc: QuantEmbeddingBagCollection) -> dict[str, torch.Tensor]:
    """Each table's rows (padded, ``[R, row bytes]`` uint8) inside the FBGEMM module's buffer."""
    views = {}
    for tables, module in zip(ebc._key_to_tables.values(), ebc._emb_modules, strict=True):
        splits = module.split_embedding_weights_with_scale_bias(split_scale_bias_mode=0)
        for cfg, (rows, _, _) in zip(tables, splits, strict=True):
            views[cfg.name] = rows
    return views


def quantized_ebc_from_artifacts(
    artifacts: Artifacts | str | Path,
    tables: Sequence[str] | None = None,
    *,
    row_alignment: int = ROW_ALIGNMENT,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> QuantEmbeddingBagCollection:
    """TorchRec's quantized EBC over the row-wise ``tables`` of an artifact directory (default:
    every table, in the model's order; loaded and verified when given a path)."""
    arts = artifacts if isinstance(artifacts, Artifacts) else load_artifacts(artifacts)
    names = list(tables) if tables is not None else list(arts.tables)
    unknown = [n for n in names if n not in arts.tables]
    if unknown:
        raise ArtifactError(f"{arts.path}: no table {unknown} (it has {list(arts.tables)})")
    selected = [arts.tables[n] for n in names]
    for t in selected:
        _check_native(arts, t)
    return fbgemm_ebc(arts, selected, row_alignment=row_alignment, chunk_rows=chunk_rows)


def fbgemm_ebc(
    arts: Artifacts,
    selected: Sequence[TableArrays],
    *,
    row_alignment: int = ROW_ALIGNMENT,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> QuantEmbeddingBagCollection:
    """TorchRec's quantized EBC over ``selected`` tables of ``arts`` (in that order), each of a
    layout :func:`fbgemm_data_type` converts exactly (an :class:`ArtifactError` otherwise), its
    rows copied in ``chunk_rows`` at a time."""
    for t in selected:
        if fbgemm_data_type(t) is None:
            raise ArtifactError(
                f"{arts.path}: table {t.name!r} (layout {t.layout!r}) has no exact FBGEMM rows"
            )
    ebc = QuantEmbeddingBagCollection(
        tables=table_configs(selected),
        is_weighted=False,
        device=torch.device("cpu"),
        output_dtype=torch.float,
        row_alignment=row_alignment,
    )
    views = _row_views(ebc)
    for t in selected:
        dest = views[t.name]
        if dest.shape != (t.num_embeddings, fbgemm_row_bytes(t, row_alignment)):
            raise ArtifactError(
                f"{arts.path}: table {t.name!r}: FBGEMM rows {list(dest.shape)} do not fit"
            )
        for start in range(0, t.num_embeddings, chunk_rows):
            stop = min(t.num_embeddings, start + chunk_rows)
            dest[start:stop].copy_(fbgemm_rows(t, start, stop, row_alignment))
    return ebc
