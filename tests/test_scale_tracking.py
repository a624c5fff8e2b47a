"""Table-wise scales kept exact by the max|W| block summary instead of whole-table rescans."""

from __future__ import annotations

import pytest
import torch
from helpers import require_c_compiler
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compress.io.model_spec import TableSpec
from compress.methods.qat_embedding import (
    QATEmbeddingBagCollection,
    track_scale_updates,
    updates_only_gradient_rows,
)
from compress.methods.scale_tracking import BlockAbsmax
from compress.methods.tablewise import TablewiseConfig
from compress.quant import native
from compress.quant.tablewise import table_scale

ROWS, DIM = 1000, 8


@pytest.mark.parametrize(("rows", "dim", "block"), [(1, 1, 4), (257, 3, 16), (1000, 16, 64)])
def test_summary_stays_exact_under_row_updates(rows, dim, block):
    require_c_compiler()
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(rows, dim, generator=gen)
    summary = BlockAbsmax.build(w, block)
    assert summary.maximum(w) == float(w.abs().max())
    for _ in range(60):
        ids = torch.randint(0, rows, (max(1, rows // 20),), generator=gen)
        # shrink most rows (the block maxima go stale), grow a few
        w[ids] *= torch.rand(len(ids), 1, generator=gen) * 1.3
        summary.update(w, ids)
        assert summary.maximum(w) == float(w.abs().max())


def test_summary_reports_nan_until_the_row_is_fixed():
    require_c_compiler()
    w = torch.randn(100, 16)
    summary = BlockAbsmax.build(w, 8)
    w[3, 5] = float("nan")
    summary.update(w, torch.tensor([3]))
    assert summary.maximum(w) != summary.maximum(w)  # NaN
    w[3, 5] = 0.0
    summary.update(w, torch.tensor([3]))
    assert summary.maximum(w) == float(w.abs().max())


def _collection(refresh: int) -> QATEmbeddingBagCollection:
    spec = TableSpec("t", ROWS, DIM, ("f",))
    weight = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(1)) * 0.1
    return QATEmbeddingBagCollection(
        [spec], {"t": weight}, {"t": TablewiseConfig(bits=4, qat=True, scale_refresh=refresh)}
    )


def _batches(n: int) -> list[tuple[KeyedJaggedTensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    out = []
    for _ in range(n):
        lengths = torch.randint(0, 4, (32,), generator=gen)
        ids = torch.randint(0, ROWS, (int(lengths.sum()),), generator=gen)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=ids, lengths=lengths)
        out.append((kjt, torch.randn(32, DIM, generator=gen)))
    return out


def _train(ebc, opt, batches, tamper_at: int | None = None) -> list[float]:
    """Steps of SGD; the scale seen after every forward (the refresh happens inside forward)."""
    table = ebc.embedding_bags["t"]
    scales = []
    for i, (kjt, grad) in enumerate(batches):
        out = ebc(kjt).values()
        scales.append(float(table.scale))
        # a refresh in this forward must equal a rescan of the table as it is now
        if i > 0 and i % table.scale_refresh == 0:
            assert float(table.scale) == table_scale(table.weight.detach(), 4)
        out.backward(grad * 50)  # big steps: the maximum moves between refreshes
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i == tamper_at:
            with torch.no_grad():
                table.weight.mul_(0.5)  # not through the optimizer: the summary must notice
    return scales


@pytest.mark.parametrize("tamper_at", [None, 7])
def test_tracked_training_equals_rescanning_training(tamper_at):
    require_c_compiler()
    batches = _batches(40)
    runs = []
    for track in (False, True):
        ebc = _collection(refresh=3)
        ebc.train()
        opt = torch.optim.SGD(ebc.parameters(), lr=0.5)
        if track:
            assert track_scale_updates(ebc, opt) == 1
        assert ebc.embedding_bags["t"]._tracked == track
        runs.append((_train(ebc, opt, batches, tamper_at), ebc.embedding_bags["t"].weight))
    (scales_a, w_a), (scales_b, w_b) = runs
    assert scales_a == scales_b
    assert torch.equal(w_a, w_b)
    assert len(set(scales_a)) > 1  # the scale did move


def test_only_row_local_optimizers_are_tracked():
    ebc = _collection(refresh=3)
    params = list(ebc.parameters())
    assert updates_only_gradient_rows(torch.optim.SGD(params, lr=0.1))
    assert updates_only_gradient_rows(torch.optim.Adagrad(params, lr=0.1))
    assert updates_only_gradient_rows(torch.optim.SparseAdam(params, lr=0.1))
    assert not updates_only_gradient_rows(torch.optim.SGD(params, lr=0.1, momentum=0.9))
    assert not updates_only_gradient_rows(torch.optim.Adam(params, lr=0.1))
    assert track_scale_updates(ebc, torch.optim.SGD(params, lr=0.1, momentum=0.9)) == 0
    # without the compiled kernels (no C compiler) nothing is tracked: refreshes rescan
    tracked = 1 if native.enabled() else 0
    assert track_scale_updates(ebc, torch.optim.Adagrad(params, lr=0.1)) == tracked


def test_loading_a_state_dict_invalidates_the_summary():
    batches = _batches(10)
    ebc = _collection(refresh=3)
    ebc.train()
    opt = torch.optim.Adagrad(ebc.parameters(), lr=0.5)
    track_scale_updates(ebc, opt)
    _train(ebc, opt, batches[:5])
    other = _collection(refresh=3)
    with torch.no_grad():
        other.embedding_bags["t"].weight.mul_(3.0)
    ebc.load_state_dict(other.state_dict())
    table = ebc.embedding_bags["t"]
    table.refresh_scale()
    assert float(table.scale) == table_scale(table.weight.detach(), 4)


def test_a_table_the_kernels_cannot_take_is_rescanned_instead():
    spec = TableSpec("t", ROWS, DIM, ("f",))
    weight = torch.randn(DIM, ROWS).t()  # a strided view: not contiguous
    config = TablewiseConfig(bits=4, qat=True, scale_refresh=3)
    ebc = QATEmbeddingBagCollection([spec], {"t": weight}, {"t": config})
    ebc.train()
    opt = torch.optim.SGD(ebc.parameters(), lr=0.5)
    assert track_scale_updates(ebc, opt) == 0
    scales = _train(ebc, opt, _batches(10))  # asserts every refresh equals a rescan
    assert len(scales) == 10
