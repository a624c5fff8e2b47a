"""Method ``tablewise`` (recipe ``ptq``/``qat`` with ``granularity = "table"``): DQRM's n-bit tables.

One symmetric scale per table, ``s = max|W| / (2^(b-1) - 1)`` rounded up to an fp16 value, codes
``q = clamp(rint(W / s), -2^(b-1), 2^(b-1) - 1)``, value ``q * s`` (:mod:`compress.quant.tablewise`).
``qat`` fake-quantizes the gathered rows of trainable FP32 weights at the current scale, which is
refreshed from ``max|W|`` every ``scale_refresh`` training steps (DQRM technique 2; between
refreshes values beyond the range clip, exactly as whole-table fake quantization at that scale
would). A table tracked by :func:`compress.methods.qat_embedding.track_scale_updates` keeps a
:class:`~compress.methods.scale_tracking.BlockAbsmax` summary and refreshes from it.

Stored: ``data`` uint8 ``[R, D*bits/8]`` packed unsigned codes ``q + 2^(bits-1)`` and ``scale``
float32 ``[]``; ``ceil(R*D*bits/8) + 4`` bytes. ONNX: ``Gather`` packed bytes, unpack,
``DequantizeLinear`` with the scalar scale and zero point ``2^(bits-1)``. TorchRec: converted
exactly to FBGEMM's integer rows (codes as stored, fp16 scale ``s``, bias ``-2^(b-1)*s``) when the
scale allows it (:func:`~compress.quant.tablewise.tablewise_scale_fits_fbgemm`), else served by
:class:`~compress.methods.table_modules.TablewiseConverted`. The PyTorch modules are
:mod:`compress.methods.table_modules` (imported when a table is prepared or converted: reading a
manifest needs no torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from compress.methods.handler import ArraySpec, MethodConfig, MethodFields, TableMethod
from compress.methods.packed import (
    FBGEMM_BITS,
    STORED_BITS,
    check_packed,
    fbgemm_data_type,
    packed_width,
    read_bits,
    read_ranges,
    stored_codes,
)
from compress.methods.registry import register
from compress.quant.sizes import inference_row_bytes, signed_offset, tablewise_bytes
from compress.recipe.reader import INTEGER
from compress.train.config import DEFAULT_SCALE_REFRESH

if TYPE_CHECKING:
    import torch

    from compress.io.model_spec import TableSpec
    from compress.methods.base import ConvertedTable, PreparedTable
    from compress.methods.table_modules import TablewisePrepared
    from compress.recipe.reader import Keys
    from exporters.artifacts.read import TableArrays
    from exporters.onnx.lookup import RowsRequest

GRANULARITY = "table"
#: The roles of a stored table's arrays: packed codes and the one scale.
ROLES = ("data", "scale")


@dataclass(frozen=True)
class TablewiseConfig(MethodConfig):
    """``bits`` 8, 4 or 2; ``qat``: fake-quantized and fine-tuned (else quantized once, frozen);
    ``scale_refresh``: training steps between ``max|W|`` scans (QAT only; ``None`` there means
    :data:`~compress.train.config.DEFAULT_SCALE_REFRESH`); ``ranges``: the scale from ``max|W|``
    (``"minmax"``, DQRM's rule: nothing clips) or the one of least L2 error over the table
    (``"l2"``: values beyond it clip; :func:`~compress.quant.l2_ranges.tablewise_l2_scale`)."""

    bits: int
    qat: bool = False
    scale_refresh: int | None = None
    ranges: str = "minmax"
    METHOD: ClassVar[str] = "tablewise"


@dataclass(frozen=True)
class TablewiseTable:
    """Graph table: ``packed`` uint8 of ``u = q + 2^(bits-1)`` (low bits first), one float32
    ``scale``; value = ``(u - 2^(bits-1)) * scale``."""

    packed: np.ndarray
    scale: float
    bits: int
    METHOD: ClassVar[str] = TablewiseConfig.METHOD

    @property
    def num_rows(self) -> int:
        return int(self.packed.shape[0])

    @property
    def offset(self) -> int:
        """The code of zero, ``2^(bits-1)``."""
        return signed_offset(self.bits)

    def validate(self, dim: int, what: str) -> None:
        check_packed(self.bits, dim, self.packed, what)
        if not np.isfinite(np.float32(self.scale)):
            raise ValueError(f"{what}: scale must be finite")


def tablewise_scale(table: TableArrays) -> float:
    """The one scale of a stored table-wise table."""
    return float(np.asarray(table.arrays["scale"]))


class TablewiseMethod(TableMethod):
    name = TablewiseConfig.METHOD
    config_type = TablewiseConfig
    packed_bits = STORED_BITS
    converts_rows_independently = True  # at the prepared table's scale

    @property
    def converted_type(self) -> type[ConvertedTable]:
        from compress.methods.table_modules import TablewiseConverted

        return TablewiseConverted

    def stored_roles(self) -> tuple[str, ...]:
        return ROLES

    # recipe
    def recipe_keys(self, spelling: str) -> tuple[str, ...]:
        refresh = ("scale_refresh",) if spelling == "qat" else ()
        return ("bits", "granularity", *refresh, "ranges")

    def parse(self, spelling: str, keys: Keys) -> MethodConfig:
        bits = read_bits(keys)
        qat = spelling == "qat"
        refresh = keys.get("scale_refresh", INTEGER, minimum=1)
        if qat and refresh is None:
            refresh = DEFAULT_SCALE_REFRESH
        ranges = read_ranges(keys, "minmax")
        return TablewiseConfig(bits, qat=qat, scale_refresh=refresh, ranges=ranges)

    def fields(self, config: TablewiseConfig) -> MethodFields:
        method = "qat" if config.qat else "ptq"
        return MethodFields(method, config.bits, GRANULARITY, config.scale_refresh)

    def recipe_items(self, config: TablewiseConfig) -> list[tuple[str, Any]]:
        f = self.fields(config)
        items = [("method", f.method), ("bits", f.bits), ("granularity", f.granularity)]
        items += [("scale_refresh", f.scale_refresh)] if f.scale_refresh is not None else []
        return items + ([("ranges", config.ranges)] if config.ranges != "minmax" else [])

    def describe(self, config: TablewiseConfig) -> str:
        f = self.fields(config)
        refresh = f" P={f.scale_refresh}" if f.scale_refresh is not None else ""
        ranges = "" if config.ranges == "minmax" else f" {config.ranges}"
        return f"{f.method} INT{f.bits} {f.granularity}{ranges}{refresh}"

    def trains(self, config: TablewiseConfig) -> bool:
        return config.qat

    # plan
    def table_bytes(self, config: TablewiseConfig, table: TableSpec) -> int:
        return tablewise_bytes(table.num_embeddings, table.embedding_dim, config.bits)

    # prepare / convert
    def prepare(self, config: TablewiseConfig, weight: torch.Tensor) -> PreparedTable:
        from compress.methods.table_modules import TablewisePrepared

        return TablewisePrepared(weight, config)

    def convert(self, prepared: TablewisePrepared, name: str) -> ConvertedTable:
        import torch

        from compress.io.table_stream import row_chunks
        from compress.methods.table_modules import TablewiseConverted
        from compress.quant.tablewise import tablewise_quantize_packed

        w = prepared.weight.detach()
        # at the module's current scale (what training saw); chunk by chunk
        packed, scale = tablewise_quantize_packed(
            w, prepared.config.bits, float(prepared.scale), chunks=row_chunks(w)
        )
        arrays = {"data": packed, "scale": torch.tensor(float(scale))}
        return TablewiseConverted(name, w.shape[0], w.shape[1], prepared.config, arrays)

    # artifacts
    def stored_arrays(self, rows: int, dim: int, bits: int | None) -> dict[str, ArraySpec]:
        return {"data": ("uint8", (rows, packed_width(dim, int(bits)))), "scale": ("float32", ())}

    def config_from_entry(self, entry: Any) -> MethodConfig:
        return TablewiseConfig(int(entry["bits"]), qat=entry.get("method") == "qat")

    # ONNX
    def graph_table(self, table: TableArrays) -> Any:
        return TablewiseTable(table.arrays["data"], tablewise_scale(table), int(table.bits))

    def onnx_rows(self, request: RowsRequest) -> str:
        """``Gather`` packed bytes, unpack, ``DequantizeLinear`` with a scalar scale and zero
        point ``2^(bits-1)`` (GatherBlockQuantized would need a scale per row: more storage)."""
        gb, kind = request.gb, request.table.kind
        packed = request.initializer("packed", kind.packed)
        rows = gb.op("Gather", [packed, request.ids], "packed_rows", axis=0)
        codes = request.unpack(rows, kind.bits)
        scale = request.initializer("scale", np.asarray(kind.scale, np.float32))
        zero = request.initializer("code_offset", np.asarray(kind.offset, np.uint8))
        return gb.op("DequantizeLinear", [codes, scale, zero], "rows")

    # TorchRec
    def fbgemm_data_type(self, table: TableArrays) -> Any:
        from compress.quant.tablewise import tablewise_scale_fits_fbgemm

        bits = int(table.bits)
        if bits in FBGEMM_BITS and tablewise_scale_fits_fbgemm(tablewise_scale(table), bits):
            return fbgemm_data_type(bits)
        return None

    def fbgemm_rows(
        self, table: TableArrays, start: int, stop: int, row_alignment: int
    ) -> torch.Tensor:
        """The stored codes, fp16 scale ``s`` and bias ``-2^(b-1)*s`` (``ValueError`` when the
        scale does not convert)."""
        import torch

        from compress.quant.fbgemm_rowwise import to_fbgemm_inference_rows
        from compress.quant.tablewise import tablewise_to_rowwise

        bits = int(table.bits)
        signed = (stored_codes(table, start, stop).to(torch.int16) - signed_offset(bits)).to(
            torch.int8
        )
        codes, scale, bias = tablewise_to_rowwise(signed, tablewise_scale(table), bits)
        return to_fbgemm_inference_rows(codes, scale, bias, bits, row_alignment)

    def fbgemm_row_bytes(self, table: TableArrays, row_alignment: int) -> int:
        return inference_row_bytes(table.embedding_dim, int(table.bits), row_alignment)

    def fbgemm_refusal(self, table: TableArrays) -> str:
        bits = int(table.bits)
        return (
            f"table-wise scale {tablewise_scale(table)!r} at {bits} bits has no exact FBGEMM row "
            f"(the bias -{signed_offset(bits)}*s must be a finite fp16 number)"
        )


register(TablewiseMethod())
