"""Dataset: gathering, slicing, batching into KJTs, the .npz format, and open_dataset on .npz."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
from helpers import data_spec
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compress.data.dataset import Dataset, concat_datasets
from compress.data.formats import detect_format, open_dataset
from compress.data.npz import load_npz, save_npz
from compress.errors import DataError
from compress.io.model_spec import DLRMSpec

# Sample i owns bags: a -> A_BAGS[i], b -> [10 + i]
A_BAGS = [[1, 2], [], [3], [4, 5, 6], [7]]


def small(click_prob: bool = False) -> Dataset:
    n = len(A_BAGS)
    a_off = np.cumsum([0] + [len(b) for b in A_BAGS])
    return Dataset(
        dense=np.arange(n * 2, dtype=np.float32).reshape(n, 2),
        labels=np.array([0, 1, 0, 1, 1], dtype=np.float32),
        values={
            "a": np.concatenate([np.array(b, np.int64) for b in A_BAGS]),
            "b": np.arange(10, 15),
        },
        offsets={"a": a_off, "b": np.arange(n + 1)},
        click_prob=np.linspace(0.1, 0.9, n) if click_prob else None,
    )


def bags(ds: Dataset, f: str) -> list[list[int]]:
    off = ds.offsets[f]
    return [ds.values[f][off[i] : off[i + 1]].tolist() for i in range(len(ds))]


def test_constructor_converts_dtypes_and_checks_offsets():
    ds = small()
    assert ds.values["b"].dtype == np.int64 and ds.offsets["a"].dtype == np.int64
    assert ds.feature_names == ("a", "b") and len(ds) == 5 and ds.num_dense == 2
    with pytest.raises(ValueError, match="offsets"):
        Dataset(
            dense=np.zeros((2, 1)),
            labels=np.zeros(2),
            values={"a": np.arange(3)},
            offsets={"a": np.array([0, 2, 1])},
        )
    with pytest.raises(ValueError, match="integer"):
        Dataset(
            dense=np.zeros((1, 1)),
            labels=np.zeros(1),
            values={"a": np.array([1.5])},
            offsets={"a": np.array([0, 1])},
        )
    with pytest.raises(ValueError, match="negative"):
        Dataset(
            dense=np.zeros((1, 1)),
            labels=np.zeros(1),
            values={"a": np.array([-1])},
            offsets={"a": np.array([0, 1])},
        )


def test_take_gathers_jagged_bags_in_any_order():
    idx = [3, 1, 3, 0]
    part = small(click_prob=True).take(idx)
    assert bags(part, "a") == [A_BAGS[i] for i in idx]
    assert bags(part, "b") == [[10 + i] for i in idx]
    np.testing.assert_array_equal(part.dense, small().dense[idx])
    np.testing.assert_array_equal(part.click_prob, small(True).click_prob[idx])
    with pytest.raises(IndexError):
        small().take([5])
    with pytest.raises(TypeError):
        small().take(np.ones(5, dtype=bool))
    assert len(small().take([])) == 0


def test_slice_shares_memory_and_rebases_offsets():
    ds = small()
    part = ds.slice(1, 4)
    assert bags(part, "a") == A_BAGS[1:4]
    assert part.offsets["a"][0] == 0
    assert np.shares_memory(part.values["a"], ds.values["a"])
    assert len(ds.slice(3, 99)) == 2 and len(ds.slice(4, 2)) == 0


def test_split_tail_holds_out_the_last_samples():
    train, valid = small().split_tail(0.4)
    assert len(train) == 3 and len(valid) == 2
    assert bags(valid, "a") == A_BAGS[3:]
    with pytest.raises(ValueError):
        small().split_tail(1.0)
    with pytest.raises(DataError, match="cannot hold out"):
        small().split_tail(0.01)


def test_batches_in_order_follow_feature_order():
    ds = small()
    batches = list(ds.batches(2, feature_names=("b", "a")))
    assert [len(b) for b in batches] == [2, 2, 1]
    first = batches[0]
    assert first.sparse.keys() == ["b", "a"]
    assert first.sparse.values().dtype == torch.int64
    assert first.dense.dtype == torch.float32 and first.labels.dtype == torch.float32
    assert first.sparse["b"].values().tolist() == [10, 11]
    assert first.sparse["a"].lengths().tolist() == [2, 0]
    assert first.sparse["a"].values().tolist() == [1, 2]
    assert [len(b) for b in ds.batches(2, feature_names=("a",), drop_last=True)] == [2, 2]
    assert ds.num_batches(2) == 3 and ds.num_batches(2, drop_last=True) == 2
    first.dense += 100  # batches own their memory
    first.labels += 100
    assert ds.dense.max() < 100 and ds.labels.max() <= 1


def test_batch_kjt_matches_from_lengths_sync():
    batch = small().to_batch(("a", "b"))
    ref = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b"], values=batch.sparse.values(), lengths=batch.sparse.lengths()
    )
    assert batch.sparse.length_per_key() == ref.length_per_key() == [7, 5]
    assert batch.sparse.offset_per_key() == ref.offset_per_key()
    assert batch.sparse.stride() == 5


def test_shuffled_batches_are_seeded_permutations():
    ds = small()
    order = [
        b.sparse["b"].values().tolist()
        for b in ds.batches(2, feature_names=("b",), shuffle=True, seed=3)
    ]
    again = [
        b.sparse["b"].values().tolist()
        for b in ds.batches(2, feature_names=("b",), shuffle=True, seed=3)
    ]
    assert order == again
    assert sorted(sum(order, [])) == [10, 11, 12, 13, 14]
    seen = {
        tuple(
            sum(
                (
                    b.sparse["b"].values().tolist()
                    for b in ds.batches(5, feature_names=("b",), shuffle=True, seed=s)
                ),
                [],
            )
        )
        for s in range(6)
    }
    assert len(seen) > 1


def test_missing_feature_is_a_data_error():
    with pytest.raises(DataError, match="'c'"):
        next(small().batches(2, feature_names=("a", "c")))


def test_batch_feeds_a_torchrec_dlrm():
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name=f"t_{f}", embedding_dim=4, num_embeddings=16, feature_names=[f])
            for f in ("a", "b")
        ]
    )
    model = DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=2,
        dense_arch_layer_sizes=[8, 4],
        over_arch_layer_sizes=[4, 1],
    )
    batch = next(small().batches(4, feature_names=("a", "b")))
    assert model(batch.dense, batch.sparse).shape == (4, 1)


def test_shuffled_2048_batches_of_26_features_hold_each_sample_once():
    # sample i: dense[i, 0] = i, label i % 2, feature k holds the one id (i * 7 + k) % 1000
    n, feats = 20_000, [f"cat_{k}" for k in range(26)]
    ids = np.arange(n)
    ds = Dataset(
        dense=np.stack([ids, -ids], axis=1).astype(np.float32),
        labels=(ids % 2).astype(np.float32),
        values={f: (ids * 7 + k) % 1000 for k, f in enumerate(feats)},
        offsets={f: np.arange(n + 1) for f in feats},
    )
    batches = list(ds.batches(2048, feature_names=feats, shuffle=True, seed=5))
    assert [len(b) for b in batches] == [2048] * 9 + [n - 9 * 2048]
    seen = np.concatenate([b.dense[:, 0].numpy() for b in batches]).astype(np.int64)
    assert np.array_equal(seen, np.random.default_rng(5).permutation(n))  # each sample once
    for b in batches:
        rows = b.dense[:, 0].to(torch.int64)
        assert torch.equal(b.dense[:, 1], -b.dense[:, 0])
        assert torch.equal(b.labels, (rows % 2).float())
        assert b.sparse.keys() == feats
        jagged = b.sparse.to_dict()
        for k, f in enumerate(feats):
            assert torch.equal(jagged[f].lengths(), torch.ones(len(b), dtype=torch.int64))
            assert torch.equal(jagged[f].values(), (rows * 7 + k) % 1000)


def test_concat_rebases_offsets():
    ds = small(click_prob=True)
    joined = concat_datasets([ds.slice(0, 2), ds.slice(2, 5)])
    assert joined.equals(ds)


def test_npz_round_trip_is_exact(tmp_path):
    for click_prob in (False, True):
        ds = small(click_prob)
        path = tmp_path / "data.bin"  # the exact path is used, no suffix appended
        save_npz(ds, path)
        back = load_npz(path)
        assert back.equals(ds) and back.feature_names == ("a", "b")
        assert (back.click_prob is None) == (not click_prob)
        assert detect_format(path) == "npz"  # recognised by the zip signature, not the suffix
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(z["meta"].item())
    assert meta == {"format": "dqrm-compress-dataset", "version": 1, "feature_names": ["a", "b"]}


def _rewrite(src, dst, change) -> None:
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    change(arrays)
    with open(dst, "wb") as fh:
        np.savez(fh, **arrays)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.pop("offsets/b"), "missing key 'offsets/b'"),
        (lambda a: a.update({"extra": np.zeros(1)}), "unexpected key 'extra'"),
        (lambda a: a.update({"dense": a["dense"].astype(np.float64)}), "'dense' has dtype float64"),
        (
            lambda a: a.update(
                {
                    "meta": np.array(
                        json.dumps(
                            {
                                "format": "dqrm-compress-dataset",
                                "version": 9,
                                "feature_names": ["a", "b"],
                            }
                        )
                    )
                }
            ),
            "newer",
        ),
        (lambda a: a.update({"offsets/a": a["offsets/a"][:-1]}), "offsets"),
        (lambda a: a.update({"labels": np.array([None] * 5, dtype=object)}), "'labels'"),
    ],
)
def test_load_npz_rejects_malformed_files(tmp_path, change, message):
    good, bad = tmp_path / "good.npz", tmp_path / "bad.npz"
    save_npz(small(), good)
    _rewrite(good, bad, change)
    with pytest.raises(DataError, match=message) as err:
        load_npz(bad)
    assert str(bad) in str(err.value)


def test_load_npz_rejects_non_archives(tmp_path):
    path = tmp_path / "x.npz"
    path.write_text("not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_npz(path)
    with zipfile.ZipFile(tmp_path / "empty.npz", "w"):
        pass
    with pytest.raises(DataError, match="no 'meta'"):
        load_npz(tmp_path / "empty.npz")


def spec_for(features: dict[str, int], dense: int = 2) -> DLRMSpec:
    return data_spec(features, dense)


def test_open_dataset_npz_selects_spec_features_in_spec_order(tmp_path):
    path = tmp_path / "d.npz"
    save_npz(small(), path)
    assert detect_format(path) == "npz"
    ds = open_dataset(path, spec_for({"b": 20}))
    assert ds.feature_names == ("b",) and len(ds) == 5
    ds = open_dataset(path, spec_for({"b": 20, "a": 8}))
    assert ds.feature_names == ("b", "a")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (spec_for({"a": 8, "b": 14}), "row id 14"),
        (spec_for({"a": 8, "c": 20}), "no sparse feature 'c'"),
        (spec_for({"a": 8, "b": 20}, dense=3), "2 dense features"),
    ],
)
def test_open_dataset_npz_checks_fit(tmp_path, spec, message):
    path = tmp_path / "d.npz"
    save_npz(small(), path)
    with pytest.raises(DataError, match=message):
        open_dataset(path, spec)


def test_open_dataset_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        open_dataset(tmp_path / "nope.tsv", spec_for({"a": 8}))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden").write_text("x")
    with pytest.raises(DataError, match="no data files"):
        open_dataset(tmp_path / "empty", spec_for({"a": 8}))
