"""Row-wise Adagrad (FBGEMM's EXACT_ROWWISE_ADAGRAD): parity with FBGEMM's CPU kernel, only the
gradient's rows touched, one accumulator per row, resumable state, recipe key, exact scale
tracking."""

from __future__ import annotations

import io

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
    ComputeDevice,
    EmbeddingLocation,
    PoolingMode,
)
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    SplitTableBatchedEmbeddingBagsCodegen,
)
from helpers import require_c_compiler, tiny_world
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compress import pipeline
from compress.data.npz import load_npz
from compress.errors import RecipeError
from compress.io.model_spec import TableSpec
from compress.methods.apply_plan import prepare_model
from compress.methods.qat_embedding import (
    QATEmbeddingBagCollection,
    track_scale_updates,
    updates_only_gradient_rows,
)
from compress.methods.tablewise import TablewiseConfig
from compress.quant.tablewise import table_scale
from compress.recipe.parse import parse_recipe
from compress.train.config import TrainConfig
from compress.train.loop import fit, make_optimizer, split_parameters
from compress.train.rowwise_adagrad import DEFAULT_EPS, RowwiseAdagrad, row_mean_squares

LR = 0.37


def _fbgemm(rows: int, dim: int, weight: torch.Tensor) -> SplitTableBatchedEmbeddingBagsCodegen:
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU)],
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=LR,
        eps=DEFAULT_EPS,
        pooling_mode=PoolingMode.SUM,
    )
    tbe.split_embedding_weights()[0].copy_(weight)
    return tbe


def _bags(gen: torch.Generator, rows: int, batch: int = 16, max_bag: int = 5):
    lengths = torch.randint(0, max_bag, (batch,), generator=gen)
    ids = torch.randint(0, rows, (int(lengths.sum()),), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return ids, offsets


@pytest.mark.parametrize(("rows", "dim"), [(50, 16), (1000, 12), (20, 4), (6, 64)])
def test_equals_fbgemm_exact_rowwise_adagrad_bit_for_bit(rows, dim):
    """20 steps of FBGEMM's split TBE on the CPU and of RowwiseAdagrad on an nn.EmbeddingBag with
    sparse gradients, from the same weights and gradients (many ids repeat within a batch)."""
    gen = torch.Generator().manual_seed(rows + dim)
    w0 = torch.randn(rows, dim, generator=gen)
    tbe = _fbgemm(rows, dim, w0)
    bag = torch.nn.EmbeddingBag(rows, dim, mode="sum", sparse=True)
    with torch.no_grad():
        bag.weight.copy_(w0)
    opt = RowwiseAdagrad(bag.parameters(), lr=LR)
    for _ in range(20):
        ids, offsets = _bags(gen, rows)
        grad_out = torch.randn(16, dim, generator=gen)
        tbe(ids, offsets).backward(grad_out)
        opt.zero_grad(set_to_none=True)
        bag(ids, offsets[:-1]).backward(grad_out)
        opt.step()
    assert torch.equal(tbe.split_embedding_weights()[0], bag.weight.detach())
    assert torch.equal(tbe.split_optimizer_states()[0][0], opt.state[bag.weight]["sum"])
    assert not torch.equal(bag.weight.detach(), w0)


def test_formula_by_hand():
    """state += mean(g^2); w -= lr * g / (sqrt(state) + eps); duplicate ids summed first."""
    w = torch.nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    opt = RowwiseAdagrad([w], lr=0.5, eps=0.25)
    # row 2 appears twice: its gradient is [1, 1] + [2, 3] = [3, 4], mean square 12.5
    w.grad = torch.sparse_coo_tensor(
        torch.tensor([[2, 0, 2]]), torch.tensor([[1.0, 1.0], [0.0, 2.0], [2.0, 3.0]]), (3, 2)
    )
    opt.step()
    state = opt.state[w]["sum"]
    assert state.tolist() == [2.0, 0.0, 12.5]
    expect0 = torch.tensor([1.0, 2.0]) - 0.5 * torch.tensor([0.0, 2.0]) / (2.0**0.5 + 0.25)
    expect2 = torch.tensor([5.0, 6.0]) - 0.5 * torch.tensor([3.0, 4.0]) / (12.5**0.5 + 0.25)
    assert torch.allclose(w[0], expect0, rtol=1e-6) and torch.allclose(w[2], expect2, rtol=1e-6)
    assert w[1].tolist() == [3.0, 4.0]


@pytest.mark.parametrize("dim", [1, 3, 8, 13, 16, 128])
def test_row_mean_squares_is_the_mean_within_rounding(dim):
    values = torch.randn(200, dim, generator=torch.Generator().manual_seed(dim))
    exact = (values.double() ** 2).mean(dim=1)
    assert torch.allclose(row_mean_squares(values).double(), exact, rtol=1e-6, atol=0)


def test_only_gradient_rows_change():
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(100, 8, generator=gen))
    opt = RowwiseAdagrad([w], lr=0.1)
    before = w.detach().clone()
    touched = torch.tensor([3, 17, 17, 64])
    w.grad = torch.sparse_coo_tensor(touched[None], torch.randn(4, 8, generator=gen), (100, 8))
    opt.step()
    changed = (w.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [3, 17, 64]
    assert (opt.state[w]["sum"] != 0).nonzero().flatten().tolist() == [3, 17, 64]
    assert updates_only_gradient_rows(opt)


def test_dense_gradient_gives_the_sparse_update():
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(30, 8, generator=gen)
    ids = torch.tensor([2, 5, 29])
    values = torch.randn(3, 8, generator=gen)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt_a, opt_b = RowwiseAdagrad([a], lr=0.2), RowwiseAdagrad([b], lr=0.2)
    for _ in range(3):
        a.grad = torch.sparse_coo_tensor(ids[None], values, (30, 8))
        b.grad = torch.zeros(30, 8).index_add_(0, ids, values)
        opt_a.step()
        opt_b.step()
    assert torch.equal(a, b)
    assert torch.equal(opt_a.state[a]["sum"], opt_b.state[b]["sum"])


def test_state_is_one_accumulator_per_row():
    rows, dim = 1000, 16
    w = torch.nn.Parameter(torch.zeros(rows, dim))
    robe_array = torch.nn.Parameter(torch.zeros(300))  # one-dimensional: a row per element
    row_wise = make_optimizer("rowwise_adagrad", [w, robe_array], 0.01)
    element_wise = make_optimizer("adagrad", [w, robe_array], 0.01)
    assert isinstance(row_wise, RowwiseAdagrad)

    def state_bytes(opt):
        return sum(
            t.numel() * t.element_size()
            for s in opt.state.values()
            for t in s.values()
            if torch.is_tensor(t) and t.dim() > 0
        )

    assert row_wise.state[w]["sum"].shape == (rows,)
    assert state_bytes(row_wise) == (rows + 300) * 4
    assert state_bytes(element_wise) == (rows * dim + 300) * 4


def _trained(steps: int, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(40, 4, generator=gen))
    grads = [
        torch.sparse_coo_tensor(
            torch.randint(0, 40, (1, 10), generator=gen), torch.randn(10, 4, generator=gen), (40, 4)
        )
        for _ in range(steps)
    ]
    return w, grads


def test_state_dict_round_trip():
    w, grads = _trained(8)
    opt = RowwiseAdagrad([w], lr=0.3)
    for g in grads[:4]:
        w.grad = g
        opt.step()
    buf = io.BytesIO()
    torch.save({"w": w.detach().clone(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # as the training state is read
    w2 = torch.nn.Parameter(saved["w"])
    opt2 = RowwiseAdagrad([w2], lr=0.3)
    opt2.load_state_dict(saved["opt"])
    assert torch.equal(opt2.state[w2]["sum"], opt.state[w]["sum"])
    for g in grads[4:]:
        w.grad, w2.grad = g, g.clone()
        opt.step()
        opt2.step()
    assert torch.equal(w, w2)


def test_a_state_of_other_rows_is_refused():
    opt = RowwiseAdagrad([torch.nn.Parameter(torch.zeros(10, 4))], lr=0.1)
    other = RowwiseAdagrad([torch.nn.Parameter(torch.zeros(12, 4))], lr=0.1)
    with pytest.raises(
        ValueError, match=r"state of parameter 0 has shape \(12,\), expected \(10,\)"
    ):
        opt.load_state_dict(other.state_dict())


QAT_RECIPE = """
name = "rw"
[[tables]]
match = ["*"]
method = "qat"
bits = 4
granularity = "table"
scale_refresh = 3
[finetune]
steps = 12
batch_size = 256
{finetune}
"""


def test_recipe_accepts_rowwise_adagrad_for_tables():
    recipe = parse_recipe(QAT_RECIPE.format(finetune='optimizer = "rowwise_adagrad"'))
    assert recipe.finetune.optimizer == "rowwise_adagrad"
    assert recipe.finetune.dense_optimizer_kind() == "adagrad"  # the MLP: element-wise
    explicit = parse_recipe(
        QAT_RECIPE.format(finetune='optimizer = "rowwise_adagrad"\ndense_optimizer = "sgd"')
    )
    assert explicit.finetune.dense_optimizer_kind() == "sgd"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            'optimizer = "rowwise_adagard"',
            'finetune: optimizer must be one of "adagrad", "sgd", "adam", "rowwise_adagrad", '
            'got "rowwise_adagard"',
        ),
        (
            'optimizer = "rowwise_adagrad"\ndense_optimizer = "rowwise_adagrad"',
            'finetune: dense_optimizer must be one of "adagrad", "sgd", "adam", '
            'got "rowwise_adagrad"',
        ),
    ],
)
def test_recipe_typos_list_the_choices(line, message):
    with pytest.raises(RecipeError) as e:
        parse_recipe(QAT_RECIPE.format(finetune=line), "r.toml")
    assert str(e.value) == f"r.toml: {message}"


ROWS, DIM = 1000, 8


def _collection() -> QATEmbeddingBagCollection:
    spec = TableSpec("t", ROWS, DIM, ("f",))
    weight = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(1)) * 0.1
    config = TablewiseConfig(bits=4, qat=True, scale_refresh=3)
    return QATEmbeddingBagCollection([spec], {"t": weight}, {"t": config})


def test_scale_tracking_stays_exact_with_rowwise_adagrad():
    """Tracked and rescanning runs see the same scales and end with the same weights; every
    refresh equals a rescan of the table as it is."""
    require_c_compiler()
    gen = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(30):
        lengths = torch.randint(0, 4, (32,), generator=gen)
        ids = torch.randint(0, ROWS, (int(lengths.sum()),), generator=gen)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=ids, lengths=lengths)
        batches.append((kjt, torch.randn(32, DIM, generator=gen)))
    runs = []
    for track in (False, True):
        ebc = _collection()
        ebc.train()
        opt = RowwiseAdagrad(ebc.parameters(), lr=0.05)
        if track:
            assert track_scale_updates(ebc, opt) == 1
        table = ebc.embedding_bags["t"]
        assert table._tracked == track
        scales = []
        for i, (kjt, grad) in enumerate(batches):
            out = ebc(kjt).values()
            scales.append(float(table.scale))
            if i > 0 and i % table.scale_refresh == 0:
                assert float(table.scale) == table_scale(table.weight.detach(), 4)
            out.backward(grad * 50)
            opt.step()
            opt.zero_grad(set_to_none=True)
        runs.append((scales, table.weight.detach().clone()))
    (scales_a, w_a), (scales_b, w_b) = runs
    assert scales_a == scales_b and torch.equal(w_a, w_b)
    assert len(set(scales_a)) > 1  # the scale did move


def test_fine_tuning_resumes_with_rowwise_adagrad(tmp_path):
    """An interrupted QAT run with row-wise Adagrad saves one accumulator per table row and,
    resumed, ends with the weights of an uninterrupted run."""
    ckpt, train_path, valid_path, _ = tiny_world(tmp_path)
    job = pipeline.load(ckpt)
    recipe = parse_recipe(QAT_RECIPE.format(finetune='optimizer = "rowwise_adagrad"'))
    plan = pipeline.plan(job, recipe)
    train, valid = load_npz(train_path), load_npz(valid_path)
    names = job.spec.feature_names
    config = TrainConfig(**{**recipe.finetune.__dict__, "eval_every": 4, "checkpoint_every": 3})

    def student():
        return prepare_model(job.module, job.spec, plan)[0]

    straight = student()
    fit(straight, train, valid, names, config)
    state = tmp_path / "state.pt"
    first = student()
    assert fit(first, train, valid, names, config, state_path=state, stop_after=7).steps == 7
    saved = torch.load(state, weights_only=True)
    emb, _ = split_parameters(first)
    sums = [s["sum"] for s in saved["optimizers"][0]["state"].values()]
    assert sorted(s.shape for s in sums) == sorted((p.shape[0],) for p in emb)
    second = student()
    assert fit(second, train, valid, names, config, state_path=state, resume=True).steps == 12
    a, b = straight.state_dict(), second.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
