"""What a table method is: its config, its handler, and the modules it makes.

A **method** (:mod:`compress.methods.registry`) is a frozen config dataclass
(:class:`MethodConfig`: what a recipe rule gives it) and one handler object (:class:`TableMethod`)
with a hook for every stage, from the recipe to the serving runtimes. Its prepared tables are
:class:`PreparedTable` modules (FP32 master weights, fake-quantized gathered rows), its converted
tables :class:`ConvertedTable` modules (the stored arrays as buffers).

The config and the handler are defined in :mod:`compress.methods.handler` (no torch, so that the
manifest reader and ONNX Runtime serving do not import it) and re-exported here: a method's module
imports everything it needs from this one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from compress.methods.handler import (
    SHARED_ROLE,
    ArraySpec,
    MethodConfig,
    MethodFields,
    TableMethod,
)

__all__ = [
    "SHARED_ROLE",
    "ArraySpec",
    "ConvertedTable",
    "MethodConfig",
    "MethodFields",
    "PreparedTable",
    "TableMethod",
]


# --------------------------------------------------------------------------------------------------
# The modules a method returns


class PreparedTable(nn.Module):
    """One table of a prepared (fine-tunable) model: its FP32 master ``weight`` and settings.

    :meth:`lookup` gathers the rows of ``ids`` with a sparse gradient and lets
    :meth:`fake_quantize_` overwrite them in place under ``no_grad``: autograd sees only the
    gather, so the gradient reaching the table is the incoming one, unchanged (the
    straight-through estimator) and still sparse.
    """

    def __init__(self, weight: torch.Tensor, config: MethodConfig, trainable: bool) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(weight, requires_grad=trainable)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``[N, D]`` of ``ids [N]`` as the converted table will return them."""
        rows = F.embedding(ids, self.weight, sparse=True)
        with torch.no_grad():
            self.fake_quantize_(rows)
        return rows

    def fake_quantize_(self, rows: torch.Tensor) -> None:
        """Round gathered ``rows`` in place to what the stored table holds."""

    def training_step(self, step: int) -> None:
        """Called before every training forward with the number of training forwards so far."""

    @property
    def refreshes_scale(self) -> bool:
        """Whether the table rescans ``max|W|`` for a table-wide scale while training; such a
        table can keep a running summary instead (:meth:`track`,
        :func:`compress.methods.qat_embedding.track_scale_updates`)."""
        return False

    def track(self) -> None:
        """From now on keep the summary up to date from the optimizer's steps (which change
        only the rows of their sparse gradients)."""

    def before_optimizer_step(self) -> None:
        """Called before each ``optimizer.step()`` of a tracked table."""

    def after_optimizer_step(self) -> None:
        """Called after each ``optimizer.step()`` of a tracked table."""


class ConvertedTable(nn.Module):
    """One converted table: its stored arrays as registered buffers, one per role in ``ROLES``
    (state-dict keys ``<table>.data``, ``<table>.scale``, ...), so ``state_dict()`` holds them
    and ``.to()`` moves them. :meth:`lookup` dequantizes only the gathered rows. The artifact
    writer stores role ``data`` as ``tables/<table>.npy`` and any other as
    ``tables/<table>.<role>.npy``."""

    ROLES: ClassVar[tuple[str, ...]] = ("data",)

    def __init__(
        self,
        name: str,
        num_embeddings: int,
        embedding_dim: int,
        config: MethodConfig,
        arrays: Mapping[str, torch.Tensor],
    ) -> None:
        super().__init__()
        if set(arrays) != set(self.ROLES):
            raise ValueError(f"table {name!r}: arrays {sorted(arrays)}, expected {self.ROLES}")
        self.name = name
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.config = config
        for role in self.ROLES:
            self.register_buffer(role, arrays[role])

    def arrays(self) -> dict[str, torch.Tensor]:
        """The stored arrays by role, in :attr:`ROLES` order (the buffers themselves)."""
        return {role: getattr(self, role) for role in self.ROLES}

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays."""
        return sum(a.numel() * a.element_size() for a in self.arrays().values())

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """float32 rows ``[N, D]`` of ``ids [N]``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.name!r}, {self.num_embeddings}x{self.embedding_dim}, {self.config}"
