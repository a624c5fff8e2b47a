"""ROBE-Z (compress.methods.robe): the shared-array EBC, its combination with TorchRec, array quantization."""

from __future__ import annotations

import copy

import pytest
import torch
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compress.errors import RecipeError
from compress.io.model_spec import TableSpec
from compress.methods.combined import (
    CombinedEmbeddingBagCollection,
    combine_with_ebc,
    table_spec_from_config,
)
from compress.methods.robe.array import ArrayQuantization, dequantize_array, quantize_array
from compress.methods.robe.gather import gather_cells
from compress.methods.robe.hashing import block_cells, robe_indices
from compress.methods.robe.module import RobeConfig, RobeEmbeddingBagCollection
from compress.methods.robe.projection import project_module

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")

DIM = 8
TABLES = (
    TableSpec("t_a", 300, DIM, ("fa",)),
    TableSpec("t_b", 40, DIM, ("fb", "fc")),  # one table, two features
)


def make_module(
    block_size: int = 4, array_size: int = 500, seed: int = 1024, tables=TABLES, sparse=True
):
    torch.manual_seed(0)
    return RobeEmbeddingBagCollection(
        tables, RobeConfig(array_size, block_size, seed), sparse=sparse
    )


def random_kjt(keys_rows: dict[str, int], batch: int, max_bag: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    keys, lengths, values = [], [], []
    for k, rows in keys_rows.items():
        ln = torch.randint(0, max_bag + 1, (batch,), generator=g)
        ln[0] = 0  # always one empty bag
        keys.append(k)
        lengths.append(ln)
        values.append(torch.randint(0, rows, (int(ln.sum()),), generator=g))
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.cat(values), lengths=torch.cat(lengths)
    )


def pooled_by_lookup(module: RobeEmbeddingBagCollection, kjt: KeyedJaggedTensor) -> dict:
    """Per-feature [B, D] sums of ``lookup_rows``, one bag at a time (the slow, obvious way)."""
    feats = kjt.to_dict()
    out = {}
    for t in module.tables:
        for f in t.feature_names:
            jt = feats[f]
            rows = [
                module.lookup_rows(t.name, jt.values()[s:e]).sum(0)
                for s, e in zip(jt.offsets()[:-1].tolist(), jt.offsets()[1:].tolist(), strict=True)
            ]
            out[f] = torch.stack(rows)
    return out


@pytest.mark.parametrize("block_size", [1, 4, DIM, 3])
def test_forward_equals_sum_of_lookup_rows(block_size):
    m = make_module(block_size)
    # keys out of order, plus a feature the module does not read
    kjt = random_kjt({"fc": 40, "extra": 5, "fa": 300, "fb": 40}, batch=9)
    kt = m(kjt)
    assert kt.keys() == ["fa", "fb", "fc"]
    assert kt.values().shape == (9, 3 * DIM)
    ref = pooled_by_lookup(m, kjt)
    got = kt.to_dict()
    for f in ("fa", "fb", "fc"):
        torch.testing.assert_close(got[f], ref[f], rtol=1e-6, atol=1e-6)
    assert torch.all(kt.values()[0] == 0)  # the empty bags


def test_forward_handles_int32_inputs_single_ids_and_empty_batches():
    m = make_module(block_size=4)
    kjt = random_kjt({"fa": 300, "fb": 40, "fc": 40}, batch=6, max_bag=1, seed=4)
    one = KeyedJaggedTensor.from_lengths_sync(  # every bag exactly one id: the no-pooling path
        keys=kjt.keys(),
        values=torch.tensor([5, 6, 7, 8, 9, 1, 2, 3, 4], dtype=torch.int32),
        lengths=torch.ones(9, dtype=torch.int32),
    )
    ref = pooled_by_lookup(m, one)
    got = m(one).to_dict()
    for f in ("fa", "fb", "fc"):
        torch.testing.assert_close(got[f], ref[f], rtol=0, atol=0)
    empty = KeyedJaggedTensor.from_lengths_sync(
        keys=["fa", "fb", "fc"],
        values=torch.zeros(0, dtype=torch.int64),
        lengths=torch.zeros(0, dtype=torch.int64),
    )
    assert m(empty).values().shape == (0, 3 * DIM)
    zero_ids = KeyedJaggedTensor.from_lengths_sync(
        keys=["fa", "fb", "fc"],
        values=torch.zeros(0, dtype=torch.int64),
        lengths=torch.zeros(6, dtype=torch.int64),
    )
    assert torch.equal(m(zero_ids).values(), torch.zeros(2, 3 * DIM))


def test_lookup_rows_reads_the_hashed_cells():
    m = make_module(block_size=2)
    ids = torch.tensor([0, 17, 39])
    idx = robe_indices(ids, 300, DIM, 2, 500, m.constants)  # t_b starts after t_a's 300 rows
    torch.testing.assert_close(m.lookup_rows("t_b", ids), m.weight.detach()[idx], rtol=0, atol=0)
    with pytest.raises(IndexError, match="t_b"):
        m.lookup_rows("t_b", torch.tensor([40]))
    with pytest.raises(KeyError):
        m.lookup_rows("nope", ids)


def test_out_of_range_ids_rejected_in_forward():
    m = make_module()
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["fa", "fb", "fc"], values=torch.tensor([1, 40, 2]), lengths=torch.tensor([1, 1, 1])
    )
    with pytest.raises(IndexError, match="fb"):
        m(kjt)


def test_gradient_is_sparse_and_correct():
    m = make_module(block_size=4)
    kjt = random_kjt({"fa": 300, "fb": 40, "fc": 40}, batch=16, seed=3)
    coef = torch.randn(16, 3 * DIM)
    (m(kjt).values() * coef).sum().backward()
    assert m.weight.grad.is_sparse
    # dense reference: the same loss through plain advanced indexing
    w = m.weight.detach().clone().requires_grad_(True)
    loss = 0.0
    feats = kjt.to_dict()
    col = 0
    for t in m.tables:
        for f in t.feature_names:
            jt = feats[f]
            idx = m.cell_indices(t.name, jt.values())
            rows = w[idx]
            bag = torch.repeat_interleave(torch.arange(16), jt.lengths())
            pooled = torch.zeros(16, DIM).index_add(0, bag, rows)
            loss = loss + (pooled * coef[:, col : col + DIM]).sum()
            col += DIM
    loss.backward()
    torch.testing.assert_close(m.weight.grad.to_dense(), w.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opt_cls", [torch.optim.Adagrad, torch.optim.SGD, torch.optim.SparseAdam])
def test_optimizer_steps_touch_only_read_cells(opt_cls):
    m = make_module(block_size=4, array_size=5000)
    kjt = random_kjt({"fa": 300, "fb": 40, "fc": 40}, batch=4, max_bag=1, seed=5)
    before = m.weight.detach().clone()
    opt = opt_cls(m.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        m(kjt).values().pow(2).sum().backward()
        opt.step()
    changed = (m.weight.detach() != before).nonzero().reshape(-1)
    read = torch.unique(m.weight.grad.coalesce().indices())
    assert changed.numel() > 0
    assert set(changed.tolist()) <= set(read.tolist())


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize(("size", "z", "dim"), [(30, 2, 3), (10_000, 4, 8), (50, 1, 4)])
def test_gather_cells_matches_indexing(sparse, size, z, dim):
    w = torch.randn(size, requires_grad=True)
    starts = torch.randint(
        0, size - z + 1, (5, -(-dim // z)), generator=torch.Generator().manual_seed(0)
    )
    starts[1] = starts[0]  # repeated cells
    idx = block_cells(starts, dim, z)
    out = gather_cells(w, starts, dim, z, sparse=sparse)
    assert torch.equal(out, w.detach()[idx])
    coef = torch.randn(5, dim)
    (out * coef).sum().backward()
    assert w.grad.is_sparse == sparse
    expected = torch.zeros(size).index_add_(0, idx.reshape(-1), coef.reshape(-1))
    torch.testing.assert_close(w.grad.to_dense(), expected)


def test_sparse_grad_is_stored_coalesced_unless_accumulated():
    m = make_module(block_size=4, array_size=500)
    kjt = random_kjt({"fa": 300, "fb": 40, "fc": 40}, batch=16, seed=2)
    m(kjt).values().sum().backward()
    g1 = m.weight.grad
    assert g1.is_sparse and g1.is_coalesced()  # small array: summed densely, flag restored
    assert torch.equal(g1.indices(), torch.unique(g1.indices()).view(1, -1))
    d1 = g1.to_dense()
    m(kjt).values().sum().backward()  # accumulates (into g1, in place): still correct
    torch.testing.assert_close(m.weight.grad.to_dense(), 2 * d1)
    m.weight.grad = None
    (m(kjt).values().sum() + m.lookup_rows("t_a", torch.tensor([1, 2])).sum()).backward()
    g = m.weight.grad
    ref = d1 + torch.zeros(500).index_add_(
        0, m.cell_indices("t_a", torch.tensor([1, 2])).reshape(-1), torch.ones(2 * DIM)
    )
    torch.testing.assert_close(g.to_dense(), ref)
    big = make_module(block_size=4, array_size=100_000)  # large array: entries left as they are
    big(kjt).values().sum().backward()
    assert big.weight.grad.is_sparse and not big.weight.grad.is_coalesced()
    clone = copy.deepcopy(m)  # hooks do not survive deepcopy; the clone registers its own
    clone.weight.grad = None
    clone(kjt).values().sum().backward()
    assert clone.weight.grad.is_coalesced()


def test_dense_gradient_mode_gives_the_same_training_step():
    kjt = random_kjt({"fa": 300, "fb": 40, "fc": 40}, batch=8, seed=11)
    arrays = []
    for sparse in (True, False):
        m = make_module(block_size=4, array_size=2000, sparse=sparse)
        opt = torch.optim.Adagrad(m.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            m(kjt).values().pow(2).sum().backward()
            assert m.weight.grad.is_sparse == sparse
            opt.step()
        arrays.append(m.weight.detach())
    torch.testing.assert_close(arrays[0], arrays[1], rtol=1e-6, atol=1e-7)


def test_configs_and_errors():
    m = make_module()
    cfgs = m.embedding_bag_configs()
    assert [c.name for c in cfgs] == ["t_a", "t_b"]
    assert [table_spec_from_config(c) for c in cfgs] == list(TABLES)
    assert not m.is_weighted()
    assert list(m.state_dict()) == ["weight"]
    with pytest.raises(RecipeError, match="t_x"):
        make_module(tables=TABLES + (TableSpec("t_x", 5, 4, ("fx",)),))
    with pytest.raises(RecipeError, match="smaller than the block size"):
        make_module(block_size=8, array_size=7)
    with pytest.raises(RecipeError, match="positive integer"):
        make_module(block_size=0)
    with pytest.raises(RecipeError, match="seed"):
        RobeConfig(100, 4, seed=-1)
    with pytest.raises(RecipeError, match="twice"):
        make_module(tables=TABLES + TABLES[:1])
    cfg = RobeConfig.for_tables(TABLES, block_size=4, compression=10)
    assert cfg.array_size == (340 * DIM) // 10
    with pytest.raises(RecipeError, match=r"t_a, t_b.*fewer than the block"):
        RobeConfig.for_tables(TABLES, block_size=4, compression=10_000)


# --- array quantization ---------------------------------------------------------------------------


def test_quantize_array_int8_per_array_and_per_group():
    w = torch.tensor([0.5, -1.0, 0.25, 0.0, 2.0, -0.1, 0.0])
    q, s = quantize_array(w, "int8")
    assert q.dtype == torch.int8 and s.shape == (1,)
    assert q.tolist() == [32, -64, 16, 0, 127, -6, 0]
    torch.testing.assert_close(dequantize_array(q, s), q.float() * (2.0 / 127), rtol=0, atol=0)
    q, s = quantize_array(w, "int8", group_size=3)
    assert s.shape == (3,)
    assert s.tolist() == pytest.approx([1 / 127, 2 / 127, 1.0])  # last group all zero
    assert q.tolist()[:3] == [64, -127, 32]
    deq = dequantize_array(q, s, group_size=3)
    assert deq.shape == w.shape
    assert float((deq - w).abs().max()) <= 2 / 127 / 2 + 1e-7
    data, scale = quantize_array(w, "fp16")
    assert data.dtype == torch.float16 and scale is None
    with pytest.raises(ValueError, match="precision"):
        quantize_array(w, "int4")
    with pytest.raises(ValueError, match="int8 only"):
        quantize_array(w, "fp16", group_size=4)
    with pytest.raises(ValueError, match="float16 range"):
        quantize_array(torch.tensor([1e6]), "fp16")
    with pytest.raises(RecipeError, match="precision"):
        ArrayQuantization("int4")
    with pytest.raises(RecipeError, match="group_size"):
        ArrayQuantization("int8", group_size=0)


@pytest.mark.parametrize(
    "quant", [ArrayQuantization("int8"), ArrayQuantization("int8", 64), ArrayQuantization("fp16")]
)
def test_quantized_forward_equals_exported_computation(quant):
    m = make_module(block_size=4)
    kjt = random_kjt({"fa": 300, "fb": 40, "fc": 40}, batch=8, seed=9)
    float_out = m(kjt).values().detach()
    m.set_quantization(quant)
    out = m(kjt).values()
    # what an exported graph computes: gather stored values (and their scales), multiply, sum
    data, scale = quantize_array(m.weight, quant.precision, quant.group_size)
    feats = kjt.to_dict()
    cols = []
    for t in m.tables:
        for f in t.feature_names:
            jt = feats[f]
            idx = m.cell_indices(t.name, jt.values())
            if scale is None:
                rows = data[idx].float()
            else:
                cell_scale = scale[idx // quant.group_size] if quant.group_size else scale[0]
                rows = data[idx].float() * cell_scale
            bag = torch.repeat_interleave(torch.arange(8), jt.lengths())
            cols.append(torch.zeros(8, DIM).index_add(0, bag, rows))
    torch.testing.assert_close(out.detach(), torch.cat(cols, 1), rtol=0, atol=0)
    assert not torch.equal(out.detach(), float_out)
    # straight-through: gradient equals the float module's gradient, still sparse
    out.sum().backward()
    assert m.weight.grad.is_sparse
    g_q = m.weight.grad.to_dense()
    m.weight.grad = None
    m.set_quantization(None)
    m(kjt).values().sum().backward()
    torch.testing.assert_close(g_q, m.weight.grad.to_dense())


def test_dequantized_array_cache_follows_weight_updates():
    m = make_module()
    m.set_quantization(ArrayQuantization("int8"))
    a = m.dequantized_array()
    assert m.dequantized_array() is a
    with torch.no_grad():
        m.weight.mul_(2)
    b = m.dequantized_array()
    assert b is not a
    torch.testing.assert_close(b, 2 * a)


# --- the drop-in inside a TorchRec DLRM -----------------------------------------------------------

ROWS = {"t_0": 30, "t_1": 20, "t_2": 25}  # small so the no-collision case needs a small array


def make_dlrm(rows=ROWS, dim=DIM) -> DLRM:
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name=n, embedding_dim=dim, num_embeddings=r, feature_names=[f"c{n}"])
            for n, r in rows.items()
        ]
    )
    return DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=5,
        dense_arch_layer_sizes=[16, dim],
        over_arch_layer_sizes=[12, 1],
    )


def model_inputs(model: DLRM, batch: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    rows = {
        f"c{c.name}": c.num_embeddings
        for c in model.sparse_arch.embedding_bag_collection.embedding_bag_configs()
    }
    return torch.randn(batch, 5, generator=g), random_kjt(rows, batch, seed=seed)


def biggest_two(model: DLRM) -> list[TableSpec]:
    cfgs = model.sparse_arch.embedding_bag_collection.embedding_bag_configs()
    big = sorted(cfgs, key=lambda c: -c.num_embeddings)[:2]
    return [table_spec_from_config(c) for c in cfgs if c in big]


def test_dlrm_with_robe_equals_dlrm_with_materialized_tables():
    model = make_dlrm(rows={"t_0": 300, "t_1": 20, "t_2": 1000})
    ref = copy.deepcopy(model)
    specs = biggest_two(model)
    assert [s.name for s in specs] == ["t_0", "t_2"]
    robe = RobeEmbeddingBagCollection(specs, RobeConfig(array_size=1300 * DIM // 20, block_size=4))
    model.sparse_arch.embedding_bag_collection = combine_with_ebc(
        model.sparse_arch.embedding_bag_collection, [robe]
    )
    with torch.no_grad():  # the reference reads the same virtual rows from plain tables
        for s in specs:
            ref.sparse_arch.embedding_bag_collection.embedding_bags[s.name].weight.copy_(
                robe.materialize(s.name)
            )
    dense, kjt = model_inputs(model, batch=32)
    out = model(dense, kjt)
    torch.testing.assert_close(out, ref(dense, kjt), rtol=1e-5, atol=1e-6)
    # trains: sparse Adagrad for the array, dense Adagrad for the MLPs
    sparse_params = [robe.weight]
    dense_params = [p for n, p in model.named_parameters() if p is not robe.weight]
    opts = [torch.optim.Adagrad(sparse_params, lr=0.05), torch.optim.Adagrad(dense_params, lr=0.05)]
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out.squeeze(1), torch.ones(32))
    loss.backward()
    assert robe.weight.grad.is_sparse
    for o in opts:
        o.step()
    assert not torch.equal(model(dense, kjt), out)


def test_dlrm_projection_without_collisions_is_exact():
    """Z = dim and an array with room for every row: the projected model equals the original."""
    model = make_dlrm()
    ref = copy.deepcopy(model)
    specs = biggest_two(model)  # t_0 (30 rows) and t_2 (25 rows)
    config = RobeConfig(array_size=200_000, block_size=DIM)
    ebc = model.sparse_arch.embedding_bag_collection
    trained = [(s, ebc.embedding_bags[s.name].weight.detach()) for s in specs]
    robe, report = project_module(trained, config)
    assert report.cells_hit == report.values == 55 * DIM  # constructed case: no collisions
    assert report.rmse == 0.0
    model.sparse_arch.embedding_bag_collection = combine_with_ebc(ebc, [robe])
    dense, kjt = model_inputs(model)
    torch.testing.assert_close(model(dense, kjt), ref(dense, kjt), rtol=0, atol=1e-6)


def test_combined_keeps_feature_order_and_routes_features():
    model = make_dlrm()
    ebc = model.sparse_arch.embedding_bag_collection
    specs = [table_spec_from_config(c) for c in ebc.embedding_bag_configs()]
    first = RobeEmbeddingBagCollection([specs[2]], RobeConfig(100, 2))
    second = RobeEmbeddingBagCollection([specs[0]], RobeConfig(100, 8, seed=7))
    rest = EmbeddingBagCollection(tables=[ebc.embedding_bag_configs()[1]])
    order = ["ct_0", "ct_1", "ct_2"]
    combined = CombinedEmbeddingBagCollection([first, rest, second], order)
    assert [c.name for c in combined.embedding_bag_configs()] == ["t_0", "t_1", "t_2"]
    _, kjt = model_inputs(model)
    kt = combined(kjt)
    assert kt.keys() == order
    got = kt.to_dict()
    torch.testing.assert_close(got["ct_2"], first(kjt).to_dict()["ct_2"])
    torch.testing.assert_close(got["ct_0"], second(kjt).to_dict()["ct_0"])
    torch.testing.assert_close(got["ct_1"], rest(kjt).to_dict()["ct_1"])
    rebuilt = DLRM(  # SparseArch reads names and dims from embedding_bag_configs()
        embedding_bag_collection=combined,
        dense_in_features=5,
        dense_arch_layer_sizes=[16, DIM],
        over_arch_layer_sizes=[12, 1],
    )
    dense, _ = model_inputs(model)
    assert rebuilt(dense, kjt).shape == (16, 1)
    with pytest.raises(ValueError, match="feature_order"):
        CombinedEmbeddingBagCollection([first, rest], order)
    with pytest.raises(ValueError, match="read by parts"):
        CombinedEmbeddingBagCollection([first, first], ["ct_2", "ct_2"])


def test_combine_with_ebc_rejects_mismatched_groups():
    ebc = make_dlrm().sparse_arch.embedding_bag_collection
    wrong = RobeEmbeddingBagCollection([TableSpec("t_0", 31, DIM, ("ct_0",))], RobeConfig(50, 1))
    with pytest.raises(RecipeError, match="t_0"):
        combine_with_ebc(ebc, [wrong])
    missing = RobeEmbeddingBagCollection([TableSpec("zz", 31, DIM, ("cz",))], RobeConfig(50, 1))
    with pytest.raises(RecipeError, match="zz"):
        combine_with_ebc(ebc, [missing])
