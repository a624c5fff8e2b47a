"""ROBE-Z parameter sharing as a TorchRec-compatible module.

:class:`RobeEmbeddingBagCollection` replaces a TorchRec ``EmbeddingBagCollection`` for a group of
tables that share one flat float32 array ``weight`` of ``|M|`` cells (ROBE-Z, arXiv 2207.10731; the
hash lives in :mod:`compress.methods.robe.hashing`). Its forward takes a ``KeyedJaggedTensor`` and
returns a ``KeyedTensor`` of sum-pooled bags, like TorchRec's EBC; gradients w.r.t. ``weight`` are
sparse, so ``torch.optim.Adagrad``/``SGD``/``SparseAdam`` update only the cells a batch touched.
Set to an :class:`~compress.methods.robe.array.ArrayQuantization`, it reads the array at its
stored precision (straight-through gradients to the float array). With hot rows
(:meth:`RobeEmbeddingBagCollection.set_hot_rows`, :mod:`compress.methods.robe.hot_rows`) the
global rows it lists are read from a small table of their own (``hot_weight``, fake-quantized to
its stored INT8 or fp16 rows, gradients like the array's) and only the others from the array.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import get_embedding_names_by_table
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compress.io.model_spec import TableSpec
from compress.methods.robe.array import ArrayQuantization, fake_quantize_array
from compress.methods.robe.config import (  # defined there (no torch), re-exported here
    METHOD,
    RobeConfig,
    table_names,
    table_offsets,
    validate_sharing,
)
from compress.methods.robe.gather import _BlockGather, _CoalescedGrad, gather_blocks
from compress.methods.robe.hashing import block_cells, robe_block_starts
from compress.methods.robe.hot_tables import fake_quantize_hot_


class RobeEmbeddingBagCollection(nn.Module):
    """Sum-pooled embedding bags for ``tables``, all read from one shared array ``weight`` [M].

    Drop-in for TorchRec's ``EmbeddingBagCollection`` over the same tables: ``forward(kjt)``
    returns a ``KeyedTensor`` ``[B, F * D]`` with one key per (table, feature) in table order
    (TorchRec's naming: ``feature`` or ``feature@table`` when two tables read one feature).
    ``kjt`` may hold extra features or another order; only this module's features are read.

    Args:
        tables: the tables of the group; table ``t`` starts at global row ``O_t``, the rows of the
            tables before it.
        config: array size, block size ``Z`` and seed.
        quantization: optional :class:`ArrayQuantization`: forward from the dequantized array.
        sparse: sparse COO gradients for ``weight`` (the default, like ``nn.EmbeddingBag(sparse=
            True)``). ``False`` gives dense ``[M]`` gradients: for small arrays (1000x and more)
            a dense optimizer step is cheaper than the sort that sparse Adagrad runs each step, and
            SGD/Adagrad without weight decay compute the same update either way.

    Example::

        >>> t = TableSpec("t0", 1000, 8, ("f0",))
        >>> m = RobeEmbeddingBagCollection([t], RobeConfig(array_size=800, block_size=4))
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["f0"], values=torch.tensor([3, 7, 9]), lengths=torch.tensor([2, 0, 1]))
        >>> m(kjt).values().shape
        torch.Size([3, 8])
    """

    TABLE_METHOD: ClassVar[str] = METHOD

    def __init__(
        self,
        tables: Sequence[TableSpec],
        config: RobeConfig,
        quantization: ArrayQuantization | None = None,
        sparse: bool = True,
    ) -> None:
        super().__init__()
        self.sparse = sparse
        tables = tuple(tables)
        validate_sharing(tables, config.array_size, config.block_size)
        self.tables = tables
        self.config = config
        self.constants = config.constants
        self.dim = tables[0].embedding_dim
        self.quantization = quantization
        self.weight = nn.Parameter(torch.empty(config.array_size, dtype=torch.float32))

        self._configs = [
            EmbeddingBagConfig(
                name=t.name,
                embedding_dim=t.embedding_dim,
                num_embeddings=t.num_embeddings,
                feature_names=list(t.feature_names),
                pooling=PoolingType.SUM,
            )
            for t in tables
        ]
        self._embedding_names = [
            n for names in get_embedding_names_by_table(self._configs) for n in names
        ]
        self._offsets = dict(zip((t.name for t in tables), table_offsets(tables), strict=True))
        pairs = [(t, f) for t in tables for f in t.feature_names]
        self._input_features = [f for _, f in pairs]
        # per-feature row offset and row count: buffers (not saved) so that .to() moves them
        self.register_buffer(
            "_feature_offsets",
            torch.tensor([self._offsets[t.name] for t, _ in pairs]),
            persistent=False,
        )
        self.register_buffer(
            "_feature_rows", torch.tensor([t.num_embeddings for t, _ in pairs]), persistent=False
        )
        self._permute_cache: dict[tuple[str, ...], list[int] | None] = {}
        self._array_cache: tuple[tuple, torch.Tensor] | None = None
        self._coalesced = _CoalescedGrad()
        self._hooked_weight: int | None = None
        # hot rows (set_hot_rows): sorted global rows read from hot_weight instead of the array
        self.register_buffer("hot_ids", None)
        self.register_parameter("hot_weight", None)
        self.hot_dtype: str | None = None
        self.hot_fake_quantize = False
        self.reset_parameters()

    # TorchRec EBC interface ---------------------------------------------------------------------

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """TorchRec configs of the tables (sum pooling), in order."""
        return self._configs

    def is_weighted(self) -> bool:
        return False

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def reset_parameters(self) -> None:
        """Uniform in ``±sqrt(1 / rows)`` of the largest table (TorchRec's default table init)."""
        bound = math.sqrt(1.0 / max(t.num_embeddings for t in self.tables))
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)

    # hot rows -----------------------------------------------------------------------------------

    def set_hot_rows(
        self, ids: torch.Tensor, values: torch.Tensor, hot_dtype: str, fake_quantize: bool = True
    ) -> None:
        """Read the global rows ``ids`` (int64 ``[H]``, strictly increasing, ``i + O_t``) from a
        table of their own, ``hot_weight = values`` (float32 ``[H, D]``, trained like the array),
        stored at ``hot_dtype`` (``"int8"`` row-wise or ``"fp16"``): with ``fake_quantize`` the
        lookup returns the stored values (straight-through gradient); without, ``values`` as they
        are (a module rebuilt from stored, already dequantized rows)."""
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        total = sum(t.num_embeddings for t in self.tables)
        if ids.numel() and (
            bool((ids[1:] <= ids[:-1]).any()) or int(ids[0]) < 0 or int(ids[-1]) >= total
        ):
            raise ValueError(
                f"hot rows of {table_names(self.tables)} must be strictly increasing global rows "
                f"in [0, {total})"
            )
        if tuple(values.shape) != (ids.numel(), self.dim):
            raise ValueError(
                f"hot values {tuple(values.shape)}, expected {(ids.numel(), self.dim)}"
            )
        self.hot_ids = ids.to(self.weight.device)
        self.hot_weight = nn.Parameter(
            values.detach().to(self.weight.device, torch.float32).clone(),
            requires_grad=self.weight.requires_grad,
        )
        self.hot_dtype = hot_dtype
        self.hot_fake_quantize = fake_quantize

    @property
    def hot_rows(self) -> int:
        """How many rows are read from the hot table (0: none)."""
        return 0 if self.hot_ids is None else int(self.hot_ids.numel())

    def _hot_slots(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hit [N] bool, slot [N])``: whether each global row is hot and its place."""
        slot = torch.searchsorted(self.hot_ids, rows)
        slot = slot.clamp_(max=self.hot_ids.numel() - 1)
        return self.hot_ids.index_select(0, slot) == rows, slot

    def _hot_lookup(self, slots: torch.Tensor) -> torch.Tensor:
        """float32 ``[n, D]``: hot rows at ``slots`` as stored (sparse or dense gradient)."""
        if torch.is_grad_enabled() and self.hot_weight.requires_grad:
            rows = F.embedding(slots, self.hot_weight, sparse=self.sparse)
        else:
            rows = self.hot_weight.detach().index_select(0, slots)
        if self.hot_fake_quantize:
            with torch.no_grad():  # autograd sees the gather only: straight-through
                fake_quantize_hot_(rows, self.hot_dtype)
        return rows

    def _rows(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 ``[N, D]`` of global rows ``[N]``: hot ones from the hot table, the others
        hashed into the array."""
        if self.hot_ids is None or self.hot_ids.numel() == 0:
            return self._gather(self._starts(rows, 0))
        hit, slot = self._hot_slots(rows)
        hot = torch.nonzero(hit).reshape(-1)
        if hot.numel() == 0:
            return self._gather(self._starts(rows, 0))
        tail = torch.nonzero(~hit).reshape(-1)
        parts = torch.cat([self._gather(self._starts(rows[tail], 0)), self._hot_lookup(slot[hot])])
        order = torch.cat([tail, hot])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return parts.index_select(0, inverse)

    # array access -------------------------------------------------------------------------------

    def set_quantization(self, quantization: ArrayQuantization | None) -> None:
        """Run forward from the dequantized array (``None``: the float array)."""
        self.quantization = quantization
        self._array_cache = None

    def dequantized_array(self) -> torch.Tensor:
        """float32 ``[M]``: the array as the current quantization stores it (no gradient).

        Cached until ``weight`` changes (tracked by its version counter).
        """
        if self.quantization is None:
            return self.weight.detach()
        key = (self.weight._version, self.weight.data_ptr(), self.quantization)
        if self._array_cache is None or self._array_cache[0] != key:
            with torch.no_grad():
                self._array_cache = (key, fake_quantize_array(self.weight, self.quantization))
        return self._array_cache[1]

    def _restore_coalesced(self, param: torch.Tensor) -> None:
        """Post-accumulate-grad hook: put back the coalesced flag that autograd dropped.

        Autograd stores a fresh sparse ``.grad`` by re-wrapping its indices and values without the
        flag, so optimizers would sort it again. When ``.grad`` still holds exactly the values of
        the coalesced gradient made by this module's last backward (nothing was added to it), it
        is re-wrapped as coalesced; otherwise it is left as it is.
        """
        values, self._coalesced.values = self._coalesced.values, None
        g = param.grad
        if values is None or g is None or not g.is_sparse or g.is_coalesced():
            return
        gv = g._values()
        if gv.data_ptr() == values.data_ptr() and gv.numel() == values.numel():
            param.grad = torch.sparse_coo_tensor(
                g._indices(), gv, g.shape, is_coalesced=True, check_invariants=False
            )

    def _tracker(self) -> _CoalescedGrad | None:
        """The coalesced-gradient tracker, registering the hook on the current ``weight``."""
        if not self.sparse:
            return None
        if self._hooked_weight != id(self.weight):
            self.weight.register_post_accumulate_grad_hook(self._restore_coalesced)
            self._hooked_weight = id(self.weight)
        return self._coalesced

    def _gather(self, starts: torch.Tensor) -> torch.Tensor:
        """float32 ``[N, D]`` at block starts ``[N, n_blocks]``; straight-through when quantized."""
        dim, z = self.dim, self.config.block_size
        grad = torch.is_grad_enabled() and self.weight.requires_grad
        if self.quantization is None and not grad:
            return gather_blocks(self.weight.detach(), starts, dim, z)
        w = None
        if grad:
            w = _BlockGather.apply(self.weight, starts, dim, z, self.sparse, self._tracker())
        if self.quantization is None:
            return w
        q = gather_blocks(self.dequantized_array(), starts, dim, z)
        return q if w is None else q + (w - w.detach())  # value exactly q, gradient of w

    def _check_ids(self, table_name: str, ids: torch.Tensor) -> torch.Tensor:
        spec = self._table(table_name)
        ids = ids.to(torch.int64).reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= spec.num_embeddings):
            raise IndexError(
                f"table {table_name!r}: ids must lie in [0, {spec.num_embeddings}), got "
                f"[{int(ids.min())}, {int(ids.max())}]"
            )
        return ids

    def _starts(self, ids: torch.Tensor, offsets: int | torch.Tensor) -> torch.Tensor:
        c = self.config
        return robe_block_starts(
            ids, offsets, self.dim, c.block_size, c.array_size, self.constants, validate=False
        )

    def cell_indices(self, table_name: str, ids: torch.Tensor) -> torch.Tensor:
        """int64 ``[N, D]``: the cells read by rows ``ids`` [N] of ``table_name``."""
        ids = self._check_ids(table_name, ids)
        starts = self._starts(ids, self._offsets[table_name])
        return block_cells(starts, self.dim, self.config.block_size)

    def lookup_rows(self, table_name: str, ids: torch.Tensor) -> torch.Tensor:
        """float32 ``[N, D]``: the virtual rows ``ids`` [N] of ``table_name`` (with gradient;
        hot rows from the hot table)."""
        ids = self._check_ids(table_name, ids)
        if self.hot_ids is not None:
            return self._rows(ids + self._offsets[table_name])
        return self._gather(self._starts(ids, self._offsets[table_name]))

    def materialize(self, table_name: str) -> torch.Tensor:
        """float32 ``[rows, D]``: the whole virtual table (small tables and tests only)."""
        rows = self._table(table_name).num_embeddings
        with torch.no_grad():
            return self.lookup_rows(table_name, torch.arange(rows))

    def _table(self, name: str) -> TableSpec:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(f"no table {name!r} in this sharing group {table_names(self.tables)}")

    # forward ------------------------------------------------------------------------------------

    def _select(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """``kjt`` restricted to (and ordered as) this module's input features."""
        keys = tuple(kjt.keys())
        if keys not in self._permute_cache:
            if keys == tuple(self._input_features):
                self._permute_cache[keys] = None
            else:
                missing = [f for f in self._input_features if f not in keys]
                if missing:
                    raise KeyError(f"features {missing} missing from the KeyedJaggedTensor")
                self._permute_cache[keys] = [keys.index(f) for f in self._input_features]
        perm = self._permute_cache[keys]
        return kjt if perm is None else kjt.permute(perm)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Sum-pool each bag of each feature.

        One hash computation for all ids of all features, one gather of ``[N, D]`` (blocks read
        as rows of a strided view), one ``index_add`` into ``[B * F, D]`` (skipped when every bag
        holds one id).

        Args:
            features: ``KeyedJaggedTensor`` with ``B`` bags per feature (lengths may be 0).

        Returns:
            ``KeyedTensor`` with values ``[B, F * D]``, keys as :meth:`embedding_bag_configs`.
        """
        kjt = self._select(features)
        if kjt.variable_stride_per_key():
            raise ValueError("variable batch size per feature is not supported")
        n_feat = len(self._input_features)
        batch = kjt.stride()
        values = kjt.values().to(torch.int64)
        lengths = kjt.lengths().to(torch.int64)
        n_ids = values.numel()
        per_feature = lengths.view(n_feat, batch).sum(1)  # ids of each feature [F]
        offsets = torch.repeat_interleave(self._feature_offsets, per_feature, output_size=n_ids)
        rows = torch.repeat_interleave(self._feature_rows, per_feature, output_size=n_ids)
        bad = (values < 0) | (values >= rows)
        if n_ids and bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            f = int(torch.searchsorted(per_feature.cumsum(0), first, right=True))
            raise IndexError(f"feature {self._input_features[f]!r}: id out of range for its table")
        if self.hot_ids is not None:  # global rows, hot ones read from the hot table
            keys, read = (values + offsets).unsqueeze(1), lambda k: self._rows(k.reshape(-1))
        else:  # [N, n_blocks] block starts, feature-major
            keys, read = self._starts(values, offsets), self._gather
        n_blocks = keys.shape[1]
        if n_ids == n_feat * batch and bool((lengths == 1).all()):
            # one id a bag: no pooling; put the (small, int) keys in batch-major order instead
            keys = keys.view(n_feat, batch, n_blocks).transpose(0, 1)
            out = read(keys.reshape(batch * n_feat, n_blocks))
        else:
            bag = torch.repeat_interleave(
                torch.arange(n_feat * batch, device=values.device), lengths, output_size=n_ids
            )
            # feature-major bag f * B + b  ->  batch-major row b * F + f
            row = torch.remainder(bag, batch) * n_feat + torch.div(
                bag, batch, rounding_mode="floor"
            )
            emb = read(keys)  # [N, D]
            out = emb.new_zeros(batch * n_feat, self.dim).index_add(0, row, emb)
        out = out.view(batch, n_feat * self.dim)
        return KeyedTensor(
            keys=self._embedding_names,
            length_per_key=[self.dim] * n_feat,
            values=out,
        )

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"tables={table_names(self.tables)}, array_size={c.array_size}, "
            f"block_size={c.block_size}, seed={c.seed}, quantization={self.quantization}, "
            f"sparse={self.sparse}"
            + (f", hot_rows={self.hot_rows} ({self.hot_dtype})" if self.hot_ids is not None else "")
        )
