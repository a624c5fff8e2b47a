"""The Criteo-Kaggle-like synthetic preset (``criteo_like_config``) behind
``benchmarks/bench_quality.py``: its shapes, its determinism, Zipf ids and a label that the
feature interactions drive; and the size-aware PTQ built-ins that the benchmark measured on it
(``mixed_int2_ptq``, ``mixed_int4_ptq``)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from compress.data.synthetic import (
    CRITEO_LIKE_MULTI_HOT,
    SCALE_FLOOR_ROWS,
    bayes_auc,
    criteo_kaggle_rows,
    criteo_like_config,
    generate,
    scaled_rows,
)
from compress.io.model_spec import DLRMSpec, TableSpec
from compress.plan import make_plan
from compress.recipe.parse import load_recipe

#: A small version of the preset for generating in a test (the largest table 20k rows).
SMALL = {"largest_rows": 20_000}


def test_kaggle_rows_come_from_the_builtin_model_config():
    rows = criteo_kaggle_rows()
    assert len(rows) == 26 and max(rows) == 10_131_227 and rows[8] == 3


def test_default_preset_shapes():
    config = criteo_like_config()
    kaggle = criteo_kaggle_rows()
    rows = config.table_sizes
    assert len(rows) == 26 and max(rows) == 1_000_000
    assert rows.index(max(rows)) == kaggle.index(max(kaggle))  # the same table is the largest
    assert sum(rows) == 3_343_036
    for r, k in zip(rows, kaggle, strict=True):
        if k <= SCALE_FLOOR_ROWS:
            assert r == k  # small tables keep their Criteo size
        else:
            assert SCALE_FLOOR_ROWS <= r < k
    # the big tables keep their proportions: 8,351,593 / 10,131,227 of 1M
    assert rows[11] == round(8_351_593 * 1_000_000 / 10_131_227)
    assert config.bags == tuple(3 if i in CRITEO_LIKE_MULTI_HOT else 1 for i in range(26))
    assert config.interactions == config.num_pairs == 325  # every pair: FM-style
    assert config.num_samples == 1_500_000 and config.num_dense == 13


def test_scaled_rows():
    assert scaled_rows((10, 5_000, 40_000, 100_000), 10_000) == (10, 2_000, 4_000, 10_000)
    assert scaled_rows((3, 50), 10, floor=5) == (3, 10)
    with pytest.raises(ValueError):
        scaled_rows((10,), 0)


def _arrays(ds):
    return [ds.dense, ds.labels, *ds.values.values(), *ds.offsets.values()]


def test_preset_is_deterministic_and_seeded():
    a = generate(criteo_like_config(3_000, seed=1, **SMALL))
    b = generate(criteo_like_config(3_000, seed=1, **SMALL))
    c = generate(criteo_like_config(3_000, seed=2, **SMALL))
    assert all(np.array_equal(x, y) for x, y in zip(_arrays(a), _arrays(b), strict=True))
    assert not np.array_equal(a.labels, c.labels) or not np.array_equal(a.dense, c.dense)
    assert len(a) == 3_000 and len(a.values) == 26
    small = criteo_like_config(**SMALL)
    for i, (f, rows) in enumerate(zip(small.feature_names, small.table_sizes, strict=True)):
        v = a.values[f]
        assert v.min() >= 0 and v.max() < rows
        lengths = a.lengths(f)
        if i in CRITEO_LIKE_MULTI_HOT:
            assert lengths.min() == 1 and lengths.max() == 3
        else:
            assert (lengths == 1).all()


def test_ids_are_zipf_and_the_label_is_interaction_driven():
    config = criteo_like_config(20_000, seed=0, **SMALL)
    ds = generate(config)
    largest = config.feature_names[int(np.argmax(config.table_sizes))]
    counts = np.sort(np.bincount(ds.values[largest]))[::-1]
    top = counts[: max(config.table_sizes) // 100].sum() / counts.sum()
    assert top > 0.5  # the hottest 1% of the rows serve more than half the lookups
    full = bayes_auc(ds)
    without = bayes_auc(generate(replace(config, interaction_weight=0.0)))
    only = bayes_auc(generate(replace(config, id_effect=0.0, dense_weight=0.0)))
    assert 0.76 < full < 0.84
    assert full - without > 0.05  # the interactions carry most of the signal ...
    assert only > without  # ... more than the per-id effects and dense features together
    assert 0.2 < ds.labels.mean() < 0.4


def _preset_spec() -> DLRMSpec:
    """The model ``bench_quality.py`` trains on the preset (``benchmarks/synthetic_case.py``)."""
    config = criteo_like_config()
    tables = tuple(
        TableSpec(name=f"t_cat_{i}", num_embeddings=r, embedding_dim=16, feature_names=(f,))
        for i, (r, f) in enumerate(zip(config.table_sizes, config.feature_names, strict=True))
    )
    return DLRMSpec("DLRM", tables, 13, (128, 64, 16), (128, 64, 1))


@pytest.mark.parametrize(
    ("recipe", "tiers", "ratio"),
    [
        # (min rows, bits) from the largest tier down; the first tier that a table reaches wins
        ("mixed_int2_ptq", ((10_000, 2), (100, 4), (0, 8)), (7.9, 8.0)),
        ("mixed_int4_ptq", ((10_000, 4), (0, 8)), (5.25, 5.33)),
    ],
)
def test_size_aware_ptq_builtins_on_the_preset(recipe, tiers, ratio):
    """INT2 (INT4) only where the bytes are: small, hot tables and the MLP at higher precision,
    for about 1% of the size of INT2 (INT4) everywhere."""
    plan = make_plan(load_recipe(recipe), _preset_spec())
    for t in plan.tables:
        bits = next(b for lo, b in tiers if t.rows >= lo)
        assert (t.method, t.granularity, t.bits) == ("ptq", "row", bits), t.name
    assert plan.mlp.bits == 8 and not plan.needs_finetune
    assert ratio[0] < plan.ratio < ratio[1]
