"""Full-model ONNX graphs against real TorchRec DLRMs (all three interactions), quantized MLP
layers, the dense/over graphs alone, external data and the parity checker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import make_dlrm
from test_onnx_lookup import fbgemm_rowwise, pack_codes
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compress.methods.fp16 import Fp16Table
from compress.methods.keep import Fp32Table
from compress.methods.robe.graph import RobeTable
from compress.methods.rowwise import RowwiseTable
from compress.methods.tablewise import TablewiseTable
from exporters.onnx.model import (
    PROTOBUF_SAFE_BYTES,
    build_dense_graph,
    build_full_model,
    build_over_graph,
    dummy_inputs,
    export_full_model,
    external_data_location,
    feature_input_names,
    full_model_io,
    needs_external_data,
    plan_external_data,
    save_model,
)
from exporters.onnx.parity import (
    ParityError,
    compare_all,
    compare_outputs,
    ort_session,
    run_session,
)
from exporters.onnx.spec import CrossLayer, DLRMGraphSpec, Linear, TableLookup

ATOL = 1e-5


# ---------------------------------------------------------------- torchrec -> spec (test side)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().copy()


def quantize_table(weight: torch.Tensor, kind: str, seed: int) -> tuple[object, np.ndarray]:
    """(table kind, its dequantized float32 table) for ``kind`` like ``rowwise4`` or ``robe4``."""
    w = weight.detach()
    rows, dim = w.shape
    if kind == "fp32":
        return Fp32Table(_np(w)), _np(w)
    if kind == "fp16":
        half = _np(w).astype(np.float16)
        return Fp16Table(half), half.astype(np.float32)
    if kind.startswith("rowwise"):
        table, deq = fbgemm_rowwise(w.contiguous(), int(kind[7:]))
        return table, deq.numpy()
    if kind.startswith("tablewise"):
        bits = int(kind[9:])
        qmax = (1 << (bits - 1)) - 1
        scale = np.float32(np.abs(_np(w)).max() / qmax)
        q = np.clip(np.rint(_np(w) / scale), -qmax - 1, qmax).astype(np.int64)
        packed = pack_codes(q + (1 << (bits - 1)), bits)
        return TablewiseTable(packed, float(scale), bits), q.astype(np.float32) * scale
    if kind.startswith("robe"):
        z = int(kind[4:])
        array = np.random.default_rng(seed).standard_normal(257, dtype=np.float32)
        robe = RobeTable(array, rows, z, table_offset=1000 * seed, array_name=f"robe{seed}")
        r1, r2, r3 = robe.seeds
        i = np.arange(rows, dtype=np.int64)[:, None] + robe.table_offset
        d = np.arange(dim, dtype=np.int64)[None, :]
        key = (i * r3 + (d // z) * r2 + r1) % robe.prime % (array.shape[0] - z + 1) + d % z
        return robe, array[key]
    raise ValueError(kind)


def quantize_linear(lin: torch.nn.Linear, bits: int | None) -> Linear:
    """Per-output-channel symmetric codes; sets ``lin.weight`` to the dequantized weight."""
    w, b = _np(lin.weight), _np(lin.bias)
    if bits is None:
        return Linear(bias=b, weight=w)
    qmax = (1 << (bits - 1)) - 1
    scales = (np.abs(w).max(axis=1) / qmax).astype(np.float32)
    q = np.clip(np.rint(w / scales[:, None]), -qmax - 1, qmax).astype(np.int8)
    with torch.no_grad():  # the function PyTorch computes: qweight.float() * scales[:, None]
        lin.weight.copy_(torch.from_numpy(q).float() * torch.from_numpy(scales)[:, None])
    return Linear(bias=b, qweight=q, scales=scales, bits=bits)


def _mlp(perceptrons, bits: int | None) -> tuple[Linear, ...]:
    return tuple(quantize_linear(p._linear, bits) for p in perceptrons)


def spec_from_torchrec(model, kinds: list[str], mlp_bits: int | None = None) -> DLRMGraphSpec:
    """Quantize ``model``'s tables (one kind per table) and MLPs, write the dequantized values back
    into ``model`` so PyTorch computes the same function, and describe it as a DLRMGraphSpec."""
    ebc = model.sparse_arch.embedding_bag_collection
    tables = []
    for seed, (cfg, kind) in enumerate(zip(ebc.embedding_bag_configs(), kinds, strict=True)):
        bag = ebc.embedding_bags[cfg.name]
        table_kind, deq = quantize_table(bag.weight, kind, seed)
        with torch.no_grad():
            bag.weight.copy_(torch.from_numpy(deq))
        tables.append(
            TableLookup(cfg.name, tuple(cfg.feature_names), cfg.embedding_dim, table_kind)
        )
    over = model.over_arch.model
    extra: dict = {}
    if type(model).__name__ == "DLRM_DCN":
        cn = model.inter_arch.crossnet
        extra["crossnet"] = tuple(
            CrossLayer(_np(w), _np(v), _np(b))
            for w, v, b in zip(cn.W_kernels, cn.V_kernels, cn.bias, strict=True)
        )
    elif type(model).__name__ == "DLRM_Projection":
        extra["branch1"] = _mlp(model.inter_arch.interaction_branch1.model._mlp, mlp_bits)
        extra["branch2"] = _mlp(model.inter_arch.interaction_branch2.model._mlp, mlp_bits)
    return DLRMGraphSpec(
        model_class=type(model).__name__,
        dense_in_features=model.dense_arch.model._mlp[0]._linear.in_features,
        features=tuple(model.sparse_arch.sparse_feature_names),
        tables=tuple(tables),
        dense_arch=_mlp(model.dense_arch.model._mlp, mlp_bits),
        over_arch=(*_mlp(over[0]._mlp, mlp_bits), quantize_linear(over[1], mlp_bits)),
        **extra,
    )


def make_batch(spec: DLRMGraphSpec, batch: int = 24, seed: int = 0, force_empty: bool = True):
    """Feeds for the ONNX model and the same batch as (dense, KJT) for TorchRec. Bags hold 0..4
    ids; with ``force_empty`` every feature gets a leading, a middle and two trailing empty bags,
    without it every bag holds at least one id."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(batch, spec.dense_in_features, generator=g)
    feeds = {"dense": dense.numpy()}
    names = feature_input_names(spec)
    keys, lengths, values = [], [], []
    for f in spec.features:
        ln = torch.randint(0 if force_empty else 1, 5, (batch,), generator=g)
        if force_empty:
            ln[[0, batch // 2, batch - 2, batch - 1] if batch > 3 else 0] = 0
        v = torch.randint(0, spec.table_of(f).num_rows, (int(ln.sum()),), generator=g)
        keys.append(f)
        lengths.append(ln)
        values.append(v)
        feeds[names[f][0]], feeds[names[f][1]] = v.numpy(), ln.numpy()
    kjt = KeyedJaggedTensor.from_lengths_sync(keys, torch.cat(values), torch.cat(lengths))
    return feeds, dense, kjt


def _logits(model_or_path, feeds) -> np.ndarray:
    return run_session(ort_session(model_or_path, threads=1), feeds)["logits"]


# ---------------------------------------------------------------- full-model parity

CASES = [
    ("DLRM", 8, ["rowwise4", "tablewise4", "robe4", "fp16"], None),
    ("DLRM", 16, ["rowwise8", "tablewise2", "robe1", "fp32"], 8),
    ("DLRM_DCN", 8, ["rowwise2", "tablewise8", "fp32", "robe4"], None),
    ("DLRM_DCN", 16, ["tablewise4", "rowwise4", "robe1", "fp16"], 4),
    ("DLRM_Projection", 8, ["fp32", "rowwise4", "tablewise4", "robe4"], None),
    ("DLRM_Projection", 16, ["rowwise8", "fp16", "tablewise2", "rowwise2"], 4),
]


@pytest.mark.parametrize(("model_class", "dim", "kinds", "mlp_bits"), CASES)
def test_full_model_matches_torchrec(model_class, dim, kinds, mlp_bits) -> None:
    model = make_dlrm(model_class, seed=dim, dim=dim).eval()
    spec = spec_from_torchrec(model, kinds, mlp_bits)
    onnx_model = build_full_model(spec)
    feeds, dense, kjt = make_batch(spec, seed=dim)
    with torch.no_grad():
        expected = model(dense, kjt).numpy()
    got = _logits(onnx_model, feeds)
    result = compare_outputs(expected, got, ATOL, "logits")
    assert got.shape == (24, 1) and result["max_abs_diff"] <= ATOL
    if mlp_bits is not None:
        init = {t.name: t for t in onnx_model.graph.initializer}
        width = onnx.TensorProto.INT8 if mlp_bits == 8 else onnx.TensorProto.INT4
        assert init["dense_arch.0.qweight_t"].data_type == width
        assert all(n.op_type != "Gemm" for n in onnx_model.graph.node)


def test_table_serving_two_features_and_batch_of_one() -> None:
    model = make_dlrm("DLRM", seed=3, shared_feature=True).eval()
    spec = spec_from_torchrec(model, ["rowwise4", "fp32", "tablewise4", "rowwise4"])
    assert spec.features[-2:] == ("cat_a", "cat_b")
    onnx_model = build_full_model(spec)
    # both row-wise tables read as stored, t_cat_3 once though two features use it
    rowwise = [t for t in spec.tables if isinstance(t.kind, RowwiseTable)]
    assert [t.name for t in rowwise] == ["t_cat_0", "t_cat_3"]
    names = [t.name for t in onnx_model.graph.initializer]
    assert names.count("emb.t_cat_0.packed") == 1 and names.count("emb.t_cat_3.packed") == 1
    assert names.count("emb.t_cat_3.scale") == 1 and names.count("emb.t_cat_3.bias") == 1
    session = ort_session(onnx_model, threads=1)
    for batch, force_empty in ((24, True), (1, False), (1, True)):
        feeds, dense, kjt = make_batch(spec, batch=batch, seed=batch, force_empty=force_empty)
        with torch.no_grad():
            expected = model(dense, kjt).numpy()
        compare_outputs(expected, run_session(session, feeds)["logits"], ATOL)


@pytest.mark.parametrize("model_class", ["DLRM", "DLRM_DCN", "DLRM_Projection"])
def test_dense_and_over_graphs_match_torchrec(model_class: str) -> None:
    model = make_dlrm(model_class, seed=5).eval()
    spec = spec_from_torchrec(model, ["fp32"] * 4, mlp_bits=8)
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(10, spec.dense_in_features, generator=g)
    sparse = torch.randn(10, len(spec.features), spec.embedding_dim, generator=g)
    with torch.no_grad():
        emb = model.dense_arch(dense)
        logits = model.over_arch(model.inter_arch(emb, sparse))
    got = run_session(ort_session(build_dense_graph(spec), threads=1), {"dense": dense.numpy()})
    compare_all({"dense_embedding": emb.numpy()}, got, ATOL)
    feeds = {"dense_embedding": emb.numpy(), "sparse_embedding": sparse.numpy()}
    got = run_session(ort_session(build_over_graph(spec), threads=1), feeds)
    compare_all({"logits": logits.numpy()}, got, ATOL)


def test_io_declaration_and_sanitized_names() -> None:
    model = make_dlrm("DLRM", seed=1).eval()
    spec = spec_from_torchrec(model, ["fp32"] * 4)
    renamed = DLRMGraphSpec(
        **{
            **spec.__dict__,
            "features": ("cat-0", "cat.1", "2cat", "cat_3"),
            "tables": tuple(
                TableLookup(t.name, (f,), t.dim, t.kind)
                for t, f in zip(spec.tables, ("cat-0", "cat.1", "2cat", "cat_3"), strict=True)
            ),
        }
    )
    names = feature_input_names(renamed)
    assert names["cat-0"] == ("cat_0__values", "cat_0__lengths")
    assert names["2cat"] == ("_2cat__values", "_2cat__lengths")
    onnx_model = build_full_model(renamed)
    inputs, outputs = full_model_io(renamed)
    assert [i.name for i in onnx_model.graph.input] == [d.name for d in inputs]
    assert [o.name for o in onnx_model.graph.output] == ["logits"] == [d.name for d in outputs]
    dims = [d.dim_param for d in onnx_model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", ""]
    feeds = dummy_inputs(renamed, batch=5)
    assert set(feeds) == {d.name for d in inputs}
    assert _logits(onnx_model, feeds).shape == (5, 1)
    clash = DLRMGraphSpec(
        **{
            **renamed.__dict__,
            "features": ("a-b", "a.b", "2cat", "cat_3"),
            "tables": tuple(
                TableLookup(t.name, (f,), t.dim, t.kind)
                for t, f in zip(spec.tables, ("a-b", "a.b", "2cat", "cat_3"), strict=True)
            ),
        }
    )
    with pytest.raises(ValueError, match="both map to input"):
        feature_input_names(clash)


# ---------------------------------------------------------------- external data


def test_external_data_routing_is_decided_from_sizes() -> None:
    assert needs_external_data(2**31, threshold=None)
    assert needs_external_data(2**31, threshold=2**40)
    assert needs_external_data(PROTOBUF_SAFE_BYTES, threshold=None)
    assert not needs_external_data(2**20, threshold=None)
    assert needs_external_data(2**21, threshold=2**20) and not needs_external_data(10, 2**20)
    gb = 2**30
    assert plan_external_data({"a": 3 * gb, "b": 10}, None) == {"a"}
    # each fits alone, together they do not: move the largest until the rest fits
    assert plan_external_data({"a": gb, "b": gb // 2, "c": gb, "d": 10}, None) == {"a"}
    assert plan_external_data({"a": gb, "b": gb, "c": gb, "d": 10}, None) == {"a", "b"}
    assert plan_external_data({"a": 2**21, "b": 100}, 2**20) == {"a"}


def test_table_over_2gb_is_routed_without_allocating_it() -> None:
    model = make_dlrm("DLRM", seed=1).eval()
    spec = spec_from_torchrec(model, ["fp32"] * 4)
    # a 2 GiB read-only view of one row: nbytes says 2**31, no memory behind it
    huge = np.broadcast_to(np.zeros((1, 8), np.float32), (2**26, 8))
    assert huge.nbytes == 2**31
    tables = (*spec.tables[:3], TableLookup("huge", ("cat_3",), 8, Fp32Table(huge)))
    big = DLRMGraphSpec(**{**spec.__dict__, "tables": tables})
    from exporters.onnx.lookup import add_gather
    from exporters.onnx.spec import GraphBuilder

    gb = GraphBuilder()
    add_gather(gb, tables[3], gb.add_input("ids", onnx.TensorProto.INT64, ["n"]))
    assert plan_external_data(gb.initializer_sizes(), None) == {"emb.huge.weight"}
    with pytest.raises(ValueError, match="export_full_model"):
        build_full_model(big)


def test_big_table_goes_to_external_data(tmp_path: Path) -> None:
    rows = 65536  # 65536 x 8 float32 = 2 MiB, over a 1 MiB threshold
    model = make_dlrm("DLRM", seed=2, rows=(7, 50, 300, rows)).eval()
    spec = spec_from_torchrec(model, ["rowwise4", "tablewise4", "fp16", "fp32"])
    feeds, dense, kjt = make_batch(spec, seed=4)
    with torch.no_grad():
        expected = model(dense, kjt).numpy()
    in_memory = build_full_model(spec)
    before = in_memory.SerializeToString()
    threshold = 2**20
    for path in (
        save_model(in_memory, tmp_path / "saved.onnx", external_data_threshold_bytes=threshold),
        export_full_model(
            spec, tmp_path / "exported.onnx", external_data_threshold_bytes=threshold
        ),
    ):
        data = path.parent / external_data_location(path)
        assert data.exists() and data.stat().st_size >= rows * 8 * 4
        assert path.stat().st_size < threshold
        onnx.checker.check_model(str(path), full_check=True)
        stored = onnx.load(str(path), load_external_data=False)
        ext = [
            t.name for t in stored.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
        ]
        assert ext == ["emb.t_cat_3.weight"]
        compare_outputs(expected, _logits(path, feeds), ATOL, f"logits/{path.name}")
    assert in_memory.SerializeToString() == before  # save_model leaves the model alone
    config = {p.key: p.value for p in in_memory.metadata_props}
    assert "session.qdq_matmulnbits_accuracy_level" in config["dqrm.ort_session_config"]
    # small enough: no data file, and a stale one from the earlier save is removed
    path = save_model(in_memory, tmp_path / "saved.onnx", external_data_threshold_bytes=None)
    assert not (tmp_path / "saved.onnx.data").exists()
    compare_outputs(expected, _logits(path, feeds), ATOL)
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == ["exported.onnx", "exported.onnx.data", "saved.onnx"]


# ---------------------------------------------------------------- validation helpers


def test_compare_outputs_fails_hard_and_names_the_output() -> None:
    ref = np.zeros((4, 1), np.float32)
    act = ref.copy()
    act[2, 0] = 1e-3
    with pytest.raises(ParityError, match=r"'logits': max abs diff 0.001 .*\[2, 0\]"):
        compare_outputs(ref, act, 1e-5, "logits")
    ok = compare_outputs(ref, act, 1e-2, "logits")
    assert ok["max_abs_diff"] == pytest.approx(1e-3) and ok["argmax"] == (2, 0)
    act[0, 0] = np.nan
    with pytest.raises(ParityError, match="inf"):
        compare_outputs(ref, act, 1.0, "logits")
    with pytest.raises(ParityError, match="shape"):
        compare_outputs(ref, ref[:2], 1.0)
    with pytest.raises(ParityError, match="missing"):
        compare_all({"logits": ref}, {"other": ref}, 1.0)


def test_linear_validation_rejects_out_of_range_codes() -> None:
    bad = Linear(
        bias=np.zeros(2, np.float32),
        qweight=np.full((2, 3), 9, np.int8),
        scales=np.ones(2, np.float32),
        bits=4,
    )
    with pytest.raises(ValueError, match="4-bit range"):
        bad.validate("layer")
