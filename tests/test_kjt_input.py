"""In-process TorchRec batches as data (compress.data.batch_source): the same rows as a file,
fine-tuning from them streamed, TorchRec's own Batch, keys checked against the model, and errors
that name the batch and the feature."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_world
from torchrec.datasets.utils import Batch as TorchRecBatch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compress import pipeline
from compress.data.batch_source import BATCHES_NAME
from compress.data.batches import Batch
from compress.data.dataset import Dataset
from compress.data.npz import load_npz
from compress.data.stream import LoaderSettings, StreamedData, open_data
from compress.errors import DataError

STREAM = LoaderSettings(stream="on", shuffle_rows=1000)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    ckpt, train, valid, _ = tiny_world(tmp_path_factory.mktemp("kjt"))
    job = pipeline.load(ckpt)
    names = job.spec.feature_names
    return {
        "ckpt": ckpt,
        "job": job,
        "train": load_npz(train).select_features(names),
        "valid": load_npz(valid).select_features(names),
        "train_path": train,
        "valid_path": valid,
    }


def as_batches(ds, size: int, names) -> list[Batch]:
    return list(ds.batches(size, feature_names=names))


def rows_of(ds: Dataset) -> Dataset:
    """The rows only: batches carry no click probability and no dense transform."""
    return Dataset(ds.dense, ds.labels, ds.values, ds.offsets)


def test_batches_read_whole_are_the_rows_of_the_file(world):
    names = world["job"].spec.feature_names
    batches = as_batches(world["train"], 333, names)  # uneven: the last batch is smaller
    got = open_data(batches, world["job"].spec)
    assert got.equals(rows_of(world["train"]))  # multi-hot bags (cat_1) included
    assert got.dense_transform is None
    given = open_data(batches, world["job"].spec, dense_transform="none")
    assert given.dense_transform == "none"
    torchrec_style = [TorchRecBatch(b.dense, b.sparse, b.labels.unsqueeze(1)) for b in batches]
    assert open_data(torchrec_style, world["job"].spec).equals(rows_of(world["train"]))


def test_streamed_batches_give_the_files_batches_in_order(world):
    spec = world["job"].spec
    names = spec.feature_names
    data = open_data(as_batches(world["valid"], 100, names), spec, settings=STREAM)
    assert isinstance(data, StreamedData) and len(data) == len(world["valid"])
    assert data.one_hot_features == ("cat_0", "cat_2", "cat_3")  # cat_1 holds bags of 2
    for x, y in zip(
        data.batches(64, feature_names=names),
        world["valid"].batches(64, feature_names=names),
        strict=True,
    ):
        assert torch.equal(x.dense, y.dense) and torch.equal(x.labels, y.labels)
        assert torch.equal(x.sparse.values(), y.sparse.values())
        assert torch.equal(x.sparse.lengths(), y.sparse.lengths())


def test_fine_tuning_from_batches_streamed(world):
    job = world["job"]
    names = job.spec.feature_names
    shuffled_keys = []  # KJT keys in another order and an extra feature: both fine
    for b in as_batches(world["train"], 500, names):
        d = b.sparse.to_dict()
        order = [*reversed(names)]
        extra = torch.zeros(len(b), dtype=torch.int64)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=[*order, "unused"],
            values=torch.cat([*(d[k].values() for k in order), extra]),
            lengths=torch.cat(
                [*(d[k].lengths() for k in order), torch.ones(len(b), dtype=torch.int64)]
            ),
        )
        shuffled_keys.append(Batch(b.dense, kjt, b.labels))
    valid = as_batches(world["valid"], 500, names)
    result = pipeline.compress(
        job,
        pipeline.plan(job, "int4_qat"),
        data=shuffled_keys,
        valid=lambda: iter(valid),  # a function returning a fresh iterator is fine too
        steps=8,
        loader=STREAM,
    )
    assert result.loader["mode"] == {"train": "stream", "valid": "stream"}
    assert result.loader["workers"] == 0  # read in this process
    assert result.train.steps == 8 and result.loader["rows"] >= 8 * 2048
    assert result.data["train"] == BATCHES_NAME
    assert result.data["report"].startswith(BATCHES_NAME + "[")
    assert result.metrics["compressed"]["n"] == len(world["valid"]) - round(
        0.2 * len(world["valid"])
    )
    # the same rows read whole give the metrics of the .npz files' rows
    whole = pipeline.compress(job, pipeline.plan(job, "int8_ptq"), data=shuffled_keys, valid=valid)
    files = pipeline.compress(
        job,
        pipeline.plan(job, "int8_ptq"),
        data=world["train_path"],
        valid=world["valid_path"],
    )
    assert whole.metrics == files.metrics


def test_an_iterator_is_refused_it_can_be_read_once(world):
    names = world["job"].spec.feature_names
    once = iter(as_batches(world["valid"], 500, names))
    with pytest.raises(DataError, match=r"an iterator can be read only once.*re-iterable"):
        open_data(once, world["job"].spec)


def test_batches_that_change_between_passes_are_an_error(world):
    spec = world["job"].spec
    names = spec.feature_names
    batches = as_batches(world["valid"], 300, names)
    calls = {"n": 0}

    def shuffling():
        calls["n"] += 1
        rng = np.random.default_rng(calls["n"])
        return iter([batches[i] for i in rng.permutation(len(batches))])

    data = open_data(shuffling, spec, settings=STREAM)
    with pytest.raises(DataError, match=r"batch \d+ differs from the first pass"):
        list(data.batches(100, feature_names=names))


def _one(world, **change):
    """One valid batch with one field replaced."""
    names = world["job"].spec.feature_names
    b = as_batches(world["valid"], 50, names)[0]
    fields = {"dense": b.dense, "sparse": b.sparse, "labels": b.labels, **change}
    return [Batch(**fields)]


def _kjt(world, feature: str, values: torch.Tensor, weighted: bool = False):
    """The first 50 validation rows' KJT with ``feature``'s bags replaced by one id each."""
    names = world["job"].spec.feature_names
    b = as_batches(world["valid"], 50, names)[0]
    d = b.sparse.to_dict()
    vals = torch.cat([values if k == feature else d[k].values() for k in names])
    lengths = [torch.ones(50, dtype=torch.int64) if k == feature else d[k].lengths() for k in names]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(names),
        values=vals,
        lengths=torch.cat(lengths),
        weights=torch.ones(len(vals)) if weighted else None,
    )


def test_bad_batches_are_one_line_naming_batch_and_feature(world):
    spec = world["job"].spec
    names = spec.feature_names
    b = as_batches(world["valid"], 50, names)[0]
    d = b.sparse.to_dict()
    missing = KeyedJaggedTensor.from_lengths_sync(
        keys=list(names[:-1]),
        values=torch.cat([d[k].values() for k in names[:-1]]),
        lengths=torch.cat([d[k].lengths() for k in names[:-1]]),
    )
    cases = {
        r"batch 0: sparse has no feature 'cat_3'; the model reads \['cat_0', 'cat_1', 'cat_2', "
        r"'cat_3'\], the batch holds \['cat_0', 'cat_1', 'cat_2'\]": _one(world, sparse=missing),
        r"feature 'cat_0' holds id 20 \(sample 0\), beyond its table's 20 rows": _one(
            world, sparse=_kjt(world, "cat_0", torch.full((50,), 20))
        ),
        r"feature 'cat_2' holds a negative id -4 \(sample 0\)": _one(
            world, sparse=_kjt(world, "cat_2", torch.full((50,), -4))
        ),
        r"batch 0: label 2.0 at sample 7 is not a label": _one(
            world, labels=torch.where(torch.arange(50) == 7, 2.0, b.labels)
        ),
        r"dense value nan at sample 3, column 1 is not finite": _one(
            world,
            dense=torch.where(
                (torch.arange(50)[:, None] == 3) & (torch.arange(5)[None, :] == 1),
                float("nan"),
                b.dense,
            ),
        ),
        r"dense is torch.float32 \[50, 4\], the model takes float \[batch, 5\]": _one(
            world, dense=b.dense[:, :4]
        ),
        r"sparse has weights; weighted features are not supported": _one(
            world,
            sparse=_kjt(world, "cat_0", torch.zeros(50, dtype=torch.int64), weighted=True),
        ),
        r"batch 0 is a tuple; expected a batch with dense, sparse": [(b.dense, b.sparse, b.labels)],
    }
    for message, batches in cases.items():
        with pytest.raises(DataError, match=message) as err:
            open_data(batches, spec)
        assert str(err.value).startswith(BATCHES_NAME) and "\n" not in str(err.value)
