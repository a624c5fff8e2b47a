"""The PyTorch modules of the built-in per-table methods: prepared and converted tables.

Each built-in method (``fp32``/``keep``, ``fp16``, ``rowwise``, ``tablewise``) is defined in its
own module (:mod:`compress.methods.keep`, :mod:`~compress.methods.fp16`,
:mod:`~compress.methods.rowwise`, :mod:`~compress.methods.tablewise`): its config, its handler
and every hook. Its modules live here, so that the handlers import without torch (the manifest
reader and ONNX Runtime serving look methods up and never build a module); a handler imports this
module when it prepares or converts a table.

* a :class:`~compress.methods.base.PreparedTable` subclass: FP32 master weights whose gathered
  rows are fake-quantized to what the method stores;
* a :class:`~compress.methods.base.ConvertedTable` subclass: the stored arrays as buffers (the
  roles its handler's ``stored_roles`` names), dequantized at lookup.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F  # noqa: N812

from compress.io.table_stream import row_chunks
from compress.methods import rowwise, tablewise
from compress.methods.base import ConvertedTable, PreparedTable
from compress.methods.scale_tracking import BlockAbsmax
from compress.quant import native
from compress.quant.fbgemm_rowwise import rowwise_dequantize
from compress.quant.l2_ranges import fake_quantize_rowwise_l2_, tablewise_l2_scale
from compress.quant.packing import unpack_nbit
from compress.quant.tablewise import (
    chunks_absmax,
    scale_from_absmax,
    signed_offset,
    table_scale,
    tablewise_dequantize,
)
from compress.train.config import DEFAULT_SCALE_REFRESH

if TYPE_CHECKING:
    from compress.methods.tablewise import TablewiseConfig


# -- fp32 (keep) ---------------------------------------------------------------------------------


class KeepPrepared(PreparedTable):
    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, sparse=True)


class KeepConverted(ConvertedTable):
    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.data.index_select(0, ids)


# -- fp16 ----------------------------------------------------------------------------------------


class Fp16Prepared(PreparedTable):
    def fake_quantize_(self, rows: torch.Tensor) -> None:
        rows.copy_(rows.half())


class Fp16Converted(ConvertedTable):
    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.data.index_select(0, ids).float()


# -- rowwise -------------------------------------------------------------------------------------


class RowwisePrepared(PreparedTable):
    def fake_quantize_(self, rows: torch.Tensor) -> None:
        if self.config.ranges == "l2":  # the search convert runs, on the gathered rows
            fake_quantize_rowwise_l2_(rows, self.config.bits)
        else:
            native.fake_quantize_rowwise_(rows, self.config.bits)


class RowwiseConverted(ConvertedTable):
    ROLES = rowwise.ROLES

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        codes = unpack_nbit(self.data.index_select(0, ids), self.config.bits, self.embedding_dim)
        return rowwise_dequantize(
            codes, self.scale.index_select(0, ids), self.bias.index_select(0, ids)
        )


# -- tablewise -----------------------------------------------------------------------------------


class TablewisePrepared(PreparedTable):
    """FP32 master weight and the table's ``scale`` buffer."""

    def __init__(self, weight: torch.Tensor, config: TablewiseConfig) -> None:
        super().__init__(weight, config, trainable=config.qat)
        w = weight.detach()
        if config.ranges == "l2":  # the scale of least L2 error (values beyond it clip)
            scale = tablewise_l2_scale(lambda: row_chunks(w), config.bits)
        else:  # max|W| chunk by chunk, a memory-mapped table read from its file
            scale = scale_from_absmax(chunks_absmax(row_chunks(w)), config.bits)
        self.register_buffer("scale", torch.tensor(scale))
        self.scale_refresh = config.scale_refresh or DEFAULT_SCALE_REFRESH
        # max|W| summary of a tracked table, valid while the weight's version counter equals
        # _blocks_version
        self._tracked = False
        self._blocks: BlockAbsmax | None = None
        self._blocks_version = -1

    @property
    def refreshes_scale(self) -> bool:
        return self.config.qat

    def fake_quantize_(self, rows: torch.Tensor) -> None:
        native.fake_quantize_tablewise_(rows, float(self.scale), self.config.bits)

    def training_step(self, step: int) -> None:
        if self.refreshes_scale and step > 0 and step % self.scale_refresh == 0:
            self.refresh_scale()

    def refresh_scale(self) -> None:
        """Set ``scale`` from ``max|W|``: the whole-table pass DQRM amortizes over P steps.

        A tracked table reads its :class:`BlockAbsmax` summary instead: the same value, for a few
        percent of the reading. With ``ranges = "l2"``, the scale of least L2 error of the table
        as it is now (three passes, :func:`~compress.quant.l2_ranges.tablewise_l2_scale`).
        """
        w = self.weight.detach()
        bits = self.config.bits
        with torch.no_grad():
            if self.config.ranges == "l2":
                self.scale.fill_(tablewise_l2_scale(lambda: row_chunks(w), bits))
                return
            if not self._tracked:
                self.scale.fill_(table_scale(w, bits))
                return
            if self._blocks is None or self.weight._version != self._blocks_version:
                self._blocks = BlockAbsmax.build(w)  # (re)build: one pass over the table
                self._blocks_version = self.weight._version
            self.scale.fill_(scale_from_absmax(self._blocks.maximum(w), bits))

    def track(self) -> None:
        self._tracked = True

    def before_optimizer_step(self) -> None:
        # something other than our optimizer changed the weight since the summary was up to date
        if self._blocks is not None and self.weight._version != self._blocks_version:
            self._blocks = None

    def after_optimizer_step(self) -> None:
        # the optimizer changed only the rows of the sparse gradient: fold them into the summary
        # while they are still in the CPU cache
        if self._blocks is None or self.weight._version == self._blocks_version:
            return  # no summary yet, or the optimizer skipped this table
        grad = self.weight.grad
        if grad is None or not grad.is_sparse:
            self._blocks = None  # a dense update may have changed any row: rebuild at refresh
            return
        self._blocks.update(self.weight, grad._indices()[0])
        self._blocks_version = self.weight._version


class TablewiseConverted(ConvertedTable):
    ROLES = tablewise.ROLES

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        bits = self.config.bits
        codes = unpack_nbit(self.data.index_select(0, ids), bits, self.embedding_dim)
        q = codes.to(torch.int16) - signed_offset(bits)
        return tablewise_dequantize(q.to(torch.int8), float(self.scale))
