"""How :class:`~exporters.runtime.predictor.Predictor` uses its threads: a batch cut into slices
scored at the same time by one single-threaded session (``parallel="batch"``, the default), or ORT's
intra-op threads on the whole batch (``parallel="intra_op"``). Slicing never changes which bag a
sample's ids belong to, and the logits are those of the unsplit batch within the parity bound."""

from __future__ import annotations

import os
import threading
from itertools import pairwise

import numpy as np
import pytest
from helpers import export_small

from compress.data.dataset import Dataset
from compress.data.npz import load_npz
from exporters.runtime.predictor import (
    DENSE_INPUT,
    MIN_SLICE,
    Predictor,
    batch_cuts,
    dataset_feeds,
    slice_feeds,
)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(artifact dir, valid dataset) of a small DLRM with multi-hot features."""
    _, _, out, valid = export_small(tmp_path_factory.mktemp("threads"))
    return out, with_jagged_bags(load_npz(valid), seed=0)


def with_jagged_bags(data: Dataset, seed: int) -> Dataset:
    """``data`` with every feature's bags redrawn: 0..3 ids each (empty bags and multi-hot ones)."""
    rng = np.random.default_rng(seed)
    values, offsets = {}, {}
    for f, ids in data.values.items():
        lengths = rng.integers(0, 4, len(data))
        offsets[f] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        values[f] = rng.integers(0, int(ids.max()) + 1, int(offsets[f][-1]))
    return Dataset(dense=data.dense, labels=data.labels, values=values, offsets=offsets)


@pytest.mark.parametrize("batch", [0, 1, 255, 256, 511, 512, 1000, 2048, 4099])
@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_batch_cuts_cover_the_batch_in_even_slices_of_at_least_min_slice(batch, threads) -> None:
    cuts = batch_cuts(batch, threads)
    sizes = np.diff(cuts)
    assert cuts[0] == 0 and cuts[-1] == batch
    assert 1 <= len(sizes) <= threads
    assert sizes.max() - sizes.min() <= 1
    if len(sizes) > 1:
        assert sizes.min() >= MIN_SLICE
    # as many slices as the batch allows: one more would have one under MIN_SLICE
    assert len(sizes) == threads or batch < (len(sizes) + 1) * MIN_SLICE


def test_sliced_feeds_put_back_together_are_the_batch(served) -> None:
    out, valid = served
    predictor = Predictor(out, threads=1)
    feeds = dataset_feeds(valid.slice(0, 1000), predictor.feature_inputs)
    empty_bags = sum(int((feeds[ln] == 0).sum()) for _, ln in predictor.feature_inputs.values())
    multi_hot = sum(int((feeds[ln] > 1).sum()) for _, ln in predictor.feature_inputs.values())
    assert empty_bags > 0 and multi_hot > 0  # the case slicing could get wrong
    cuts = [0, 1, 333, 334, 1000]
    parts = slice_feeds(feeds, predictor.feature_inputs, cuts)
    assert [len(p[DENSE_INPUT]) for p in parts] == [1, 332, 1, 666]
    for name, whole in feeds.items():
        assert np.array_equal(np.concatenate([p[name] for p in parts]), whole), name
    for part in parts:
        for values, lengths in predictor.feature_inputs.values():
            assert part[values].shape[0] == part[lengths].sum()


@pytest.mark.parametrize("threads", [2, 3])
def test_a_sliced_batch_scores_what_its_slices_score_and_the_whole_batch(served, threads) -> None:
    out, valid = served
    data = valid.slice(0, 1100)
    sliced = Predictor(out, threads=threads, batch_size=1100)
    whole = Predictor(out, threads=1, batch_size=1100)
    intra = Predictor(out, threads=threads, batch_size=1100, parallel="intra_op")
    logits = sliced.predict(data)
    cuts = batch_cuts(1100, threads)
    assert len(cuts) == threads + 1  # the batch was cut
    # each slice exactly as a batch of its own ...
    alone = np.concatenate([whole.predict(data.slice(a, b)) for a, b in pairwise(cuts)])
    assert np.array_equal(logits, alone)
    # ... and the whole batch within the parity bound (a slice may read one-hot rows unpooled)
    assert np.abs(logits - whole.predict(data)).max() <= 1e-5
    assert np.array_equal(intra.predict(data), whole.predict(data))


def test_thread_settings_are_checked(served) -> None:
    out, _ = served
    with pytest.raises(ValueError, match="parallel must be 'batch' or 'intra_op', got 'gpu'"):
        Predictor(out, parallel="gpu")
    with pytest.raises(ValueError, match="threads must be positive, got 0"):
        Predictor(out, threads=0)
    assert Predictor(out).threads >= 1  # every core this process may use


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs two cores and thread affinity",
)
def test_worker_threads_are_pinned_to_cores_of_their_own(served) -> None:
    out, valid = served
    before = os.sched_getaffinity(0)
    predictor = Predictor(out, threads=2)
    predictor.predict(valid.slice(0, 600))  # two slices: two workers started
    barrier = threading.Barrier(2)

    def where() -> frozenset[int]:
        barrier.wait(timeout=10)  # both workers at once: one task each
        return frozenset(os.sched_getaffinity(0))

    pool = predictor._workers()
    cores = [f.result() for f in [pool.submit(where), pool.submit(where)]]
    assert all(len(c) == 1 for c in cores) and cores[0] != cores[1]
    assert os.sched_getaffinity(0) == before  # the caller's thread is left as it was


def _score_in_child(predictor: Predictor, data: Dataset, queue) -> None:  # noqa: ANN001 - mp queue
    queue.put(predictor.predict(data))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_scores_with_workers_of_its_own(served) -> None:
    """Worker threads do not survive fork: a child (a pre-forking server's worker) that scores with
    a Predictor its parent already used gets new workers instead of waiting on dead ones."""
    import multiprocessing

    out, valid = served
    data = valid.slice(0, 600)
    predictor = Predictor(out, threads=2)
    want = predictor.predict(data)  # the parent's workers exist now
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_score_in_child, args=(predictor, data, queue))
    child.start()
    try:
        got = queue.get(timeout=60)
        child.join(timeout=60)
    finally:
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    assert np.array_equal(got, want)


def test_callers_first_calls_at_once_share_one_pool_and_close_stops_it(
    served, monkeypatch: pytest.MonkeyPatch
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from exporters.runtime import predictor as module

    pools: list[ThreadPoolExecutor] = []

    class Counted(ThreadPoolExecutor):
        def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - passed through
            super().__init__(*args, **kwargs)
            pools.append(self)

    monkeypatch.setattr(module, "ThreadPoolExecutor", Counted)
    out, valid = served
    data = valid.slice(0, 600)
    predictor = Predictor(out, threads=2)
    want = Predictor(out, threads=1).predict(data)
    start = threading.Barrier(4)
    results: list[np.ndarray] = []

    def call() -> None:
        start.wait(timeout=10)
        results.append(predictor.predict(data))

    callers = [threading.Thread(target=call) for _ in range(4)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(timeout=60)
    assert len(results) == 4 and all(np.abs(r - want).max() <= 1e-5 for r in results)
    assert len(pools) == 1  # one pool, not one per caller that came first at once
    workers = set(pools[0]._threads)
    predictor.close()
    assert workers and not any(t.is_alive() for t in workers)
    assert np.array_equal(predictor.predict(data), results[0])  # new workers after close
    assert len(pools) == 2
