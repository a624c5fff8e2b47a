"""Method ``fp16`` (recipe ``method = "fp16"``): the table stored at half precision.

Prepared: trainable FP32 master weights whose gathered rows are rounded to fp16 in the forward.
Stored: ``data`` float16 ``[R, D]``. ONNX: ``Gather`` + ``Cast`` to float32. TorchRec: FBGEMM's
``FP16`` rows. Everything else as :mod:`compress.methods.keep` (the PyTorch modules too:
:mod:`compress.methods.table_modules`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from compress.methods.handler import ArraySpec, MethodConfig
from compress.methods.keep import KeepMethod
from compress.methods.registry import register

if TYPE_CHECKING:
    import torch

    from compress.io.model_spec import TableSpec
    from compress.methods.base import ConvertedTable, PreparedTable
    from exporters.artifacts.read import TableArrays
    from exporters.onnx.lookup import RowsRequest


@dataclass(frozen=True)
class Fp16Config(MethodConfig):
    """No settings."""

    METHOD: ClassVar[str] = "fp16"


@dataclass(frozen=True)
class Fp16Table:
    """Graph table: float16 ``weight`` [R, D]; rows are cast to float32 after the gather."""

    weight: np.ndarray
    METHOD: ClassVar[str] = Fp16Config.METHOD

    @property
    def num_rows(self) -> int:
        return int(self.weight.shape[0])

    def validate(self, dim: int, what: str) -> None:
        if self.weight.dtype != np.float16 or self.weight.shape[1:] != (dim,):
            raise ValueError(f"{what}: weight must be float16 [R, {dim}]")


class Fp16Method(KeepMethod):
    name = Fp16Config.METHOD
    config_type = Fp16Config
    changes_tables = True
    spelling = "fp16"
    fbgemm_type = "FP16"
    value_bytes = 2

    @property
    def converted_type(self) -> type[ConvertedTable]:
        from compress.methods.table_modules import Fp16Converted

        return Fp16Converted

    def table_bytes(self, config: MethodConfig, table: TableSpec) -> int:
        return table.num_embeddings * table.embedding_dim * self.value_bytes

    def prepare(self, config: MethodConfig, weight: torch.Tensor) -> PreparedTable:
        from compress.methods.table_modules import Fp16Prepared

        return Fp16Prepared(weight, config, trainable=True)

    def _stored(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` rounded to fp16, chunk by chunk (a memory-mapped table read from its file)."""
        import torch

        from compress.io.table_stream import row_chunks

        out = torch.empty(w.shape, dtype=torch.float16)
        for start, stop, rows in row_chunks(w):
            out[start:stop].copy_(rows)
        return out

    def stored_arrays(self, rows: int, dim: int, bits: int | None) -> dict[str, ArraySpec]:
        return {"data": ("float16", (rows, dim))}

    def graph_table(self, table: TableArrays) -> Any:
        return Fp16Table(table.arrays["data"])

    def onnx_rows(self, request: RowsRequest) -> str:
        gb = request.gb
        weight = request.initializer("weight_fp16", request.table.kind.weight)
        half = gb.op("Gather", [weight, request.ids], "rows_fp16", axis=0)
        return request.to_float(half, "rows")


register(Fp16Method())
