"""One strategy per TorchRec DLRM class (:mod:`compress.io.dlrm_classes`): its key templates are
TorchRec's real keys, inference round-trips, an unknown class is a clear error, and adding a class
is one registration."""

from __future__ import annotations

import ast
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import make_dlrm
from torchrec.models.dlrm import DLRM, DLRMTrain

from compress.errors import CheckpointError, DqrmError, ModelConfigError
from compress.io.architecture import infer_spec, load_model_config
from compress.io.dlrm_classes import (
    UnknownModelClassError,
    detect,
    known_classes,
    register,
    strategy_for,
    strategy_of_module,
    unregister,
)
from compress.io.dlrm_classes.base import (
    TRAIN_PREFIX,
    ebc_of,
    table_weight_key,
    unwrap,
)
from compress.io.dlrm_classes.dlrm import DotDLRM
from compress.io.live_model import spec_of_module
from compress.io.model import build_model
from compress.io.model_spec import DLRMSpec, TableSpec
from compress.plan import crossnet_bytes, linear_layers
from exporters.onnx.dense import GRAPH_INTERACTIONS, graph_interaction
from exporters.onnx.from_model import graph_spec_from_model
from exporters.onnx.model import build_full_model, dummy_inputs

ROOT = Path(__file__).resolve().parents[1]
BUILT_IN = ("DLRM", "DLRM_DCN", "DLRM_Projection")


def expected_shapes(spec: DLRMSpec) -> dict[str, tuple[int, ...]]:
    """Every state-dict key and shape of a ``spec`` model, from its strategy's templates alone."""
    strategy = strategy_for(spec.model_class)
    shapes = {table_weight_key(t.name): (t.num_embeddings, t.embedding_dim) for t in spec.tables}
    for layers in strategy.linear_groups(spec).values():
        for layer in layers:
            shapes[f"{layer.name}.weight"] = (layer.out_features, layer.in_features)
            shapes[f"{layer.name}.bias"] = (layer.out_features,)
    for cross in strategy.cross_layers(spec):
        shapes.update(cross.shapes())
    return {spec.key_prefix + k: v for k, v in shapes.items()}


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "DLRMTrain"])
@pytest.mark.parametrize("model_class", BUILT_IN)
def test_key_templates_are_torchrecs_keys(model_class: str, wrapped: bool) -> None:
    dlrm = make_dlrm(model_class)
    module = DLRMTrain(dlrm) if wrapped else dlrm
    state = module.state_dict()
    spec = infer_spec(state, source="test")
    assert spec.model_class == model_class
    assert spec.key_prefix == (TRAIN_PREFIX if wrapped else "")
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_shapes(spec)
    inner, prefix = unwrap(module)
    assert inner is dlrm and prefix == spec.key_prefix
    assert ebc_of(inner) is dlrm.sparse_arch.embedding_bag_collection
    assert strategy_of_module(inner).name == model_class
    dcn_bytes = sum(t.numel() * 4 for k, t in state.items() if ".crossnet." in k)
    assert crossnet_bytes(spec) == dcn_bytes


def _spec(model_class: str) -> DLRMSpec:
    """A spec with sizes unlike the test helpers' (three features over two tables)."""
    params = {
        "DLRM": {},
        "DLRM_DCN": {"dcn_num_layers": 3, "dcn_low_rank_dim": 5},
        "DLRM_Projection": {
            "interaction_branch1_layer_sizes": (20, 12),
            "interaction_branch2_layer_sizes": (9, 18),
        },
    }[model_class]
    return DLRMSpec(
        model_class=model_class,
        tables=(
            TableSpec("t_a", 11, 6, ("a",)),
            TableSpec("t_bc", 13, 6, ("b", "c")),
        ),
        dense_in_features=4,
        dense_arch_layer_sizes=(10, 6),
        over_arch_layer_sizes=(7, 5, 1),
        **params,
    )


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "DLRMTrain"])
@pytest.mark.parametrize("model_class", BUILT_IN)
def test_inference_round_trips(model_class: str, wrapped: bool) -> None:
    spec = _spec(model_class)
    module = build_model(spec)
    assert type(module) is strategy_for(model_class).module_type
    state = (DLRMTrain(module) if wrapped else module).state_dict()
    config = {
        "tables": [{"name": t.name, "feature_names": list(t.feature_names)} for t in spec.tables]
    }
    inferred = infer_spec(state, source="test", model_config=config)
    assert inferred == replace(spec, key_prefix=TRAIN_PREFIX if wrapped else "")
    assert detect({k.removeprefix(inferred.key_prefix): v for k, v in state.items()}).name == (
        model_class
    )


@pytest.mark.parametrize("model_class", BUILT_IN)
def test_widths_and_dummy_inputs_match_the_module(model_class: str) -> None:
    spec = _spec(model_class)
    strategy = strategy_for(model_class)
    module = build_model(spec).eval()
    batch = strategy.dummy_inputs(spec, 9, seed=3).to_batch(spec.feature_names)
    with torch.no_grad():
        dense = module.dense_arch(batch.dense)
        sparse = module.sparse_arch(batch.sparse)
        assert sparse.shape == (9, spec.num_sparse_features, spec.embedding_dim)
        interaction = module.inter_arch(dense, sparse)
        assert interaction.shape == (9, strategy.over_in_width(spec))
        assert module(batch.dense, batch.sparse).shape == (9, 1)
    assert strategy.parity_atol == 1e-5
    linears = {n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
    assert [layer.name for layer in linear_layers(spec)] == [
        n for n, m in module.named_modules() if n in linears
    ]


def test_dcn_without_its_first_cross_layer_names_the_key() -> None:
    state = make_dlrm("DLRM_DCN").state_dict()
    del state["inter_arch.crossnet.W_kernels.0"]
    with pytest.raises(CheckpointError, match=r"missing inter_arch\.crossnet\.W_kernels\.0"):
        infer_spec(state, source="ckpt.pt")


def test_unknown_class_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelClassError) as info:
        strategy_for("DLRM_Wide")
    assert isinstance(info.value, DqrmError)
    assert str(info.value) == (
        "unknown model class 'DLRM_Wide'; known classes: DLRM, DLRM_DCN, DLRM_Projection"
    )
    with pytest.raises(UnknownModelClassError, match="known classes: DLRM, DLRM_DCN"):
        build_model(replace(_spec("DLRM"), model_class="DLRM_Wide"), device="meta")
    config = tmp_path / "model_config.json"
    config.write_text(json.dumps({"model_class": "DLRM_Wide", "tables": []}))
    with pytest.raises(ModelConfigError, match="model_class must be one of .*DLRM_Projection"):
        load_model_config(config)
    with pytest.raises(CheckpointError, match=r"DLRM, DLRM_DCN, DLRM_Projection or DLRMTrain"):
        strategy_of_module(torch.nn.Linear(2, 2))


class WideDLRM(DLRM):
    """A TorchRec DLRM subclass standing in for a new model class."""


class WideStrategy(DotDLRM):
    name = "WideDLRM"
    module_type = WideDLRM


@pytest.fixture
def wide() -> WideStrategy:
    strategy = register(WideStrategy())
    yield strategy
    unregister(strategy.name)


def test_adding_a_class_is_one_registration(wide: WideStrategy, tmp_path: Path) -> None:
    assert known_classes() == (*BUILT_IN, "WideDLRM")
    with pytest.raises(UnknownModelClassError, match="DLRM_Projection, WideDLRM$"):
        strategy_for("Nope")
    with pytest.raises(ValueError, match="already registered"):
        register(WideStrategy())
    spec = replace(_spec("DLRM"), model_class="WideDLRM")
    module = build_model(spec).eval()
    assert type(module) is WideDLRM
    assert strategy_of_module(module) is wide  # the most derived class wins over DLRM
    _, live_spec = spec_of_module(module)
    assert live_spec == spec  # a live module's spec comes from its strategy
    assert linear_layers(spec) == linear_layers(_spec("DLRM"))
    tables = [{"name": t.name, "feature_names": list(t.feature_names)} for t in spec.tables]
    config = tmp_path / "model_config.json"
    config.write_text(json.dumps({"tables": tables}))
    state = module.state_dict()  # the same keys as a DLRM's: the model config tells them apart
    assert infer_spec(state, source="ckpt", model_config=load_model_config(config)) == _spec("DLRM")
    config.write_text(json.dumps({"model_class": "WideDLRM", "tables": tables}))
    assert infer_spec(state, source="ckpt", model_config=load_model_config(config)) == spec
    # the exporters find its graph interaction through the strategy, by name
    gspec = graph_spec_from_model(module, spec)
    assert graph_interaction(gspec) is GRAPH_INTERACTIONS["dot"]
    feeds = dummy_inputs(gspec, batch=6, seed=1)
    session = ort.InferenceSession(build_full_model(gspec).SerializeToString())
    got = session.run(None, feeds)[0]
    assert got.shape == (6, 1) and np.isfinite(got).all()


def test_the_registry_is_restored_after_unregister() -> None:
    assert known_classes() == BUILT_IN
    with pytest.raises(UnknownModelClassError):
        unregister("WideDLRM")


def _class_names_outside_strategies() -> dict[str, list[str]]:
    names = {*BUILT_IN, "DLRMTrain"}
    found: dict[str, list[str]] = {}
    for pkg in ("compress", "exporters"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("compress/io/dlrm_classes/"):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and node.value in names:
                    found.setdefault(rel, []).append(node.value)
                if isinstance(node, ast.ImportFrom) and node.module == "torchrec.models.dlrm":
                    found.setdefault(rel, []).extend(f"import {a.name}" for a in node.names)
    return found


def test_no_module_outside_the_strategies_names_a_model_class() -> None:
    # the demo chooses which class to build: a value passed through, not a decision on one
    assert _class_names_outside_strategies() == {"compress/demo.py": ["DLRM"]}
