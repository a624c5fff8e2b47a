"""Row-wise artifacts as TorchRec's quantized ``EmbeddingBagCollection`` (FBGEMM kernels).

For users who serve with TorchRec instead of ONNX Runtime: :func:`quantized_ebc_from_artifacts`
builds a ``torchrec.quant.embedding_modules.EmbeddingBagCollection`` (``DataType.INT8``, ``INT4``
or ``INT2`` per table; FBGEMM's ``IntNBitTableBatchedEmbeddingBagsCodegen`` inference kernels) whose
rows are the stored rows, converted with :func:`compress.quant.math.to_fbgemm_inference_rows` into
the kernel's layout ``[fp16 scale][fp16 bias][packed codes][zeros to 16 bytes]``. It does what
``EmbeddingBagCollection.from_float`` does after quantizing, minus the quantizing: the module is
built empty (FBGEMM allocates the rows) and the stored rows are copied in, ``chunk_rows`` at a time,
so a large table is never held twice. The state dict then holds those rows as
``embedding_bags.<table>.weight`` (wrapped in ``UInt4Tensor``/``UInt2Tensor`` at INT4/INT2, like
``from_float``'s).

Given a path, the directory is read with :func:`exporters.artifacts.read.load_artifacts` (manifest digest and
schema, every checksum, every path confined to the directory) before any row reaches FBGEMM.

Only row-wise tables (recipe ``granularity = "row"``) have FBGEMM's format; any other table is an
:class:`~compress.errors.ArtifactError`. Pooled outputs equal the ONNX graph's and the PyTorch
converted model's (the dequantization ``q * scale + bias`` is exact in both).

:func:`fbgemm_ebc` is the general builder behind it, used by
:func:`exporters.runtime.torchrec_model.load_torchrec_model`: it also takes ``fp32``/``fp16`` tables
(FBGEMM's ``FP32``/``FP16`` rows, the values as stored) and table-wise tables whose scale converts
exactly (:func:`fbgemm_data_type`): codes ``q + 2^(b-1)`` are already the stored codes, and the
row's fp16 scale ``s`` and bias ``-2^(b-1)*s`` (:func:`compress.quant.math.tablewise_to_rowwise`)
make FBGEMM's ``code*s + bias`` equal ``q*s`` bit for bit. That needs ``s`` to be an fp16 value
(the table-wise quantizer rounds every scale up to one) and ``2^(b-1)*s <= 65504`` (false only for
tables whose ``max|W|`` is in the tens of thousands).

Example::

    ebc = quantized_ebc_from_artifacts("out/dlrm.int4_rowwise_ptq")
    model.sparse_arch.embedding_bag_collection = ebc   # a TorchRec DLRM with FBGEMM INT4 tables
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

from compress.errors import ArtifactError
from compress.io.model import embedding_bag_configs
from compress.quant import math as qm
from exporters.artifacts.read import Artifacts, TableArrays, load_artifacts

#: FBGEMM data type of a row-wise (or exactly converted table-wise) table of ``bits``.
DATA_TYPES = {8: DataType.INT8, 4: DataType.INT4, 2: DataType.INT2}
#: FBGEMM data type of the float layouts (rows hold the stored values).
FLOAT_DATA_TYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16}
DEFAULT_CHUNK_ROWS = 65_536


def _check_rowwise(arts: Artifacts, table: TableArrays) -> None:
    if table.layout != "rowwise" or table.bits not in DATA_TYPES:
        raise ArtifactError(
            f"{arts.path}: table {table.name!r} has layout {table.layout!r}; TorchRec's quantized "
            "EmbeddingBagCollection takes row-wise INT8/INT4/INT2 tables only (recipe granularity "
            '"row")'
        )


def tablewise_scale(table: TableArrays) -> float:
    """The one scale of a table-wise table."""
    return float(np.asarray(table.arrays["scale"]))


def fbgemm_data_type(table: TableArrays) -> DataType | None:
    """The FBGEMM data type whose rows hold ``table`` exactly, or ``None`` when none does.

    ``fp32``/``fp16``: FP32/FP16. Row-wise: INT8/INT4/INT2 by bits. Table-wise: the same, when
    :func:`compress.quant.math.tablewise_scale_fits_fbgemm` holds for its scale (see the module
    docstring); else ``None``. Shared (``robe``) tables and unknown layouts: ``None``.
    """
    if table.layout in FLOAT_DATA_TYPES:
        return FLOAT_DATA_TYPES[table.layout]
    if table.layout == "rowwise" and table.bits in DATA_TYPES:
        return DATA_TYPES[int(table.bits)]
    exact = (
        table.layout == "tablewise"
        and table.bits in DATA_TYPES
        and qm.tablewise_scale_fits_fbgemm(tablewise_scale(table), int(table.bits))
    )
    return DATA_TYPES[int(table.bits)] if exact else None


def table_configs(tables: Sequence[TableArrays]) -> list[EmbeddingBagConfig]:
    """TorchRec configs (sum pooling, FBGEMM data type of :func:`fbgemm_data_type`) of tables
    that FBGEMM holds exactly."""
    return [
        dataclasses.replace(config, data_type=fbgemm_data_type(t))
        for config, t in zip(embedding_bag_configs(tables), tables, strict=True)
    ]


def inference_rows(table: TableArrays, start: int, stop: int, row_alignment: int) -> torch.Tensor:
    """Rows ``start:stop`` of a row-wise table in FBGEMM's inference layout (uint8)."""
    bits = int(table.bits)
    packed = torch.from_numpy(np.array(table.arrays["data"][start:stop]))
    scale = torch.from_numpy(np.array(table.arrays["scale"][start:stop]))
    bias = torch.from_numpy(np.array(table.arrays["bias"][start:stop]))
    codes = qm.unpack_nbit(packed, bits, table.embedding_dim)
    return qm.to_fbgemm_inference_rows(codes, scale, bias, bits, row_alignment)


def tablewise_inference_rows(
    table: TableArrays, start: int, stop: int, row_alignment: int
) -> torch.Tensor:
    """Rows ``start:stop`` of a table-wise table as exact FBGEMM rows (uint8): the stored codes,
    fp16 scale ``s`` and bias ``-2^(b-1)*s`` (``ValueError`` when the scale does not convert)."""
    bits = int(table.bits)
    packed = torch.from_numpy(np.array(table.arrays["data"][start:stop]))
    codes = qm.unpack_nbit(packed, bits, table.embedding_dim)
    signed = (codes.to(torch.int16) - qm.signed_offset(bits)).to(torch.int8)
    codes, scale, bias = qm.tablewise_to_rowwise(signed, tablewise_scale(table), bits)
    return qm.to_fbgemm_inference_rows(codes, scale, bias, bits, row_alignment)


def float_inference_rows(
    table: TableArrays, start: int, stop: int, row_alignment: int
) -> torch.Tensor:
    """Rows ``start:stop`` of an ``fp32``/``fp16`` table in FBGEMM's FP32/FP16 layout: the values'
    bytes, zero-padded to ``row_alignment`` (uint8)."""
    values = torch.from_numpy(np.array(table.arrays["data"][start:stop]))
    raw = values.contiguous().view(torch.uint8).reshape(values.shape[0], -1)
    out = torch.zeros(values.shape[0], float_row_bytes(table, row_alignment), dtype=torch.uint8)
    out[:, : raw.shape[1]] = raw
    return out


def float_row_bytes(table: TableArrays, row_alignment: int) -> int:
    """Bytes per row of an FP32/FP16 table in FBGEMM's inference TBE (no scale or bias)."""
    unpadded = table.embedding_dim * (4 if table.layout == "fp32" else 2)
    return -(-unpadded // row_alignment) * row_alignment


def fbgemm_rows(table: TableArrays, start: int, stop: int, row_alignment: int) -> torch.Tensor:
    """Rows ``start:stop`` of any table :func:`fbgemm_data_type` accepts, in FBGEMM's layout."""
    if table.layout in FLOAT_DATA_TYPES:
        return float_inference_rows(table, start, stop, row_alignment)
    if table.layout == "tablewise":
        return tablewise_inference_rows(table, start, stop, row_alignment)
    return inference_rows(table, start, stop, row_alignment)


def fbgemm_row_bytes(table: TableArrays, row_alignment: int) -> int:
    """Bytes per row FBGEMM's inference TBE keeps for ``table``."""
    if table.layout in FLOAT_DATA_TYPES:
        return float_row_bytes(table, row_alignment)
    return qm.inference_row_bytes(table.embedding_dim, int(table.bits), row_alignment)


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
    row_alignment: int = qm.ROW_ALIGNMENT,
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
        _check_rowwise(arts, t)
    return fbgemm_ebc(arts, selected, row_alignment=row_alignment, chunk_rows=chunk_rows)


def fbgemm_ebc(
    arts: Artifacts,
    selected: Sequence[TableArrays],
    *,
    row_alignment: int = qm.ROW_ALIGNMENT,
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
