"""ROBE-Z parameter sharing as TorchRec-compatible modules.

:class:`RobeEmbeddingBagCollection` replaces a TorchRec ``EmbeddingBagCollection`` for a group of
tables that share one flat float32 array ``weight`` of ``|M|`` cells (ROBE-Z, arXiv 2207.10731; the
hash lives in :mod:`compress.methods.robe_hash`). Its forward takes a ``KeyedJaggedTensor`` and returns a
``KeyedTensor`` of sum-pooled bags, like TorchRec's EBC; gradients w.r.t. ``weight`` are sparse, so
``torch.optim.Adagrad``/``SGD``/``SparseAdam`` update only the cells a batch touched.

:class:`CombinedEmbeddingBagCollection` glues several such modules (one per sharing group) and a
TorchRec EBC (the tables left alone) back into one module with the EBC interface, so it can stand
in for ``model.sparse_arch.embedding_bag_collection``; :func:`combine_with_ebc` builds one from an
existing EBC.

Array quantization for export and evaluation (:func:`quantize_array`):

- ``"fp16"``: the array cast to float16, no scale.
- ``"int8"``: symmetric, no zero point, ``q = clamp(round(M / s), -127, 127)`` with
  ``s = max|M| / 127`` (``1.0`` for an all-zero group), stored as float32. One scale for the whole
  array by default (``group_size=None``), or one scale per run of ``group_size`` consecutive cells
  (the last run may be shorter). Dequantized value: ``q * s`` in float32.

A module set to an :class:`ArrayQuantization` computes its forward from the dequantized array (the
values an exported model reads) and passes gradients straight through to the float array.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollection,
    get_embedding_names_by_table,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from compress.errors import RecipeError
from compress.io.model_spec import TableSpec
from compress.methods.robe_hash import (
    DEFAULT_SEED,
    RobeConstants,
    array_size_for,
    block_cells,
    check_array,
    check_dim,
    check_total_rows,
    robe_block_starts,
    robe_constants,
)

ARRAY_PRECISIONS = ("fp32", "fp16", "int8")
_INT8_QMAX = 127


@dataclass(frozen=True)
class RobeConfig:
    """Settings of one sharing group: ``array_size`` cells ``|M|``, block size ``Z``, hash seed."""

    array_size: int
    block_size: int
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise RecipeError(f"ROBE seed must be an integer in [0, 2**32), got {seed!r}")

    @property
    def constants(self) -> RobeConstants:
        return robe_constants(self.seed)

    @classmethod
    def for_tables(
        cls,
        tables: Sequence[TableSpec],
        block_size: int,
        compression: float | None = None,
        nbytes: int | None = None,
        seed: int = DEFAULT_SEED,
    ) -> RobeConfig:
        """Config whose array is ``compression`` times smaller than ``tables`` (or ``nbytes``)."""
        validate_tables(tables)
        total_rows = sum(t.num_embeddings for t in tables)
        try:
            size = array_size_for(
                total_rows,
                tables[0].embedding_dim,
                compression=compression,
                nbytes=nbytes,
                block_size=block_size,
            )
        except ValueError as e:
            raise RecipeError(f"sharing group {_names(tables)}: {e}") from None
        return cls(array_size=size, block_size=block_size, seed=seed)


@dataclass(frozen=True)
class ArrayQuantization:
    """How the shared array is stored for export: ``precision`` in :data:`ARRAY_PRECISIONS`.

    ``group_size`` (int8 only): cells per scale; ``None`` means one scale for the whole array.
    """

    precision: str = "int8"
    group_size: int | None = None

    def __post_init__(self) -> None:
        try:
            _check_precision(self.precision, self.group_size)
        except ValueError as e:
            raise RecipeError(f"array quantization: {e}") from None


def _names(tables: Sequence[TableSpec]) -> str:
    return "[" + ", ".join(t.name for t in tables) + "]"


def validate_tables(tables: Sequence[TableSpec]) -> None:
    """``RecipeError`` unless ``tables`` can share one array (non-empty, unique names, one dim)."""
    if not tables:
        raise RecipeError("a sharing group needs at least one table")
    seen: set[str] = set()
    for t in tables:
        if t.name in seen:
            raise RecipeError(f"sharing group {_names(tables)}: table {t.name!r} appears twice")
        seen.add(t.name)
        if t.num_embeddings < 1:
            raise RecipeError(f"table {t.name!r}: num_embeddings must be positive")
    dim = tables[0].embedding_dim
    for t in tables:
        if t.embedding_dim != dim:
            raise RecipeError(
                f"sharing group {_names(tables)}: table {t.name!r} has dim {t.embedding_dim}, "
                f"{tables[0].name!r} has {dim}; tables sharing an array need one dim"
            )
    try:
        check_dim(dim)
        check_total_rows(sum(t.num_embeddings for t in tables))
    except ValueError as e:
        raise RecipeError(f"sharing group {_names(tables)}: {e}") from None


def validate_sharing(tables: Sequence[TableSpec], array_size: int, block_size: int) -> None:
    """``RecipeError`` (one line naming the tables and parameter) for an unusable sharing group."""
    validate_tables(tables)
    try:
        check_array(array_size, block_size)
    except ValueError as e:
        raise RecipeError(f"sharing group {_names(tables)}: {e}") from None


def table_offsets(tables: Sequence[TableSpec]) -> list[int]:
    """``O_t`` of each table: the rows of the tables before it, in the given order."""
    offsets, total = [], 0
    for t in tables:
        offsets.append(total)
        total += t.num_embeddings
    return offsets


def table_spec_from_config(cfg: EmbeddingBagConfig) -> TableSpec:
    """The :class:`TableSpec` of a TorchRec ``EmbeddingBagConfig`` (float32 storage)."""
    return TableSpec(
        name=cfg.name,
        num_embeddings=cfg.num_embeddings,
        embedding_dim=cfg.embedding_dim,
        feature_names=tuple(cfg.feature_names or [cfg.name]),
    )


# --- array quantization (pure functions) ---------------------------------------------------------


def _check_precision(precision: str, group_size: int | None) -> None:
    if precision not in ARRAY_PRECISIONS:
        raise ValueError(f"array precision must be one of {ARRAY_PRECISIONS}, got {precision!r}")
    if group_size is not None:
        if precision != "int8":
            raise ValueError(f"group_size applies to int8 only, not {precision!r}")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {group_size!r}")


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x`` [M] padded with zeros to a multiple of ``group_size`` and viewed ``[G, group_size]``."""
    pad = (-x.numel()) % group_size
    if pad:
        x = torch.cat([x, x.new_zeros(pad)])
    return x.view(-1, group_size)


def quantize_array(
    weight: torch.Tensor, precision: str, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quantize a shared array for storage (see the module docstring for the scheme).

    Args:
        weight: float ``[M]``.
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"``.
        group_size: int8 only: cells per scale (``None``: one scale for the array).

    Returns:
        ``(data, scale)``: ``data`` float32/float16/int8 ``[M]``; ``scale`` ``None`` for fp32 and
        fp16, else float32 ``[1]`` (per array) or ``[ceil(M / group_size)]``.

    Example::

        >>> q, s = quantize_array(torch.tensor([0.5, -1.0, 0.25]), "int8")
        >>> q.tolist(), float(s)
        ([64, -127, 32], 0.007874015718698502)
    """
    _check_precision(precision, group_size)
    w = weight.detach().reshape(-1).float()
    if precision == "fp32":
        return w.clone(), None
    if precision == "fp16":
        if w.numel() and float(w.abs().max()) > torch.finfo(torch.float16).max:
            raise ValueError("array holds values beyond the float16 range")
        return w.half(), None
    groups = _grouped(w, group_size) if group_size else w.view(1, -1)
    amax = groups.abs().amax(dim=1) if w.numel() else torch.zeros(1)
    scale = torch.where(amax > 0, amax / _INT8_QMAX, torch.ones_like(amax))
    q = torch.clamp(torch.round(groups / scale.unsqueeze(1)), -_INT8_QMAX, _INT8_QMAX)
    return q.to(torch.int8).reshape(-1)[: w.numel()].clone(), scale


def dequantize_array(
    data: torch.Tensor, scale: torch.Tensor | None, group_size: int | None = None
) -> torch.Tensor:
    """Inverse of :func:`quantize_array`: float32 ``[M]`` (``q * scale`` for int8)."""
    if scale is None:
        return data.float()
    q = data.float()
    if group_size is None:
        if scale.numel() != 1:
            raise ValueError(f"{scale.numel()} scales given without a group_size")
        return q * scale.reshape(())
    return (_grouped(q, group_size) * scale.unsqueeze(1)).reshape(-1)[: q.numel()]


def fake_quantize_array(weight: torch.Tensor, quant: ArrayQuantization) -> torch.Tensor:
    """``dequantize(quantize(weight))``: float32 ``[M]`` holding what an exported model reads."""
    data, scale = quantize_array(weight, quant.precision, quant.group_size)
    return dequantize_array(data, scale, quant.group_size)


# --- gathering blocks, with sparse gradients ----------------------------------------------------


def gather_blocks(
    array: torch.Tensor, starts: torch.Tensor, dim: int, block_size: int
) -> torch.Tensor:
    """float ``[N, D]``: the cells of block starts ``[N, ceil(D / Z)]`` (no autograd).

    Reads each block as one row of the overlapping ``[|M| - Z + 1, Z]`` strided view of ``array``,
    so no ``[N, D]`` index is built.
    """
    n, n_blocks = starts.shape
    rows = array.as_strided((array.numel() - block_size + 1, block_size), (1, 1))
    out = rows.index_select(0, starts.reshape(-1)).view(n, n_blocks * block_size)
    return out[:, :dim] if n_blocks * block_size != dim else out


DENSE_COALESCE_RATIO = 32
"""Sum a sparse gradient in a dense ``[M]`` buffer (coalescing it) when ``M <= ratio * nnz``."""


class _CoalescedGrad:
    """The values of the last coalesced gradient made by :class:`_BlockGather`, until autograd
    stores it in ``.grad`` (see :meth:`RobeEmbeddingBagCollection._restore_coalesced`)."""

    __slots__ = ("values",)

    def __init__(self) -> None:
        self.values: torch.Tensor | None = None


def sparse_cell_gradient(cells: torch.Tensor, grad: torch.Tensor, size: int) -> torch.Tensor:
    """Sparse COO ``[size]`` gradient: ``grad`` [nnz] added at ``cells`` [nnz].

    When the array is not much larger than the number of entries (``size <= DENSE_COALESCE_RATIO
    * nnz``) the entries are summed in a dense buffer and returned coalesced (sorted, unique), in
    ``O(size + nnz)``; otherwise they are returned as they are (uncoalesced, ``O(nnz)``).
    """
    if size > DENSE_COALESCE_RATIO * cells.numel():
        return torch.sparse_coo_tensor(
            cells.unsqueeze(0), grad, (size,), is_coalesced=False, check_invariants=False
        )
    dense = grad.new_zeros(size).index_add_(0, cells, grad)
    hit = torch.zeros(size, dtype=torch.bool, device=cells.device)
    hit[cells] = True
    touched = hit.nonzero().reshape(1, -1)  # sorted, unique
    return torch.sparse_coo_tensor(
        touched, dense[touched[0]], (size,), is_coalesced=True, check_invariants=False
    )


class _BlockGather(torch.autograd.Function):
    """:func:`gather_blocks` whose gradient w.r.t. the 1-D array is sparse COO or dense ``[M]``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        weight: torch.Tensor,
        starts: torch.Tensor,
        dim: int,
        block_size: int,
        sparse: bool,
        tracker: _CoalescedGrad | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(starts)
        ctx.settings = (weight.shape[0], dim, block_size, sparse, tracker)
        return gather_blocks(weight, starts, dim, block_size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (starts,) = ctx.saved_tensors
        size, dim, block_size, sparse, tracker = ctx.settings
        cells = block_cells(starts, dim, block_size).reshape(-1)
        values = grad.reshape(-1)
        if sparse:
            g = sparse_cell_gradient(cells, values, size)
            if tracker is not None and g.is_coalesced():
                tracker.values = g._values()
        else:
            g = values.new_zeros(size).index_add_(0, cells, values)
        return g, None, None, None, None, None


def gather_cells(
    weight: torch.Tensor,
    starts: torch.Tensor,
    dim: int,
    block_size: int,
    sparse: bool = True,
) -> torch.Tensor:
    """float ``[N, D]`` read from the 1-D ``weight`` at block starts ``[N, ceil(D / Z)]``.

    The gradient w.r.t. ``weight`` is a sparse COO ``[M]`` tensor (``sparse=True``) or dense.
    """
    return _BlockGather.apply(weight, starts, dim, block_size, sparse, None)


# --- the shared-array module ---------------------------------------------------------------------


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
        """float32 ``[N, D]``: the virtual rows ``ids`` [N] of ``table_name`` (with gradient)."""
        ids = self._check_ids(table_name, ids)
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
        raise KeyError(f"no table {name!r} in this sharing group {_names(self.tables)}")

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
        starts = self._starts(values, offsets)  # [N, n_blocks], feature-major
        n_blocks = starts.shape[1]
        if n_ids == n_feat * batch and bool((lengths == 1).all()):
            # one id a bag: no pooling; put the (small, int) starts in batch-major order instead
            starts = starts.view(n_feat, batch, n_blocks).transpose(0, 1)
            out = self._gather(starts.reshape(batch * n_feat, n_blocks))
        else:
            bag = torch.repeat_interleave(
                torch.arange(n_feat * batch, device=values.device), lengths, output_size=n_ids
            )
            # feature-major bag f * B + b  ->  batch-major row b * F + f
            row = torch.remainder(bag, batch) * n_feat + torch.div(
                bag, batch, rounding_mode="floor"
            )
            emb = self._gather(starts)  # [N, D]
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
            f"tables={_names(self.tables)}, array_size={c.array_size}, "
            f"block_size={c.block_size}, seed={c.seed}, quantization={self.quantization}, "
            f"sparse={self.sparse}"
        )


# --- combining groups with a TorchRec EBC --------------------------------------------------------


def _input_features(part: nn.Module) -> list[str]:
    seen: dict[str, None] = {}
    for cfg in part.embedding_bag_configs():
        for f in cfg.feature_names:
            seen.setdefault(f, None)
    return list(seen)


class CombinedEmbeddingBagCollection(nn.Module):
    """Several EBC-like ``parts`` behind one TorchRec ``EmbeddingBagCollection`` interface.

    Each part (a TorchRec EBC or a :class:`RobeEmbeddingBagCollection`) gets the features its
    tables read (one ``permute`` + ``split`` of the input); the pooled outputs are concatenated and
    reordered to ``feature_order`` (the output keys, usually the model's feature order).

    Args:
        parts: modules with ``embedding_bag_configs()`` and ``forward(kjt) -> KeyedTensor``; no
            input feature may belong to two parts.
        feature_order: every output key of the parts, each once, in the order wanted.

    Example::

        combined = CombinedEmbeddingBagCollection([robe, ebc], ["cat_0", "cat_1", "cat_2"])
        model.sparse_arch.embedding_bag_collection = combined
    """

    def __init__(self, parts: Sequence[nn.Module], feature_order: Sequence[str]) -> None:
        super().__init__()
        if not parts:
            raise ValueError("CombinedEmbeddingBagCollection needs at least one part")
        self.parts = nn.ModuleList(parts)
        self.feature_order = list(feature_order)
        self._part_features = [_input_features(p) for p in parts]
        owner: dict[str, int] = {}
        for i, feats in enumerate(self._part_features):
            for f in feats:
                if f in owner:
                    raise ValueError(f"feature {f!r} is read by parts {owner[f]} and {i}")
                owner[f] = i
        out_keys = [
            n
            for p in parts
            for names in get_embedding_names_by_table(p.embedding_bag_configs())
            for n in names
        ]
        if sorted(out_keys) != sorted(self.feature_order) or len(set(out_keys)) != len(out_keys):
            raise ValueError(
                f"feature_order {self.feature_order} does not list the parts' outputs {out_keys}"
            )
        self._dims = {
            n: cfg.embedding_dim
            for p in parts
            for cfg, names in zip(
                p.embedding_bag_configs(),
                get_embedding_names_by_table(p.embedding_bag_configs()),
                strict=True,
            )
            for n in names
        }
        self._split_cache: dict[tuple[str, ...], list[int] | None] = {}
        self._column_cache: dict[tuple[str, ...], torch.Tensor | None] = {}
        pos = {f: i for i, f in enumerate(self.feature_order)}
        configs = [c for p in parts for c in p.embedding_bag_configs()]
        first = get_embedding_names_by_table(configs)
        order = sorted(range(len(configs)), key=lambda i: min(pos[n] for n in first[i]))
        self._configs = [configs[i] for i in order]

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """Configs of all parts' tables, ordered by their first output in ``feature_order``."""
        return self._configs

    def is_weighted(self) -> bool:
        return any(p.is_weighted() for p in self.parts)

    def _split(self, kjt: KeyedJaggedTensor) -> list[KeyedJaggedTensor]:
        keys = tuple(kjt.keys())
        wanted = [f for feats in self._part_features for f in feats]
        if keys not in self._split_cache:
            missing = [f for f in wanted if f not in keys]
            if missing:
                raise KeyError(f"features {missing} missing from the KeyedJaggedTensor")
            perm = [keys.index(f) for f in wanted]
            self._split_cache[keys] = None if perm == list(range(len(keys))) else perm
        perm = self._split_cache[keys]
        if perm is not None:
            kjt = kjt.permute(perm)
        return kjt.split([len(f) for f in self._part_features])

    def _columns(self, kts: list[KeyedTensor]) -> torch.Tensor | None:
        keys = tuple(itertools.chain.from_iterable(kt.keys() for kt in kts))
        if keys not in self._column_cache:
            starts, col = {}, 0
            for kt in kts:
                for k, n in zip(kt.keys(), kt.length_per_key(), strict=True):
                    starts[k] = (col, n)
                    col += n
            idx = torch.cat(
                [torch.arange(s, s + n) for s, n in map(starts.get, self.feature_order)]
            )
            same = torch.equal(idx, torch.arange(col))
            self._column_cache[keys] = None if same else idx
        return self._column_cache[keys]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """``KeyedTensor`` ``[B, sum of dims]`` with keys ``feature_order``."""
        kts = [part(kjt) for part, kjt in zip(self.parts, self._split(features), strict=True)]
        values = torch.cat([kt.values() for kt in kts], dim=1)
        cols = self._columns(kts)
        if cols is not None:
            values = values.index_select(1, cols)
        return KeyedTensor(
            keys=self.feature_order,
            length_per_key=[self._dims[k] for k in self.feature_order],
            values=values,
        )


def combine_with_ebc(
    ebc: EmbeddingBagCollection, robe_parts: Sequence[RobeEmbeddingBagCollection]
) -> CombinedEmbeddingBagCollection:
    """Replace the tables of ``ebc`` held by ``robe_parts`` with those modules.

    The tables no part holds move to a new TorchRec EBC with their weights copied; output keys keep
    ``ebc``'s order. ``RecipeError`` when a part names a table ``ebc`` lacks or that does not match
    it, or a table is not sum-pooled.
    """
    configs = {c.name: c for c in ebc.embedding_bag_configs()}
    shared: set[str] = set()
    for part in robe_parts:
        for t in part.tables:
            cfg = configs.get(t.name)
            if cfg is None:
                raise RecipeError(f"table {t.name!r}: not in the model")
            if t.name in shared:
                raise RecipeError(f"table {t.name!r}: in two sharing groups")
            if table_spec_from_config(cfg) != TableSpec(
                t.name, t.num_embeddings, t.embedding_dim, t.feature_names
            ):
                raise RecipeError(f"table {t.name!r}: sharing group spec differs from the model")
            if cfg.pooling != PoolingType.SUM:
                raise RecipeError(f"table {t.name!r}: only sum pooling can be shared")
            shared.add(t.name)
    rest = [c for c in ebc.embedding_bag_configs() if c.name not in shared]
    parts: list[nn.Module] = list(robe_parts)
    if rest:
        plain = EmbeddingBagCollection(
            tables=rest, is_weighted=ebc.is_weighted(), device=ebc.device
        )
        with torch.no_grad():
            for c in rest:
                plain.embedding_bags[c.name].weight.copy_(ebc.embedding_bags[c.name].weight)
        parts.append(plain)
    order = [
        n for names in get_embedding_names_by_table(ebc.embedding_bag_configs()) for n in names
    ]
    return CombinedEmbeddingBagCollection(parts, order)
