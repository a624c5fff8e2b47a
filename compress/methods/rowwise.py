"""Method ``rowwise`` (recipe ``ptq``/``qat`` with ``granularity = "row"``): FBGEMM's row-wise n-bit.

Each row ``r`` is stored as ``bits``-bit codes with its own fp16 ``scale`` and ``bias`` (asymmetric,
FBGEMM's ``FloatToFusedNBitRowwiseQuantizedSBHalf`` rule, :mod:`compress.quant.fbgemm_rowwise`);
value = ``code * scale + bias``. ``ptq`` freezes the weights and quantizes them once; ``qat``
fake-quantizes the gathered rows of trainable FP32 weights (a row's scale depends on the row
alone: no table scan). ``ranges``: each row's range is its min and max (``"minmax"``, FBGEMM's
quantizer) or the one of least L2 error (``"l2"``: PyTorch's greedy search and a least-squares
refinement, :mod:`compress.quant.l2_ranges`; the default of ``ptq`` at 2 bits); the stored rows
have the same format either way.

Stored: ``data`` uint8 ``[R, D*bits/8]`` packed codes (low bits first), ``scale`` and ``bias``
float16 ``[R]``; ``rows*(D*bits/8 + 4)`` bytes. ONNX: ``com.microsoft::GatherBlockQuantized`` at
4 and 8 bits (``rowwise_impl="gbq"``/``"auto"``), else ``Gather`` + unpack + ``code*scale +
bias`` (exact); the full model looks the tables of one width up together, reading the stored
arrays as they are (:mod:`exporters.onnx.stacked_rows`). TorchRec: FBGEMM's INT8/INT4/INT2 rows as stored.
The PyTorch modules are :mod:`compress.methods.table_modules` (imported when a table is prepared
or converted: reading a manifest needs no torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

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
from compress.quant.sizes import can_pack, inference_row_bytes, rowwise_bytes

if TYPE_CHECKING:
    import torch

    from compress.io.model_spec import TableSpec
    from compress.methods.base import ConvertedTable, PreparedTable
    from compress.recipe.reader import Keys
    from exporters.artifacts.read import TableArrays
    from exporters.onnx.lookup import RowsRequest

GRANULARITY = "row"
#: Bit widths at which a ``ptq`` rule that gives no ``ranges`` takes ``l2`` (the same stored
#: format; :mod:`compress.quant.l2_ranges`): INT2, where it scored +0.0010 and +0.0024 AUC over
#: min/max (``benchmarks/bench_ranges_quality.py``'s case; the demo). Elsewhere the default is
#: ``minmax``: at INT4 ``l2`` lowered the error but scored -0.0002 and +0.0001, at INT8 nothing,
#: for a conversion about 7x slower; and a ``qat`` lookup with ``l2`` runs the search on every
#: gathered row.
L2_DEFAULT_BITS = (2,)
#: The roles of a stored table's arrays: packed codes, fp16 scale and bias per row.
ROLES = ("data", "scale", "bias")
#: Bit widths that ``rowwise_impl="auto"`` sends to GatherBlockQuantized.
GBQ_AUTO_BITS = (4, 8)


@dataclass(frozen=True)
class RowwiseConfig(MethodConfig):
    """``bits`` 8, 4 or 2; ``qat``: fake-quantized and fine-tuned (else quantized once, frozen);
    ``ranges``: each row's range from its min and max (``"minmax"``, FBGEMM's quantizer) or the
    one that minimizes its L2 error (``"l2"``, :mod:`compress.quant.l2_ranges`); the same stored
    format either way."""

    bits: int
    qat: bool = False
    ranges: str = "minmax"
    METHOD: ClassVar[str] = "rowwise"


@dataclass(frozen=True)
class RowwiseTable:
    """Graph table: ``packed`` uint8 [R, D*bits/8] (low bits first), fp16 ``scale``/``bias`` [R];
    value = ``float(code)*float(scale) + float(bias)`` in float32, equal to FBGEMM's
    ``FusedNBitRowwiseQuantizedSBHalfToFloat``."""

    packed: np.ndarray
    scale: np.ndarray
    bias: np.ndarray
    bits: int
    METHOD: ClassVar[str] = RowwiseConfig.METHOD

    @property
    def num_rows(self) -> int:
        return int(self.packed.shape[0])

    def validate(self, dim: int, what: str) -> None:
        check_packed(self.bits, dim, self.packed, what)
        for arr, nm in ((self.scale, "scale"), (self.bias, "bias")):
            if arr.dtype != np.float16 or arr.shape != (self.num_rows,):
                raise ValueError(f"{what}: {nm} must be float16 [{self.num_rows}]")


def gbq_block_size(dim: int) -> int:
    """GatherBlockQuantized block size that makes one block per row of ``dim`` values.

    The op needs a power of two >= 16; a last partial block is allowed, so the smallest power of
    two >= max(dim, 16) keeps one scale per row (dims 8 and 12 use 16, 24 uses 32).
    """
    block = 16
    while block < dim:
        block *= 2
    return block


def resolve_rowwise_impl(bits: int, impl: str = "auto") -> Literal["gbq", "standard"]:
    """Which ONNX path a row-wise table of ``bits`` takes for ``impl`` (``auto``, ``gbq`` or
    ``standard``, :data:`exporters.onnx.lookup.RowwiseImpl`): ``auto`` sends 4 and 8 bits to
    GatherBlockQuantized (onnxruntime 1.31 takes ``bits=2`` too, older runtimes do not)."""
    if impl == "auto":
        return "gbq" if bits in GBQ_AUTO_BITS else "standard"
    if impl not in ("gbq", "standard"):
        raise ValueError(f"unknown rowwise impl {impl!r}")
    return impl


def default_ranges(qat: bool, bits: int) -> str:
    """``ranges`` of a rule that gives none (:data:`L2_DEFAULT_BITS`)."""
    return "l2" if not qat and bits in L2_DEFAULT_BITS else "minmax"


class RowwiseMethod(TableMethod):
    name = RowwiseConfig.METHOD
    config_type = RowwiseConfig
    packed_bits = STORED_BITS
    fbgemm_native = True
    converts_rows_independently = True  # a row's codes, scale and bias depend on the row alone

    @property
    def converted_type(self) -> type[ConvertedTable]:
        from compress.methods.table_modules import RowwiseConverted

        return RowwiseConverted

    def stored_roles(self) -> tuple[str, ...]:
        return ROLES

    # recipe
    def recipe_keys(self, spelling: str) -> tuple[str, ...]:
        return ("bits", "granularity", "ranges")

    def parse(self, spelling: str, keys: Keys) -> MethodConfig:
        bits = read_bits(keys)
        keys.refuse(
            "scale_refresh",
            "scale_refresh applies only to granularity 'table' (row-wise scales depend on the "
            "row alone)",
        )
        qat = spelling == "qat"
        return RowwiseConfig(bits, qat=qat, ranges=read_ranges(keys, default_ranges(qat, bits)))

    def fields(self, config: RowwiseConfig) -> MethodFields:
        return MethodFields("qat" if config.qat else "ptq", config.bits, GRANULARITY)

    def recipe_items(self, config: RowwiseConfig) -> list[tuple[str, Any]]:
        f = self.fields(config)
        items = [("method", f.method), ("bits", f.bits), ("granularity", f.granularity)]
        return items + [("ranges", config.ranges)]

    def describe(self, config: RowwiseConfig) -> str:
        f = self.fields(config)
        ranges = "" if config.ranges == "minmax" else f" {config.ranges}"
        return f"{f.method} INT{f.bits} {f.granularity}{ranges}"

    def trains(self, config: RowwiseConfig) -> bool:
        return config.qat

    # plan
    def table_bytes(self, config: RowwiseConfig, table: TableSpec) -> int:
        rows, dim, bits = table.num_embeddings, table.embedding_dim, config.bits
        if not can_pack(dim, bits, GRANULARITY):
            raise ValueError(
                f"row-wise INT{bits} cannot store table {table.name!r} of dim {dim} (FBGEMM rows "
                "need dim*bits/8 to be a whole, even number of bytes): choose other bits or "
                "granularity 'table'"
            )
        return rowwise_bytes(rows, dim, bits)

    # prepare / convert
    def prepare(self, config: RowwiseConfig, weight: torch.Tensor) -> PreparedTable:
        from compress.methods.table_modules import RowwisePrepared

        return RowwisePrepared(weight, config, trainable=config.qat)

    def convert(self, prepared: PreparedTable, name: str) -> ConvertedTable:
        from compress.io.table_stream import row_chunks
        from compress.methods.table_modules import RowwiseConverted
        from compress.quant.fbgemm_rowwise import rowwise_quantize_packed
        from compress.quant.l2_ranges import rowwise_quantize_packed_l2

        w, config = prepared.weight.detach(), prepared.config
        quantize = rowwise_quantize_packed_l2 if config.ranges == "l2" else rowwise_quantize_packed
        # chunk by chunk, a memory-mapped table read from its file (compress.io.table_stream)
        packed, scale, bias = quantize(w, config.bits, chunks=row_chunks(w))
        arrays = {"data": packed, "scale": scale, "bias": bias}
        return RowwiseConverted(name, w.shape[0], w.shape[1], prepared.config, arrays)

    # artifacts
    def stored_arrays(self, rows: int, dim: int, bits: int | None) -> dict[str, ArraySpec]:
        return {
            "data": ("uint8", (rows, packed_width(dim, int(bits)))),
            "scale": ("float16", (rows,)),
            "bias": ("float16", (rows,)),
        }

    def config_from_entry(self, entry: Any) -> MethodConfig:
        return RowwiseConfig(int(entry["bits"]), qat=entry.get("method") == "qat")

    # ONNX
    def graph_table(self, table: TableArrays) -> Any:
        a = table.arrays
        return RowwiseTable(a["data"], a["scale"], a["bias"], int(table.bits))

    def onnx_rows(self, request: RowsRequest) -> str:
        if resolve_rowwise_impl(request.table.kind.bits, request.rowwise_impl) == "gbq":
            return _gather_gbq(request)
        return _gather_standard(request)

    def stacked_bits(self, table: RowwiseTable, rowwise_impl: str) -> int | None:
        return table.bits if rowwise_impl != "gbq" else None

    # TorchRec
    def fbgemm_data_type(self, table: TableArrays) -> Any:
        bits = int(table.bits)
        return fbgemm_data_type(bits) if bits in FBGEMM_BITS else None

    def fbgemm_rows(
        self, table: TableArrays, start: int, stop: int, row_alignment: int
    ) -> torch.Tensor:
        import torch

        from compress.quant.fbgemm_rowwise import to_fbgemm_inference_rows

        scale = torch.from_numpy(np.array(table.arrays["scale"][start:stop]))
        bias = torch.from_numpy(np.array(table.arrays["bias"][start:stop]))
        codes = stored_codes(table, start, stop)
        return to_fbgemm_inference_rows(codes, scale, bias, int(table.bits), row_alignment)

    def fbgemm_row_bytes(self, table: TableArrays, row_alignment: int) -> int:
        return inference_row_bytes(table.embedding_dim, int(table.bits), row_alignment)


def _gather_gbq(request: RowsRequest) -> str:
    """``GatherBlockQuantized`` on the packed uint8 table with float32 scales ``[R, 1]`` (one
    block a row), explicit zero points 0 (uint8 data otherwise defaults to ``2^(bits-1)``), then
    ``+ Cast(Gather(bias))``."""
    gb, kind = request.gb, request.table.kind
    packed = request.initializer("packed", kind.packed)
    scales = request.initializer("scale_f32", kind.scale.astype(np.float32).reshape(-1, 1))
    zeros = request.initializer("zero_point", np.zeros((kind.num_rows, 1), np.uint8))
    scaled = request.ms_op(
        "GatherBlockQuantized",
        [packed, request.ids, scales, zeros],
        "rows_scaled",
        bits=kind.bits,
        block_size=gbq_block_size(request.table.dim),
        gather_axis=0,
        quantize_axis=1,
    )
    bias = request.row_param("bias", kind.bias)
    return gb.op("Add", [scaled, bias], "rows")


def _gather_standard(request: RowsRequest) -> str:
    """``Gather`` the packed bytes, unpack, ``Cast``, ``Mul`` the gathered scale, ``Add`` the
    gathered bias."""
    gb, kind = request.gb, request.table.kind
    packed = request.initializer("packed", kind.packed)
    rows = gb.op("Gather", [packed, request.ids], "packed_rows", axis=0)
    values = request.to_float(request.unpack(rows, kind.bits), "codes_f32")
    scale = request.row_param("scale", kind.scale)
    bias = request.row_param("bias", kind.bias)
    return gb.op("Add", [gb.op("Mul", [values, scale], "rows_scaled"), bias], "rows")


register(RowwiseMethod())
