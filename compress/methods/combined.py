"""Several EBC-like modules behind one TorchRec ``EmbeddingBagCollection`` interface.

A prepared or converted model whose tables are served by more than one module (the per-table
collection of :mod:`compress.methods.qat_embedding`, one module per sharing group, TorchRec's
quantized EBC in the TorchRec loader) holds them in a :class:`CombinedEmbeddingBagCollection`,
which stands in for ``model.sparse_arch.embedding_bag_collection``; :func:`combine_with_ebc`
builds one from an existing TorchRec EBC and group modules.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

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


def table_spec_from_config(cfg: EmbeddingBagConfig) -> TableSpec:
    """The :class:`TableSpec` of a TorchRec ``EmbeddingBagConfig`` (float32 storage)."""
    return TableSpec(
        name=cfg.name,
        num_embeddings=cfg.num_embeddings,
        embedding_dim=cfg.embedding_dim,
        feature_names=tuple(cfg.feature_names or [cfg.name]),
    )


def _input_features(part: nn.Module) -> list[str]:
    seen: dict[str, None] = {}
    for cfg in part.embedding_bag_configs():
        for f in cfg.feature_names:
            seen.setdefault(f, None)
    return list(seen)


class CombinedEmbeddingBagCollection(nn.Module):
    """Several EBC-like ``parts`` behind one TorchRec ``EmbeddingBagCollection`` interface.

    Each part (a TorchRec EBC, a per-table collection or a sharing group's module) gets the features its
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
    ebc: EmbeddingBagCollection, group_parts: Sequence[nn.Module]
) -> CombinedEmbeddingBagCollection:
    """Replace the tables of ``ebc`` held by ``group_parts`` (sharing-group modules, each with
    its ``tables``) with those modules.

    The tables no part holds move to a new TorchRec EBC with their weights copied; output keys keep
    ``ebc``'s order. ``RecipeError`` when a part names a table ``ebc`` lacks or that does not match
    it, or a table is not sum-pooled.
    """
    configs = {c.name: c for c in ebc.embedding_bag_configs()}
    shared: set[str] = set()
    for part in group_parts:
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
    parts: list[nn.Module] = list(group_parts)
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
