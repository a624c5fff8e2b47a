"""Synthetic generator: determinism, Zipf skew, bag lengths, and the planted signal."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from compress.data import synthetic
from compress.data.dataset import Dataset
from compress.data.synthetic import (
    SyntheticConfig,
    bayes_auc,
    demo_synthetic_config,
    generate,
    make_world,
    popularity_scale,
    zipf_cdf,
)
from compress.errors import DataError
from compress.train.metrics import auc

SMALL = SyntheticConfig(
    table_sizes=(10, 500, 5000), bag_sizes=(1, 4, 1), num_dense=3, num_samples=20_000, seed=7
)


@pytest.fixture(scope="module")
def small() -> Dataset:
    return generate(SMALL)


def arrays(ds: Dataset) -> list[np.ndarray]:
    """The randomly drawn arrays (one-hot offsets are always 0..N)."""
    return [ds.dense, ds.labels, ds.click_prob, ds.offsets["cat_1"]] + list(ds.values.values())


def test_same_seed_gives_identical_arrays(small):
    again = generate(SMALL)
    assert again.equals(small)
    assert small.feature_names == ("cat_0", "cat_1", "cat_2")
    assert small.dense.dtype == np.float32 and small.labels.dtype == np.float32
    assert small.click_prob.dtype == np.float64


def test_different_seeds_differ(small):
    other = generate(replace(SMALL, seed=8))
    assert all(not np.array_equal(a, b) for a, b in zip(arrays(small), arrays(other), strict=True))


def test_world_does_not_depend_on_sample_count():
    a, b = make_world(SMALL), make_world(replace(SMALL, num_samples=10))
    np.testing.assert_array_equal(a.tables[2].effect, b.tables[2].effect)
    np.testing.assert_array_equal(a.dense_weights, b.dense_weights)
    assert a.pairs == b.pairs


def test_ids_are_zipf_skewed_and_permuted(small):
    counts = np.bincount(small.values["cat_2"], minlength=5000)
    top = np.sort(counts)[::-1]
    cdf = zipf_cdf(5000, SMALL.zipf_exponent)
    assert top[:50].sum() / counts.sum() == pytest.approx(cdf[49], abs=0.02)  # ~0.5 of the mass
    assert top[:50].sum() > 0.4 * counts.sum()
    assert top[0] > 20 * np.median(counts)
    hottest = make_world(SMALL).tables[2].rank_to_id[0]
    assert counts.argmax() == hottest != 0
    assert small.values["cat_2"].max() < 5000 and small.values["cat_0"].max() < 10


def test_zipf_cdf_and_popularity_scale():
    cdf = zipf_cdf(4, 1.0)
    np.testing.assert_allclose(
        np.diff(cdf, prepend=0), np.array([1, 1 / 2, 1 / 3, 1 / 4]) / (25 / 12)
    )
    assert cdf[-1] == 1.0
    np.testing.assert_allclose(popularity_scale(np.array([0, 20, 60]), 20.0, 1.0), [1, 0.5, 0.25])


def test_multi_hot_lengths(small):
    lengths = small.lengths("cat_1")
    assert lengths.min() == 1 and lengths.max() == 4
    assert set(np.unique(lengths)) == {1, 2, 3, 4}
    assert (small.lengths("cat_0") == 1).all()
    fixed = generate(replace(SMALL, random_bag_lengths=False, num_samples=100))
    assert (fixed.lengths("cat_1") == 4).all() and fixed.values["cat_1"].size == 400


def test_bayes_auc_is_informative_and_equals_metrics_auc(small):
    value = bayes_auc(small)
    assert 0.65 < value < 0.95
    assert value == auc(small.click_prob, small.labels)
    assert 0.1 < small.labels.mean() < 0.5
    # labels follow click_prob: calibration within a few points per probability bin
    bins = np.digitize(small.click_prob, [0.2, 0.4, 0.6])
    for b in range(4):
        sel = bins == b
        if sel.sum() > 1000:
            assert abs(small.labels[sel].mean() - small.click_prob[sel].mean()) < 0.03


def test_signal_strength_follows_the_config():
    weak = generate(replace(SMALL, id_effect=0.0, interaction_weight=0.0, dense_weight=0.0))
    assert bayes_auc(weak) == pytest.approx(0.5, abs=0.03)
    dense_only = generate(replace(SMALL, id_effect=0.0, interaction_weight=0.0, dense_weight=2.0))
    assert bayes_auc(dense_only) > 0.6
    no_pairs = generate(replace(SMALL, interaction_weight=0.0))
    assert 0.55 < bayes_auc(no_pairs) < bayes_auc(generate(SMALL))


def test_bayes_auc_needs_click_prob(small):
    with pytest.raises(DataError, match="click_prob"):
        bayes_auc(Dataset(dense=small.dense[:2], labels=small.labels[:2], values={}, offsets={}))


def test_config_validation():
    with pytest.raises(ValueError):
        SyntheticConfig(table_sizes=(10, 0), num_samples=5)
    with pytest.raises(ValueError):
        SyntheticConfig(table_sizes=(10, 5), bag_sizes=(1,), num_samples=5)
    with pytest.raises(ValueError):
        SyntheticConfig(table_sizes=(10, 5), num_samples=5, num_interactions=2)
    assert SyntheticConfig(table_sizes=(10, 5), num_samples=5).interactions == 1


def test_demo_config_is_sized_for_the_demo():
    cfg = demo_synthetic_config()
    assert 6 <= len(cfg.table_sizes) <= 8
    assert min(cfg.table_sizes) < 100 and max(cfg.table_sizes) >= 50_000
    assert cfg.num_dense == 13 and cfg.num_samples >= 300_000


def test_demo_config_at_scale_keeps_its_planted_signal():
    ds = generate(replace(demo_synthetic_config(), num_samples=200_000))
    assert len(ds) == 200_000
    assert 0.72 < bayes_auc(ds) < 0.88


def test_chunked_logits_equal_one_pass(monkeypatch):
    """Generation computes the logits in chunks (bounded memory at any sample count); chunk
    boundaries, multi-hot bags across them included, change no value."""
    cfg = replace(SMALL, num_samples=5_000)
    whole = generate(cfg)
    monkeypatch.setattr(synthetic, "_CHUNK", 777)  # many chunks, boundaries inside multi-hot bags
    chunked = generate(cfg)
    assert chunked.equals(whole)
    assert np.array_equal(chunked.click_prob, whole.click_prob)
