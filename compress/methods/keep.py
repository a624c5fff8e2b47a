"""Method ``fp32`` (recipe ``method = "keep"``): the table stays as the checkpoint has it.

Prepared: trainable FP32 weights (a fine-tuning run updates them like any other parameter).
Stored: ``data`` float32 ``[R, D]`` (``tables/<t>.npy``). ONNX: one ``Gather``. TorchRec: FBGEMM's
``FP32`` rows (the values' bytes, zero-padded to the row alignment). The PyTorch modules are
:mod:`compress.methods.table_modules` (imported when a table is prepared or converted: reading a
manifest needs no torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from compress.methods.handler import ArraySpec, MethodConfig, MethodFields, TableMethod
from compress.methods.registry import get, register

if TYPE_CHECKING:
    import torch

    from compress.io.model_spec import TableSpec
    from compress.methods.base import ConvertedTable, PreparedTable
    from exporters.artifacts.read import TableArrays
    from exporters.onnx.lookup import RowsRequest


#: ``TableSpec.dtype`` of a half-precision checkpoint table.
HALF = "float16"
#: The roles of a stored table's arrays: its values.
ROLES = ("data",)


@dataclass(frozen=True)
class KeepConfig(MethodConfig):
    """No settings: the table is kept."""

    METHOD: ClassVar[str] = "fp32"


@dataclass(frozen=True)
class Fp32Table:
    """Graph table: float32 ``weight`` [R, D]."""

    weight: np.ndarray
    METHOD: ClassVar[str] = KeepConfig.METHOD

    @property
    def num_rows(self) -> int:
        return int(self.weight.shape[0])

    def validate(self, dim: int, what: str) -> None:
        if self.weight.dtype != np.float32 or self.weight.shape[1:] != (dim,):
            raise ValueError(f"{what}: weight must be float32 [R, {dim}]")


def fbgemm_float_rows(values: np.ndarray, row_bytes: int) -> torch.Tensor:
    """FBGEMM's FP32/FP16 inference rows of ``values`` ``[n, D]``: their bytes, zero-padded to
    ``row_bytes`` (uint8 ``[n, row_bytes]``)."""
    import torch

    t = torch.from_numpy(np.array(values))
    raw = t.contiguous().view(torch.uint8).reshape(t.shape[0], -1)
    out = torch.zeros(t.shape[0], row_bytes, dtype=torch.uint8)
    out[:, : raw.shape[1]] = raw
    return out


def aligned(nbytes: int, row_alignment: int) -> int:
    """``nbytes`` rounded up to a multiple of ``row_alignment``."""
    return -(-nbytes // row_alignment) * row_alignment


class KeepMethod(TableMethod):
    name = KeepConfig.METHOD
    config_type = KeepConfig
    changes_tables = False
    converts_rows_independently = True  # fp16 too: a cast of each value
    spelling: ClassVar[str] = "keep"
    #: The name of this method's FBGEMM rows in TorchRec's ``DataType``, and bytes per value.
    fbgemm_type: ClassVar[str] = "FP32"
    value_bytes: ClassVar[int] = 4

    @property
    def converted_type(self) -> type[ConvertedTable]:
        from compress.methods.table_modules import KeepConverted

        return KeepConverted

    def stored_roles(self) -> tuple[str, ...]:
        return ROLES

    def fields(self, config: MethodConfig) -> MethodFields:
        return MethodFields(self.spelling)

    def table_bytes(self, config: MethodConfig, table: TableSpec) -> int:
        stored = self.stored_config(config, table)
        if stored is not config:
            return get(stored.METHOD).table_bytes(stored, table)
        return table.num_embeddings * table.embedding_dim * self.value_bytes

    def stored_config(self, config: MethodConfig, table: TableSpec) -> MethodConfig:
        """A kept table stays at its checkpoint precision: an fp16 table as ``fp16``; fp32 and
        bf16 tables as fp32 (a bf16 value is exact in fp32; no artifact layout holds bf16)."""
        if isinstance(config, KeepConfig) and table.dtype == HALF:
            from compress.methods.fp16 import Fp16Config

            return Fp16Config()
        return config

    def prepare(self, config: MethodConfig, weight: torch.Tensor) -> PreparedTable:
        from compress.methods.table_modules import KeepPrepared

        return KeepPrepared(weight, config, trainable=True)

    def convert(self, prepared: PreparedTable, name: str) -> ConvertedTable:
        w = prepared.weight.detach()
        rows, dim = w.shape
        return self.converted_type(name, rows, dim, prepared.config, {"data": self._stored(w)})

    def _stored(self, w: torch.Tensor) -> torch.Tensor:
        return w.float().contiguous()

    def stored_arrays(self, rows: int, dim: int, bits: int | None) -> dict[str, ArraySpec]:
        return {"data": ("float32", (rows, dim))}

    def graph_table(self, table: TableArrays) -> Any:
        return Fp32Table(table.arrays["data"])

    def onnx_rows(self, request: RowsRequest) -> str:
        gb = request.gb
        weight = request.initializer("weight", request.table.kind.weight)
        return gb.op("Gather", [weight, request.ids], "rows", axis=0)

    def fbgemm_data_type(self, table: TableArrays) -> Any:
        from torchrec.modules.embedding_configs import DataType

        return DataType[self.fbgemm_type]

    def fbgemm_row_bytes(self, table: TableArrays, row_alignment: int) -> int:
        return aligned(table.embedding_dim * self.value_bytes, row_alignment)

    def fbgemm_rows(
        self, table: TableArrays, start: int, stop: int, row_alignment: int
    ) -> torch.Tensor:
        return fbgemm_float_rows(
            table.arrays["data"][start:stop], self.fbgemm_row_bytes(table, row_alignment)
        )


register(KeepMethod())
