"""Seeded click data with a planted signal, so the best reachable AUC is known.

The generator draws a *world* (per-id parameters) and then samples from it:

- Each table ``t`` has ``table_sizes[t]`` rows and one feature ``cat_t`` that looks it up. Ids follow
  a Zipf law over popularity ranks, ``P(rank r) ~ (r + 1) ** -zipf_exponent``, drawn by inverse CDF;
  a fixed random permutation per table maps ranks to ids, so id 0 is not always the hottest.
- Every id has a scalar effect ``N(0, id_effect**2)`` and a latent vector of ``latent_dim`` normal
  values of variance ``1/sqrt(latent_dim)`` (so a dot product of two has unit variance). Both shrink with the
  id's popularity rank by ``(1 + rank / tail_rank) ** -tail_decay``: rare ids, which a model sees
  too seldom to learn, carry little signal.
- A bag holds ``bag_sizes[t]`` ids (1 = one-hot), or a uniform ``1..bag_sizes[t]`` of them with
  ``random_bag_lengths``. A bag's effect and latent vector are the means over its ids.
- Dense features are ``N(0, 1)``; their weights make a linear term of standard deviation
  ``dense_weight``.
- ``logit = bias + dense @ w + sum_t effect_t + sum_{(s, t) in pairs} c_st * <z_s, z_t>`` over
  ``num_interactions`` (default ``min(4, number of pairs)``) random feature pairs with weights
  ``c = +-interaction_weight``: the kind of signal a DLRM's dot interaction can learn.
  ``label ~ Bernoulli(sigmoid(logit))``.

The result is a :class:`~compress.data.dataset.Dataset` with ``click_prob = sigmoid(logit)``;
:func:`bayes_auc` is the AUC of that true probability, the ceiling for any model. The same config
(seed included) gives identical arrays. Example::

    ds = generate(SyntheticConfig(table_sizes=(100, 1000), num_samples=10_000, seed=1))
    bayes_auc(ds)  # about 0.73

Presets: :func:`demo_synthetic_config` (the demo's 7 tables) and :func:`criteo_like_config` (the 26
Criteo Kaggle tables scaled so the largest has about 1M rows, a label driven by the latent
interactions of every feature pair, as a factorization machine's).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np

from compress.data.dataset import Dataset
from compress.errors import DataError
from compress.train.metrics import auc

# Stream tags: each purpose draws from its own seed sequence, so changing one part of a config
# (sample count, one table) leaves the other parts' random numbers unchanged.
_WORLD, _IDS, _DENSE, _LABELS = 0, 1, 2, 3
_CHUNK = 1 << 16


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of :func:`generate` (see the module docstring for the model they define)."""

    table_sizes: tuple[int, ...]
    num_samples: int
    bag_sizes: tuple[int, ...] | None = None
    random_bag_lengths: bool = True
    num_dense: int = 13
    seed: int = 0
    latent_dim: int = 4
    zipf_exponent: float = 1.1
    bias: float = -1.5
    dense_weight: float = 0.6
    id_effect: float = 0.8
    tail_rank: float = 20.0
    tail_decay: float = 1.0
    num_interactions: int | None = None
    interaction_weight: float = 0.5
    feature_prefix: str = "cat_"

    def __post_init__(self) -> None:
        if not self.table_sizes or min(self.table_sizes) < 1:
            raise ValueError("table_sizes needs at least one table of at least one row")
        if self.bag_sizes is not None and (
            len(self.bag_sizes) != len(self.table_sizes) or min(self.bag_sizes) < 1
        ):
            raise ValueError("bag_sizes needs one positive bag size per table")
        if self.num_samples < 1 or self.num_dense < 0 or self.latent_dim < 1:
            raise ValueError("num_samples and latent_dim must be positive, num_dense >= 0")
        if self.zipf_exponent <= 0 or self.tail_rank <= 0 or self.tail_decay < 0:
            raise ValueError("zipf_exponent and tail_rank must be positive, tail_decay >= 0")
        if self.num_interactions is not None and not 0 <= self.num_interactions <= self.num_pairs:
            raise ValueError(f"num_interactions must be in [0, {self.num_pairs}]")

    @property
    def num_pairs(self) -> int:
        """Number of feature pairs."""
        return len(self.table_sizes) * (len(self.table_sizes) - 1) // 2

    @property
    def interactions(self) -> int:
        """``num_interactions``, or ``min(4, num_pairs)`` when it is None."""
        return min(4, self.num_pairs) if self.num_interactions is None else self.num_interactions

    @property
    def feature_names(self) -> tuple[str, ...]:
        """``cat_0``, ``cat_1``, ... one per table (TorchRec's Criteo naming)."""
        return tuple(f"{self.feature_prefix}{t}" for t in range(len(self.table_sizes)))

    @property
    def bags(self) -> tuple[int, ...]:
        """Maximum bag size per feature (1 where ``bag_sizes`` is None)."""
        return self.bag_sizes or (1,) * len(self.table_sizes)


@dataclass(frozen=True)
class TableWorld:
    """Per-id parameters of one table: ``rank_to_id`` permutation, Zipf ``cdf`` over ranks, and per
    id (indexed by id) ``effect`` [n] and ``latent`` [n, latent_dim]."""

    rank_to_id: np.ndarray
    cdf: np.ndarray
    effect: np.ndarray
    latent: np.ndarray


@dataclass(frozen=True)
class SyntheticWorld:
    """Everything :func:`generate` draws before sampling: tables, dense weights, interactions."""

    tables: tuple[TableWorld, ...]
    dense_weights: np.ndarray
    pairs: tuple[tuple[int, int], ...]
    pair_weights: np.ndarray


def demo_synthetic_config(seed: int = 0) -> SyntheticConfig:
    """Defaults for the built-in demo: 7 tables of 20 to 100,000 rows (one multi-hot of 1-3 ids),
    13 dense features, 1,500,000 samples; ``split_tail(0.2)`` gives 1.2M train / 300k valid.

    Bayes AUC is about 0.82. A TorchRec ``DLRM`` (dim 16, bottom 13-64-16, top 64-32-1, sum pooling)
    trained for one epoch in FP32 with Adagrad (lr 0.02-0.05) or Adam (lr 0.01), batch 1024-2048,
    reached valid AUC 0.809-0.816, 0.010-0.014 below the Bayes AUC (seeds 0 and 1), in 6-50 s on 2
    shared CPU cores. Fewer samples widen the gap (750k train: 0.012-0.013; 300k: 0.017-0.02), and a
    second epoch overfits (valid AUC drops by about 0.015, the usual one-epoch behaviour of
    embedding models), so train one epoch or keep the best checkpoint.
    """
    return SyntheticConfig(
        table_sizes=(20, 300, 2_000, 10_000, 30_000, 100_000, 100_000),
        bag_sizes=(1, 1, 3, 1, 1, 1, 1),
        random_bag_lengths=True,
        num_dense=13,
        num_samples=1_500_000,
        seed=seed,
    )


#: Tables of :func:`criteo_like_config` read bags of 1-3 ids (the two largest Criteo tables).
CRITEO_LIKE_MULTI_HOT = (2, 11)
#: Tables of at most this many rows keep their Criteo size in :func:`scaled_rows`; larger ones are
#: scaled, but never below it.
SCALE_FLOOR_ROWS = 2_000


def criteo_kaggle_rows() -> tuple[int, ...]:
    """Rows of the 26 Criteo Kaggle tables (facebookresearch/dlrm's preprocessing), as the
    built-in model config ``criteo_kaggle_dlrm`` states them."""
    from compress.io.model_config import read_config_spec

    return tuple(t.num_embeddings for t in read_config_spec("criteo_kaggle_dlrm").tables)


def scaled_rows(
    rows: tuple[int, ...], largest: int, floor: int = SCALE_FLOOR_ROWS
) -> tuple[int, ...]:
    """``rows`` scaled by ``largest / max(rows)``: a table of at most ``floor`` rows is kept as it
    is, a larger one becomes ``max(floor, round(r * largest / max(rows)))`` (so the largest has
    ``largest`` rows and mid-size tables do not shrink into tiny ones)."""
    if largest < 1 or floor < 1:
        raise ValueError("largest and floor must be positive")
    factor = largest / max(rows)
    return tuple(r if r <= floor else max(floor, round(r * factor)) for r in rows)


def criteo_like_config(
    num_samples: int = 1_500_000, largest_rows: int = 1_000_000, seed: int = 0
) -> SyntheticConfig:
    """A Criteo-Kaggle-like case: the 26 Kaggle cardinalities scaled so the largest table has
    ``largest_rows`` rows (:func:`scaled_rows`; 3.35M rows in all at the default 1M), Zipf ids
    (exponent 1.1) whose signal fades along the popularity ranks, two multi-hot features
    (:data:`CRITEO_LIKE_MULTI_HOT`), 13 dense features, and a hidden label driven by interactions:
    small per-id effects plus the latent dot products of *every* feature pair (325), each weighted
    +-0.14 (a factorization machine's second-order term, which a DLRM's dot interaction can
    learn); a positive rate of about 0.30.

    Bayes AUC about 0.798 (measured on 200k samples), of which the interactions alone give 0.776
    and the per-id effects and dense features alone 0.676. At the defaults (1.5M samples,
    ``split_tail(0.2)`` for 1.2M train / 300k valid) ``benchmarks/bench_quality.py`` trains an
    FP32 DLRM on it and measures every built-in recipe against it.
    """
    rows = scaled_rows(criteo_kaggle_rows(), largest_rows)
    return SyntheticConfig(
        table_sizes=rows,
        num_samples=num_samples,
        bag_sizes=tuple(3 if i in CRITEO_LIKE_MULTI_HOT else 1 for i in range(len(rows))),
        seed=seed,
        bias=-1.2,
        id_effect=0.1,
        num_interactions=len(rows) * (len(rows) - 1) // 2,
        interaction_weight=0.14,
    )


def generate(config: SyntheticConfig) -> Dataset:
    """Draw ``config.num_samples`` samples (see the module docstring); deterministic in ``config``."""
    world = make_world(config)
    n = config.num_samples
    one_hot = np.arange(n + 1, dtype=np.int64)  # shared by every one-id-per-bag feature
    values, offsets = {}, {}
    for t, (table, bag) in enumerate(zip(world.tables, config.bags, strict=True)):
        rng = _rng(config.seed, _IDS, t)
        if bag == 1:
            offs = one_hot
        else:
            offs = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(_bag_lengths(rng, n, bag, config.random_bag_lengths), out=offs[1:])
        name = config.feature_names[t]
        values[name] = table.rank_to_id[_zipf_ranks(rng, table.cdf, int(offs[-1]))]
        offsets[name] = offs
    dense = _rng(config.seed, _DENSE).standard_normal((n, config.num_dense), dtype=np.float32)
    bags = [(values[f], offsets[f]) for f in config.feature_names]
    logit = np.empty(n, dtype=np.float64)
    for start in range(0, n, _CHUNK):  # chunks bound the memory of the per-bag latent vectors
        stop = min(n, start + _CHUNK)
        logit[start:stop] = true_logits(world, config, dense[start:stop], bags, start, stop)
    prob = 1.0 / (1.0 + np.exp(-logit))
    labels = (_rng(config.seed, _LABELS).random(n) < prob).astype(np.float32)
    return Dataset(
        dense=dense,
        labels=labels,
        values=values,
        offsets=offsets,
        click_prob=prob,
        dense_transform="none",  # drawn as model inputs: no transform made them
    )


def true_logits(
    world: SyntheticWorld,
    config: SyntheticConfig,
    dense: np.ndarray,
    bags: list[tuple[np.ndarray, np.ndarray]],
    start: int,
    stop: int,
) -> np.ndarray:
    """The planted logit of samples ``start..stop-1``: ``dense`` holds their rows, ``bags`` the
    full ``(values, offsets)`` of every feature."""
    effects, latents = [], []
    for table, (values, offsets) in zip(world.tables, bags, strict=True):
        off = offsets[start : stop + 1]
        ids = values[off[0] : off[-1]]
        local = off - off[0]
        lengths = np.diff(local)
        effects.append(_bag_mean(table.effect[ids], local, lengths))
        latents.append(_bag_mean(table.latent[ids], local, lengths))
    logit = config.bias + dense.astype(np.float64) @ world.dense_weights + np.sum(effects, axis=0)
    for (s, t), c in zip(world.pairs, world.pair_weights, strict=True):
        logit += c * np.einsum("ij,ij->i", latents[s], latents[t])
    return logit


def make_world(config: SyntheticConfig) -> SyntheticWorld:
    """The per-id parameters, dense weights and interaction pairs of ``config`` (depends only on
    the seed and the table/feature settings, not on ``num_samples``)."""
    tables = tuple(_make_table(config, t, rows) for t, rows in enumerate(config.table_sizes))
    rng = _rng(config.seed, _WORLD)
    w = (
        rng.standard_normal(config.num_dense)
        * config.dense_weight
        / np.sqrt(max(1, config.num_dense))
    )
    all_pairs = list(combinations(range(len(config.table_sizes)), 2))
    chosen = rng.choice(len(all_pairs), size=config.interactions, replace=False)
    signs = rng.choice([-1.0, 1.0], size=config.interactions)
    return SyntheticWorld(
        tables=tables,
        dense_weights=w,
        pairs=tuple(all_pairs[i] for i in sorted(chosen)),
        pair_weights=signs * config.interaction_weight,
    )


def zipf_cdf(num_rows: int, exponent: float) -> np.ndarray:
    """CDF over popularity ranks ``0..num_rows-1`` with ``P(r) ~ (r + 1) ** -exponent``."""
    weights = np.arange(1, num_rows + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    cdf[-1] = 1.0
    return cdf


def popularity_scale(ranks: np.ndarray, tail_rank: float, tail_decay: float) -> np.ndarray:
    """Signal strength of ids at popularity ``ranks``: ``(1 + rank / tail_rank) ** -tail_decay``."""
    return (1.0 + ranks / tail_rank) ** -tail_decay


def bayes_auc(dataset: Dataset) -> float:
    """AUC of the true click probability against the labels: the best AUC any model can expect."""
    if dataset.click_prob is None:
        raise DataError(
            "dataset has no click_prob (only generated data knows the true probability)"
        )
    return auc(dataset.click_prob, dataset.labels)


def _rng(seed: int, *tags: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *tags]))


def _make_table(config: SyntheticConfig, t: int, rows: int) -> TableWorld:
    rng = _rng(config.seed, _WORLD, t + 1)
    rank_to_id = rng.permutation(rows)
    id_rank = np.empty(rows, dtype=np.int64)
    id_rank[rank_to_id] = np.arange(rows)
    scale = popularity_scale(id_rank, config.tail_rank, config.tail_decay)
    effect = rng.standard_normal(rows) * config.id_effect * scale
    latent_std = config.latent_dim**-0.25
    latent = rng.standard_normal((rows, config.latent_dim)) * (latent_std * scale)[:, None]
    return TableWorld(
        rank_to_id=rank_to_id,
        cdf=zipf_cdf(rows, config.zipf_exponent),
        effect=effect,
        latent=latent,
    )


def _zipf_ranks(rng: np.random.Generator, cdf: np.ndarray, size: int) -> np.ndarray:
    ranks = np.searchsorted(cdf, rng.random(size), side="right")
    return np.minimum(ranks, cdf.size - 1)


def _bag_lengths(rng: np.random.Generator, n: int, bag: int, random_lengths: bool) -> np.ndarray:
    if bag == 1 or not random_lengths:
        return np.full(n, bag, dtype=np.int64)
    return rng.integers(1, bag + 1, size=n, dtype=np.int64)


def _bag_mean(per_id: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Mean of ``per_id`` rows over each bag (bags are never empty)."""
    if per_id.shape[0] == lengths.shape[0]:  # as many ids as bags: every bag holds one id
        return per_id
    sums = np.add.reduceat(per_id, offsets[:-1], axis=0)
    return sums / (lengths if per_id.ndim == 1 else lengths[:, None])
