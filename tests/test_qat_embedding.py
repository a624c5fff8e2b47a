"""DQRM table QAT: gathered-row fake quant equals whole-table fake quant; convert equals prepare."""

from __future__ import annotations

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import pytest
import torch
from helpers import make_dlrm, random_inputs
from quant_reference import fake_quantize_tablewise, fbgemm_fake_quantize_rowwise
from torch.nn import functional as F  # noqa: N812

from compress.io.model_spec import TableSpec
from compress.methods.base import MethodConfig
from compress.methods.fp16 import Fp16Config
from compress.methods.keep import KeepConfig
from compress.methods.qat_embedding import (
    QATEmbeddingBagCollection,
    QuantizedEmbeddingBagCollection,
    pool_bags,
)
from compress.methods.rowwise import RowwiseConfig
from compress.methods.tablewise import TablewiseConfig
from compress.quant import fake_quant
from compress.quant.tablewise import table_scale

QUANTS = [
    KeepConfig(),
    Fp16Config(),
    *[
        kind(bits, qat=qat)
        for qat in (True, False)
        for bits in (8, 4, 2)
        for kind in (RowwiseConfig, TablewiseConfig)
    ],
]


def _id(config: MethodConfig) -> str:
    return f"{config.METHOD}-{getattr(config, 'bits', '')}-{'qat' if getattr(config, 'qat', 0) else ''}"


def _collection(quant: MethodConfig, seed: int = 0, scale_refresh: int | None = None):
    g = torch.Generator().manual_seed(seed)
    tables = [TableSpec("t_a", 50, 16, ("a",)), TableSpec("t_b", 300, 16, ("b", "c"))]
    if scale_refresh is not None:
        quant = TablewiseConfig(quant.bits, quant.qat, scale_refresh)
    weights = {t.name: torch.randn(t.num_embeddings, t.embedding_dim, generator=g) for t in tables}
    return QATEmbeddingBagCollection(tables, weights, {t.name: quant for t in tables})


def _kjt(seed: int = 1, batch: int = 64):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (3 * batch,), generator=g)
    lengths[batch - 1] = 0  # a trailing empty bag for feature a
    rows = [50] * batch + [300] * (2 * batch)
    values = torch.cat(
        [torch.randint(0, r, (int(n),), generator=g) for r, n in zip(rows, lengths, strict=True)]
    )
    return KeyedJaggedTensor.from_lengths_sync(keys=["a", "b", "c"], values=values, lengths=lengths)


def _whole_table(quant: MethodConfig, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    if isinstance(quant, KeepConfig):
        return w
    if isinstance(quant, Fp16Config):
        return w.half().float()
    if isinstance(quant, RowwiseConfig):
        return fbgemm_fake_quantize_rowwise(w, quant.bits)
    return fake_quantize_tablewise(w, float(scale), quant.bits)


@pytest.mark.parametrize("quant", QUANTS, ids=_id)
def test_gathered_rows_equal_whole_table_fake_quant(quant):
    ebc = _collection(quant)
    kjt = _kjt()
    out = ebc(kjt).to_dict()
    for t in ebc.tables:
        mod = ebc.embedding_bags[t.name]
        full = _whole_table(quant, mod.weight.detach(), getattr(mod, "scale", None))
        for f in t.feature_names:
            jt = kjt[f]
            expected = pool_bags(full[jt.values()], jt.lengths())
            assert torch.equal(out[f], expected)
            reference = F.embedding_bag(
                jt.values(), full, jt.offsets(), mode="sum", include_last_offset=True
            )
            torch.testing.assert_close(out[f], reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("quant", QUANTS, ids=_id)
def test_convert_equals_prepare_exactly(quant):
    ebc = _collection(quant).eval()
    kjt = _kjt()
    converted = QuantizedEmbeddingBagCollection.from_qat(ebc)
    with torch.no_grad():
        assert torch.equal(ebc(kjt).values(), converted(kjt).values())
    if hasattr(quant, "bits"):
        t = converted.quantized["t_b"]
        assert t.data.dtype == torch.uint8 and t.data.shape == (300, 16 * quant.bits // 8)


def test_gradients_are_sparse_and_straight_through():
    ebc = _collection(RowwiseConfig(4, qat=True))
    kjt = _kjt()
    ebc(kjt).values().sum().backward()
    grad = ebc.embedding_bags["t_a"].weight.grad
    assert grad.is_sparse
    # STE: the gradient of a sum-pooled lookup is the count of each id, as without quantization
    counts = torch.bincount(kjt["a"].values(), minlength=50).float()
    assert torch.equal(grad.to_dense()[:, 0], counts)


def test_ptq_tables_are_frozen():
    ebc = _collection(RowwiseConfig(8))
    assert not any(p.requires_grad for p in ebc.parameters())


def test_tablewise_scale_refreshes_every_p_steps():
    ebc = _collection(TablewiseConfig(4, qat=True), scale_refresh=3).train()
    mod = ebc.embedding_bags["t_a"]
    kjt = _kjt()
    initial = float(mod.scale)
    with torch.no_grad():
        mod.weight.mul_(2.0)  # grow the table: the scale must follow only at the refresh step
    for step in range(1, 4):
        ebc(kjt)
        assert float(mod.scale) == initial, step
    ebc(kjt)  # the 4th training forward is step 3 = P: rescan
    assert float(mod.scale) == table_scale(mod.weight.detach(), 4)
    assert float(mod.scale) > initial


def test_drop_in_for_torchrec_ebc():
    model = make_dlrm().eval()
    dense, kjt = random_inputs(model)
    ebc = model.sparse_arch.embedding_bag_collection
    from compress.io.model_spec import TableSpec as TS

    tables = [
        TS(c.name, c.num_embeddings, c.embedding_dim, tuple(c.feature_names))
        for c in ebc.embedding_bag_configs()
    ]
    weights = {n: m.weight.detach().clone() for n, m in ebc.embedding_bags.items()}
    with torch.no_grad():
        before = model(dense, kjt)
        model.sparse_arch.embedding_bag_collection = QATEmbeddingBagCollection(
            tables, weights, {}
        ).eval()
        after = model(dense, kjt)
    torch.testing.assert_close(before, after, atol=1e-6, rtol=1e-6)


def test_one_id_bags_pool_to_the_rows_themselves():
    rows = torch.randn(6, 4)
    assert torch.equal(pool_bags(rows, torch.ones(6, dtype=torch.long)), rows)
    lengths = torch.tensor([1, 0, 2, 1, 1, 1])  # same count, not one-hot: pooled by index_add
    expected = torch.stack([rows[0], torch.zeros(4), rows[1] + rows[2], rows[3], rows[4], rows[5]])
    assert torch.equal(pool_bags(rows, lengths), expected)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_fast_fake_quant_equals_fbgemm(bits):
    w = torch.randn(512, 16) * torch.logspace(-3, 4, 512).unsqueeze(1)
    w[5] = 0.7  # a constant row
    w[6] = 1000.3  # fp16(min) > max: FBGEMM's scale goes negative
    w[7] = 0.0
    w[8, ::2] = -2.5e4  # large magnitudes
    rows = torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(w, bits)
    reference = torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(rows, bits)
    assert torch.equal(fake_quant.fake_quantize_rowwise_(w.clone(), bits), reference)
