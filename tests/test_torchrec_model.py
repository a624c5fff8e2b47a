"""Converted models are real modules, and an artifact directory comes back as a TorchRec DLRM.

- The converted model's tables, scales and biases are buffers: ``state_dict()`` holds them, loads
  into a fresh converted model, and ``.to()`` moves them.
- ``load_torchrec_model`` returns the checkpoint's TorchRec class with TorchRec's quantized EBC
  (FBGEMM) for row-wise, float and (exactly converted) table-wise tables, ROBE-Z modules for shared
  arrays and float MLPs; its logits equal ONNX Runtime's on the stored parity inputs.
- ``pipeline.load`` takes a live ``DLRM`` / ``DLRMTrain`` module, its tables and features read from
  its EBC configs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import DENSE, DIM, make_dlrm, random_inputs, tiny_world
from torch import nn
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRM_Projection, DLRMTrain
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compress import pipeline
from compress.errors import CheckpointError, ModelConfigError
from compress.methods.combined import CombinedEmbeddingBagCollection
from compress.methods.qat_embedding import QuantizedEmbeddingBagCollection
from compress.methods.robe.module import RobeEmbeddingBagCollection
from exporters import load_torchrec_model
from exporters.artifacts import write as artifacts
from exporters.artifacts.read import load_artifacts
from exporters.export import export
from exporters.onnx.from_model import graph_spec_from_artifacts
from exporters.onnx.model import feature_input_names
from exporters.onnx.parity import plain_session, run_session
from exporters.runtime.torchrec_model import FBGEMM, OURS, SHARED, table_placement

ATOL = 1e-5
ROWS = (20, 300, 2000, 5000)  # tiny_world's tables

FINETUNE = "[finetune]\nsteps = 3\nbatch_size = 64\neval_every = 0\n"


def _rule(match: str, method: str, **kw) -> str:
    extra = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in kw.items())
    return f'[[tables]]\nmatch = ["{match}"]\nmethod = "{method}"\n{extra}'


RECIPES = {
    "rowwise": "name = 'r'\n" + _rule("*", "ptq", bits=4, granularity="row") + "[mlp]\n"
    'method = "ptq"\nbits = 8\n',
    "tablewise": "name = 't'\n"
    + _rule("t_cat_0", "ptq", bits=2, granularity="table")
    + _rule("t_cat_1", "ptq", bits=8, granularity="table")
    + _rule("*", "ptq", bits=4, granularity="table")
    + '[mlp]\nmethod = "ptq"\nbits = 4\n',
    "shared": "name = 's'\n"
    + _rule("t_cat_[23]", "share", compression=10.0, block_size=4, array_dtype="int8")
    + _rule("t_cat_1", "share", compression=10.0, block_size=2, group="g2", array_dtype="fp16")
    + FINETUNE,
    "mixed": "name = 'm'\n"
    + _rule("t_cat_0", "keep")
    + _rule("t_cat_1", "fp16")
    + _rule("t_cat_2", "qat", bits=4, granularity="table")
    + _rule("t_cat_3", "share", compression=10.0, block_size=4)
    + '[mlp]\nmethod = "qat"\nbits = 4\n'
    + FINETUNE,
}


def _compress(tmp_path, model_class: str, recipe: str, n: int = 800, seed: int = 0):
    tmp_path.mkdir(parents=True, exist_ok=True)
    ckpt, train, _, _ = tiny_world(tmp_path, model_class, n=n, seed=seed)
    (tmp_path / "recipe.toml").write_text(recipe)
    job = pipeline.load(ckpt)
    result = pipeline.compress(job, pipeline.plan(job, tmp_path / "recipe.toml"), data=train)
    return job, result


def _parity_inputs(arts, set_name: str) -> tuple[dict, torch.Tensor, KeyedJaggedTensor]:
    """One stored parity set: its ORT feeds, and the same inputs for a TorchRec model (ids outside
    their table mapped to row 0, as the export's PyTorch reference did)."""
    entry = arts.manifest["onnx"]["parity"]["reference_data"][set_name]
    feeds = {k: np.load(arts.file(v)) for k, v in entry["inputs"].items()}
    names = feature_input_names(graph_spec_from_artifacts(arts))
    values, lengths = [], []
    for f in arts.spec.feature_names:
        ids = feeds[names[f][0]]
        rows = arts.spec.table_of_feature(f).num_embeddings
        values.append(torch.from_numpy(np.where((ids < 0) | (ids >= rows), 0, ids)))
        lengths.append(torch.from_numpy(feeds[names[f][1]]))
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=list(arts.spec.feature_names), values=torch.cat(values), lengths=torch.cat(lengths)
    )
    return feeds, torch.from_numpy(feeds["dense"]), kjt


def _assert_ort_parity(out) -> None:
    model = load_torchrec_model(out)
    arts = load_artifacts(out)
    session = plain_session(arts.file(arts.onnx["graphs"]["model"]["file"]))
    sets = arts.manifest["onnx"]["parity"]["reference_data"]
    assert set(sets) >= {"one_hot", "multi_hot"}
    for set_name in sets:
        feeds, dense, kjt = _parity_inputs(arts, set_name)
        expected = run_session(session, feeds)["logits"]
        with torch.no_grad():
            got = model(dense, kjt).numpy()
        diff = float(np.abs(got - expected).max())
        assert diff <= ATOL, f"{set_name}: max |TorchRec - ORT| = {diff}"


# ---------------------------------------------------------------------------------------------
# Converted models are module state


def _table_keys(state: dict) -> set[str]:
    return {k for k in state if k.startswith("sparse_arch.")}


@pytest.mark.parametrize("recipe", ["rowwise", "tablewise", "mixed"])
def test_converted_state_dict_round_trips_into_a_fresh_model(tmp_path, recipe) -> None:
    job, result = _compress(tmp_path / "a", "DLRM", RECIPES[recipe])
    state = result.model.state_dict()
    converted = [n for n in state if n.startswith("sparse_arch.") and n.rsplit(".", 1)[1] == "data"]
    assert converted, "the converted tables are not in the state dict"
    for t in job.spec.tables:
        plan = result.plan.table(t.name)
        if plan.method in ("ptq", "qat") and plan.granularity == "row":
            assert any(k.endswith(f"{t.name}.bias") for k in state)
    torch.save(state, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    # a fresh converted model of the same shapes, from other weights
    _, other = _compress(tmp_path / "b", "DLRM", RECIPES[recipe], seed=1)
    dense, kjt = random_inputs(job.module, batch=64, seed=3)
    with torch.no_grad():
        expected = result.model(dense, kjt)
        assert not torch.equal(other.model(dense, kjt), expected)
        other.model.load_state_dict(loaded, strict=True)
        assert torch.equal(other.model(dense, kjt), expected)


def test_to_moves_converted_tables(tmp_path) -> None:
    _, result = _compress(tmp_path, "DLRM", RECIPES["tablewise"])
    ebc = result.model.sparse_arch.embedding_bag_collection
    assert isinstance(ebc, QuantizedEmbeddingBagCollection)
    moved = result.model.to(torch.device("meta"))
    for table in ebc.quantized.values():
        assert table.data.device.type == "meta"
        assert table.scale.device.type == "meta"
    assert all(b.device.type == "meta" for b in moved.buffers())


def test_to_moves_shared_array_lookup_state(tmp_path) -> None:
    _, result = _compress(tmp_path, "DLRM", RECIPES["shared"])
    robe = [m for m in result.model.modules() if isinstance(m, RobeEmbeddingBagCollection)]
    assert robe
    result.model.to(torch.device("meta"))
    for m in robe:
        assert m.weight.device.type == "meta"
        assert m._feature_offsets.device.type == "meta"
        assert m._feature_rows.device.type == "meta"


# ---------------------------------------------------------------------------------------------
# load_torchrec_model


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_torchrec_model_equals_onnx_runtime(tmp_path, recipe) -> None:
    job, result = _compress(tmp_path, "DLRM", RECIPES[recipe])
    out = export(result, tmp_path / "out").path
    _assert_ort_parity(out)
    model = load_torchrec_model(out)
    assert type(model) is DLRM
    placement = table_placement(load_artifacts(out))
    kinds = {n: p.kind for n, p in placement.items()}
    ebc = model.sparse_arch.embedding_bag_collection
    if recipe in ("rowwise", "tablewise"):
        assert set(kinds.values()) == {FBGEMM}
        assert type(ebc) is QuantEBC
        assert [c.name for c in ebc.embedding_bag_configs()] == [t.name for t in job.spec.tables]
    else:
        assert isinstance(ebc, CombinedEmbeddingBagCollection)
        assert SHARED in kinds.values()
        assert any(isinstance(p, RobeEmbeddingBagCollection) for p in ebc.parts)
    if recipe == "mixed":
        assert kinds == {"t_cat_0": FBGEMM, "t_cat_1": FBGEMM, "t_cat_2": FBGEMM, "t_cat_3": SHARED}
    # MLPs are float linears holding the dequantized weights
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(m.weight.dtype == torch.float32 for m in linears)


@pytest.mark.parametrize("model_class", ["DLRM_DCN", "DLRM_Projection"])
def test_torchrec_model_equals_onnx_runtime_other_classes(tmp_path, model_class) -> None:
    _, result = _compress(tmp_path, model_class, RECIPES["mixed"])
    out = export(result, tmp_path / "out").path
    _assert_ort_parity(out)
    model = load_torchrec_model(out)
    assert type(model) is {"DLRM_DCN": DLRM_DCN, "DLRM_Projection": DLRM_Projection}[model_class]


def test_tablewise_tables_convert_exactly_or_stay_ours(tmp_path) -> None:
    """A table-wise INT2 table with max|W| ~ 40000 has scale s ~ 40000: an fp16 value, but its
    bias -2*s overflows fp16, so no FBGEMM row holds it exactly and it stays in our module. A
    table with a subnormal fp16 scale converts exactly. Pooled embeddings equal the converted
    model's bit for bit either way."""
    ckpt, _, _, model = tiny_world(tmp_path, "DLRM", n=400)
    with torch.no_grad():
        bags = model.sparse_arch.embedding_bag_collection.embedding_bags
        bags["t_cat_0"].weight.mul_(40000 / bags["t_cat_0"].weight.abs().max())
        bags["t_cat_1"].weight.mul_(1e-6 / bags["t_cat_1"].weight.abs().max())
    torch.save(model.state_dict(), ckpt)
    recipe = (
        "name = 'big'\n"
        + _rule("t_cat_0", "ptq", bits=2, granularity="table")
        + _rule("t_cat_1", "ptq", bits=4, granularity="table")
        + _rule("*", "ptq", bits=4, granularity="row")
    )
    (tmp_path / "recipe.toml").write_text(recipe)
    job = pipeline.load(ckpt)
    result = pipeline.compress(job, pipeline.plan(job, tmp_path / "recipe.toml"))
    out = artifacts.save(result, tmp_path / "out").path  # no ONNX: logits of 1e9 defeat 1e-5
    arts = load_artifacts(out)
    scale_small = float(np.asarray(arts.tables["t_cat_1"].arrays["scale"]))
    assert 0 < scale_small < 2.0**-14  # an fp16 subnormal
    placement = table_placement(arts)
    assert placement["t_cat_0"].kind == OURS
    assert "bias" in placement["t_cat_0"].reason
    assert {placement[n].kind for n in ("t_cat_1", "t_cat_2", "t_cat_3")} == {FBGEMM}
    loaded = load_torchrec_model(out)
    ebc = loaded.sparse_arch.embedding_bag_collection
    assert isinstance(ebc, CombinedEmbeddingBagCollection)
    ours = [p for p in ebc.parts if isinstance(p, QuantizedEmbeddingBagCollection)]
    assert [t.name for t in ours[0].tables] == ["t_cat_0"]
    _, kjt = random_inputs(job.module, batch=256, max_bag=4, seed=5)
    with torch.no_grad():
        expected = result.model.sparse_arch(kjt)
        assert torch.equal(loaded.sparse_arch(kjt), expected)


def test_torchrec_model_state_dict_round_trips(tmp_path) -> None:
    _, a = _compress(tmp_path / "a", "DLRM", RECIPES["mixed"])
    _, b = _compress(tmp_path / "b", "DLRM", RECIPES["mixed"], seed=1)
    model_a = load_torchrec_model(artifacts.save(a, tmp_path / "a" / "out").path)
    model_b = load_torchrec_model(artifacts.save(b, tmp_path / "b" / "out").path)
    dense, kjt = random_inputs(a.model, batch=64, seed=3)
    with torch.no_grad():
        expected = model_a(dense, kjt)
        assert not torch.equal(model_b(dense, kjt), expected)
        model_b.load_state_dict(model_a.state_dict(), strict=True)
        assert torch.equal(model_b(dense, kjt), expected)


# ---------------------------------------------------------------------------------------------
# pipeline.load of a live module


def test_pipeline_load_takes_a_live_dlrm(tmp_path) -> None:
    ckpt, train, _, model = tiny_world(tmp_path, "DLRM", n=600)
    from_file = pipeline.load(ckpt)
    live = pipeline.load(model)
    assert live.checkpoint is None and live.module is model
    assert live.spec == from_file.spec
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPES["rowwise"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    a = pipeline.compress(from_file, pipeline.plan(from_file, recipe))
    b = pipeline.compress(live, pipeline.plan(live, recipe))
    assert model.training  # the caller's module is left as it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    dense, kjt = random_inputs(model, batch=64)
    with torch.no_grad():
        assert torch.equal(a.model(dense, kjt), b.model(dense, kjt))
    assert b.source == "<DLRM module>"


def test_distillation_leaves_a_live_teacher_as_it_was(tmp_path) -> None:
    model = make_dlrm("DLRM", rows=ROWS).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    job = pipeline.load(model)
    (tmp_path / "r.toml").write_text(RECIPES["shared"])
    # no data: fine-tuned by distillation from the live module
    result = pipeline.compress(job, pipeline.plan(job, tmp_path / "r.toml"), steps=2)
    assert any("distillation" in n for n in result.notes)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pipeline_load_reads_features_from_the_ebc_configs() -> None:
    """A table serving two features: a state dict cannot say so, the module's configs do."""
    model = make_dlrm("DLRM", shared_feature=True)
    job = pipeline.load(model)
    assert job.spec.tables[-1].feature_names == ("cat_a", "cat_b")
    assert job.spec.feature_names == ("cat_0", "cat_1", "cat_2", "cat_a", "cat_b")


def test_pipeline_load_takes_dlrm_train(tmp_path) -> None:
    model = make_dlrm("DLRM_DCN", rows=ROWS)
    job = pipeline.load(DLRMTrain(model))
    assert job.module is model
    assert job.spec.key_prefix == "model."
    assert job.spec.model_class == "DLRM_DCN"
    assert [t.name for t in job.spec.tables] == [f"t_cat_{i}" for i in range(len(ROWS))]
    assert job.spec.dense_in_features == DENSE and job.spec.embedding_dim == DIM


def test_pipeline_load_refuses_what_it_cannot_take() -> None:
    with pytest.raises(CheckpointError, match="not a TorchRec DLRM"):
        pipeline.load(nn.Linear(3, 4))
    with pytest.raises(CheckpointError, match=r"float16; convert the model to float32"):
        pipeline.load(make_dlrm("DLRM").half())
    with pytest.raises(ModelConfigError, match="EmbeddingBagCollection configs"):
        pipeline.load(make_dlrm("DLRM"), {"tables": []})
    model = make_dlrm("DLRM")
    with torch.no_grad():
        model.sparse_arch.embedding_bag_collection.embedding_bags["t_cat_1"].weight[3, 0] = float(
            "nan"
        )
    with pytest.raises(CheckpointError, match="t_cat_1.*NaN"):
        pipeline.load(model)
