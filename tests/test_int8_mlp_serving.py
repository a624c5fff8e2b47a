"""MLPs served with INT8 activations (``[mlp] activations = "int8"``): ONNX Runtime's integer
kernels compute what the fine-tuned PyTorch model computes, bit for bit in the integer pipeline and
within the parity bound (1e-5) on the logits; the recipe key is validated; default graphs are
unchanged (float32 activations, no integer kernel)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import make_dlrm, random_inputs, tiny_world
from onnx import TensorProto, helper, numpy_helper
from torch.nn import functional as F  # noqa: N812

from compress import pipeline
from compress.data.npz import load_npz
from compress.errors import RecipeError, SettingError
from compress.io.architecture import infer_spec
from compress.methods.apply_plan import convert_model, prepare_model
from compress.methods.qat_linear import (
    FakeQuantLinear,
    QuantizedLinear,
    activation_quantizers,
    calibrate_activations,
)
from compress.plan import make_plan
from compress.quant.activation import (
    activation_codes,
    activation_qparams,
    integer_linear,
    integer_linear_ste,
)
from compress.quant.per_channel import channel_quantize
from compress.recipe.parse import parse_recipe
from compress.recipe.toml_out import recipe_to_toml
from compress.train.calibration import NEEDS_DATA
from compress.train.distill import sample_inputs
from compress.train.validation import split_validation
from exporters.export import export
from exporters.onnx.from_model import graph_spec_from_model
from exporters.onnx.model import build_dense_graph, build_full_model, feature_input_names
from exporters.onnx.parity import plain_session, run_session, serving_session, verify_parity
from exporters.runtime.predictor import Predictor, dataset_feeds
from exporters.runtime.torchrec_model import load_torchrec_model

#: The parity bound of graphs with INT8 activations: the model class's (1e-5 on the logits).
BOUND = 1e-5


def recipe_text(mlp_method: str = "ptq", bits: int = 4, activations: str | None = "int8") -> str:
    acts = f'activations = "{activations}"\n' if activations is not None else ""
    finetune = "[finetune]\nsteps = 6\nbatch_size = 256\neval_every = 3\n"
    return (
        'name = "a8"\n[[tables]]\nmatch = ["*"]\nmethod = "ptq"\nbits = 4\ngranularity = "row"\n'
        f'[mlp]\nmethod = "{mlp_method}"\nbits = {bits}\n{acts}'
        + (finetune if mlp_method == "qat" else "")
    )


class _Batch:
    def __init__(self, dense: torch.Tensor, sparse) -> None:  # noqa: ANN001 - a KJT
        self.dense, self.sparse = dense, sparse


def calibrated_model(model_class: str, mlp_method: str, bits: int):
    """A converted-ready prepared model of ``model_class`` with INT8 activations, calibrated on
    random batches; returns ``(model, prepared, spec)``."""
    model = make_dlrm(model_class).eval()
    spec = infer_spec(model.state_dict(), source="test")
    plan = make_plan(parse_recipe(recipe_text(mlp_method, bits)), spec)
    prepared, _ = prepare_model(model, spec, plan)
    batches = [_Batch(*random_inputs(model, batch=128, seed=s)) for s in range(3)]
    assert calibrate_activations(prepared, batches) == len(activation_quantizers(prepared)) > 0
    return model, prepared, spec


# ---------------------------------------------------------------------------------------------
# The integer pipeline against ONNX Runtime's kernels


def _one_layer_graph(scale: float, zero: int, qweight: np.ndarray, scales, bias) -> bytes:
    inits = [
        numpy_helper.from_array(np.asarray(scale, np.float32), "a_scale"),
        numpy_helper.from_array(np.asarray(zero, np.uint8), "a_zero"),
        numpy_helper.from_array(np.ascontiguousarray(qweight.T), "w"),
        numpy_helper.from_array(scales, "w_scales"),
        numpy_helper.from_array(bias, "bias"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "a_scale", "a_zero"], ["xq"]),
        helper.make_node(
            "MatMulIntegerToFloat",
            ["xq", "w", "a_scale", "w_scales", "a_zero", "", "bias"],
            ["y"],
            domain="com.microsoft",
        ),
    ]
    k = qweight.shape[1]
    graph = helper.make_graph(
        nodes,
        "one_layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", qweight.shape[0]])],
        inits,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


@pytest.mark.parametrize(("in_features", "bits"), [(367, 4), (64, 8), (700, 8)])
def test_integer_linear_equals_onnxruntime_bit_for_bit(in_features: int, bits: int) -> None:
    """QuantizeLinear + MatMulIntegerToFloat (uint8 x int8 -> int32, times a_scale*w_scale, plus
    bias) equals :func:`integer_linear` exactly, also past float32's exact-sum range (700 inputs
    at INT8 take the float64 sum)."""
    g = torch.Generator().manual_seed(in_features)
    x = torch.randn(512, in_features, generator=g) * 3
    w = torch.randn(96, in_features, generator=g) / in_features**0.5
    bias = torch.randn(96, generator=g)
    qweight, scales = channel_quantize(w, bits)
    scale, zero = activation_qparams(float(x.min()) * 0.8, float(x.max()) * 0.9)  # some clip
    got = plain_session(
        _one_layer_graph(scale, zero, qweight.numpy(), scales.numpy(), bias.numpy())
    )
    ours = integer_linear(
        x, qweight, scales, bias, torch.tensor(scale), torch.tensor(float(zero)), bits
    )
    theirs = run_session(got, {"x": x.numpy()})["y"]
    assert np.array_equal(ours.numpy(), theirs)


def test_activation_qparams_hold_zero_and_the_range() -> None:
    scale, zero = activation_qparams(0.0, 5.1)  # a ReLU output: zero point 0
    assert zero == 0 and scale == pytest.approx(5.1 / 255)
    scale, zero = activation_qparams(-1.0, 3.0)
    assert 0 < zero < 255 and scale == pytest.approx(4.0 / 255)
    codes = activation_codes(
        torch.tensor([-1.0, 0.0, 3.0, 9.0]), torch.tensor(scale), torch.tensor(float(zero))
    )
    assert codes[1] == 0  # 0 is a code exactly
    assert codes[3] == 255 - zero  # clamped
    assert activation_qparams(0.0, 0.0) == (1.0, 0)


def test_straight_through_gradients() -> None:
    """The backward of the integer forward is that of ``x_hat @ W_hat.T + bias`` (no gradient
    where ``x`` was clamped), the weight's gradient passing its quantizer unchanged."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(32, 20, generator=g) * 2).requires_grad_()
    w = torch.randn(8, 20, generator=g).requires_grad_()
    b = torch.randn(8, generator=g).requires_grad_()
    qweight, scales = channel_quantize(w.detach(), 4)
    s, z = activation_qparams(-1.0, 2.0)  # values beyond [-1, 2] clamp
    s_t, z_t = torch.tensor(s), torch.tensor(float(z))
    y = integer_linear_ste(x, w, b, qweight, scales, s_t, z_t, 4)
    grad = torch.randn_like(y)
    y.backward(grad)
    rounded = torch.round(x.detach() / s_t) + z_t
    inside = (rounded >= 0) & (rounded <= 255)
    x_hat = activation_codes(x.detach(), s_t, z_t) * s_t
    w_hat = qweight.float() * scales[:, None]
    assert torch.allclose(x.grad, (grad @ w_hat) * inside)
    assert torch.allclose(w.grad, grad.T @ x_hat)
    assert torch.allclose(b.grad, grad.sum(0))
    assert bool((~inside).any()) and bool((x.grad[~inside] == 0).all())
    assert torch.allclose(y, F.linear(x_hat, w_hat, b), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The fake-quant PyTorch model against the ONNX graph


@pytest.mark.parametrize(
    ("model_class", "mlp_method", "bits"),
    [("DLRM", "qat", 4), ("DLRM", "ptq", 8), ("DLRM_DCN", "qat", 8), ("DLRM_Projection", "qat", 4)],
)
def test_int8_graph_matches_fake_quant_model(model_class: str, mlp_method: str, bits: int) -> None:
    """The fine-tuning (fake-quant) forward, the converted model and ONNX Runtime (plain and
    serving sessions) agree within the bound on random one-hot and multi-hot inputs; the dense
    arch, integers from end to end, bit for bit."""
    _, prepared, spec = calibrated_model(model_class, mlp_method, bits)
    prepared.eval()
    fake_quant = [m for m in prepared.modules() if isinstance(m, FakeQuantLinear)]
    assert all(m.activations == "int8" for m in fake_quant) and (mlp_method == "ptq") != bool(
        fake_quant
    )
    sets = {"one_hot": sample_inputs(spec, 600, 1), "multi_hot": None}
    dense, kjt = random_inputs(prepared, batch=600, max_bag=3, seed=7)
    with torch.no_grad():
        before = {"multi_hot": prepared(dense, kjt)}
        b = sets["one_hot"].to_batch(spec.feature_names)
        before["one_hot"] = prepared(b.dense, b.sparse)
        converted = convert_model(prepared)
        after = {"multi_hot": converted(dense, kjt), "one_hot": converted(b.dense, b.sparse)}
    for name in before:  # convert computes exactly what fine-tuning computed
        assert torch.equal(before[name], after[name]), name
    gspec = graph_spec_from_model(converted, spec)
    assert all(layer.int8_activations for layer in gspec.dense_arch + gspec.over_arch)
    model = build_full_model(gspec)
    inputs = feature_input_names(gspec)
    multi = {"dense": dense.numpy()}
    for f, (values, lengths) in inputs.items():
        multi[values], multi[lengths] = kjt[f].values().numpy(), kjt[f].lengths().numpy()
    feeds = {"one_hot": dataset_feeds(sets["one_hot"], inputs), "multi_hot": multi}
    for open_session in (plain_session, serving_session):
        session = open_session(model, threads=2)
        for name, feed in feeds.items():
            got = run_session(session, feed)["logits"]
            diff = np.abs(got - after[name].reshape(-1, 1).numpy())
            assert diff.max() <= BOUND, (name, diff.max())
    dense_graph = plain_session(build_dense_graph(gspec))
    with torch.no_grad():
        expected = converted.dense_arch(dense).numpy()
    assert np.array_equal(
        run_session(dense_graph, {"dense": dense.numpy()})["dense_embedding"], expected
    )


def test_int8_graph_runs_mlps_on_integer_kernels() -> None:
    _, prepared, spec = calibrated_model("DLRM", "ptq", 4)
    gspec = graph_spec_from_model(convert_model(prepared), spec)
    ops = [n.op_type for n in build_full_model(gspec).graph.node]
    layers = len(gspec.dense_arch) + len(gspec.over_arch)
    assert ops.count("MatMulIntegerToFloat") == ops.count("QuantizeLinear") == layers
    assert ops.count("MatMul") == 1  # the interaction's Gram matrix only


def test_default_graphs_unchanged() -> None:
    """Without the key: float32 activations, no quantizer in the model or its state dict, no
    integer kernel or activation scale in the graph, the plan and recipe TOML as before."""
    model = make_dlrm().eval()
    spec = infer_spec(model.state_dict(), source="test")
    recipe = parse_recipe(recipe_text("ptq", 4, activations=None))
    assert recipe.mlp.activations == "fp32" and "activations" not in recipe_to_toml(recipe)
    plan = make_plan(recipe, spec)
    assert "activations" not in plan.to_json()["mlp"]
    converted = convert_model(prepare_model(model, spec, plan)[0])
    assert not activation_quantizers(converted)
    assert not [k for k in converted.state_dict() if "input_quant" in k]
    gspec = graph_spec_from_model(converted, spec)
    assert not any(layer.int8_activations for layer in gspec.dense_arch + gspec.over_arch)
    graph = build_full_model(gspec)
    ops = {n.op_type for n in graph.graph.node}
    assert not ops & {"QuantizeLinear", "MatMulIntegerToFloat", "MatMulInteger"}
    assert not [i.name for i in graph.graph.initializer if "act_" in i.name]
    weight_ops = [n.op_type for n in graph.graph.node if n.output[0].startswith("dense_arch.0.")]
    assert weight_ops[:2] == ["Cast", "Mul"]  # INT4 codes dequantized, float32 MatMul


# ---------------------------------------------------------------------------------------------
# Recipe key, plan bytes, calibration


@pytest.mark.parametrize(
    ("mlp", "message"),
    [
        ('method = "ptq"\nbits = 4\nactivations = "int16"', "activations must be one of"),
        ('method = "ptq"\nbits = 4\nactivations = 8', "activations must be one of"),
        ('method = "keep"\nactivations = "int8"', "'activations' does not apply to method 'keep'"),
        ('method = "ptq"\nbits = 4\nactivation = "int8"', "activation"),
    ],
)
def test_recipe_key_validation(mlp: str, message: str) -> None:
    text = f'name = "a"\n[[tables]]\nmatch = ["*"]\nmethod = "ptq"\nbits = 4\n[mlp]\n{mlp}\n'
    with pytest.raises(RecipeError, match=rf"r\.toml: mlp: .*{message}"):
        parse_recipe(text, source="r.toml")


def test_recipe_round_trip_and_plan_bytes() -> None:
    recipe = parse_recipe(recipe_text("qat", 8))
    assert recipe.mlp.activations == "int8" and "INT8 activations" in recipe.mlp.describe()
    assert parse_recipe(recipe_to_toml(recipe)) == recipe
    model = make_dlrm().eval()
    spec = infer_spec(model.state_dict(), source="test")
    int8 = make_plan(recipe, spec)
    fp32 = make_plan(parse_recipe(recipe_text("qat", 8, activations="fp32")), spec)
    layers = len(spec.dense_arch_layer_sizes) + len(spec.over_arch_layer_sizes)
    assert int8.mlp.bytes_after - fp32.mlp.bytes_after == 8 * layers  # fp32 scale + zero point
    assert int8.to_json()["mlp"]["activations"] == "int8"
    converted = convert_model(prepare_model(model, spec, make_plan(recipe, spec))[0])
    linears = [m for m in converted.modules() if isinstance(m, QuantizedLinear)]
    assert sum(m.nbytes for m in linears) == int8.mlp.bytes_after


def test_calibration_fixes_ranges_from_observed_inputs() -> None:
    model, prepared, _ = calibrated_model("DLRM", "qat", 4)
    first = activation_quantizers(prepared)[0]  # the dense arch's input: the raw dense features
    lo = min(float(random_inputs(model, batch=128, seed=s)[0].min()) for s in range(3))
    hi = max(float(random_inputs(model, batch=128, seed=s)[0].max()) for s in range(3))
    scale, zero = activation_qparams(lo, hi)
    assert float(first.scale) == scale and float(first.zero_point) == zero
    assert all(q.calibrated and not q.observing for q in activation_quantizers(prepared))


def test_ptq_with_only_valid_calibrates_on_the_selection_slice(tmp_path: Path) -> None:
    """PTQ without --data calibrates on --valid's selection slice, never its report slice: the
    first linear's range (the raw dense features) is the selection slice's."""
    ckpt, _, valid, _ = tiny_world(tmp_path, n=800)
    (tmp_path / "r.toml").write_text(recipe_text("ptq", 4))
    job = pipeline.load(ckpt)
    result = pipeline.compress(job, pipeline.plan(job, tmp_path / "r.toml"), valid=valid)
    select = split_validation(load_npz(valid), str(valid)).select
    scale, zero = activation_qparams(float(select.dense.min()), float(select.dense.max()))
    first = activation_quantizers(result.model)[0]
    assert (float(first.scale), float(first.zero_point)) == (scale, zero)


def test_int8_activations_need_data(tmp_path: Path) -> None:
    ckpt, _, _, _ = tiny_world(tmp_path, n=400)
    (tmp_path / "r.toml").write_text(recipe_text("ptq", 4))
    job = pipeline.load(ckpt)
    plan = pipeline.plan(job, tmp_path / "r.toml")
    with pytest.raises(SettingError, match="calibrates each linear's input range on real inputs"):
        pipeline.compress(job, plan)
    assert "--data" in NEEDS_DATA


# ---------------------------------------------------------------------------------------------
# End to end: fine-tune, export, verify --parity, serve


@pytest.mark.slow
def test_end_to_end_int8_artifacts(tmp_path: Path) -> None:
    ckpt, train, valid, _ = tiny_world(tmp_path, n=3000)
    (tmp_path / "r.toml").write_text(recipe_text("qat", 4))
    job = pipeline.load(ckpt)
    result = pipeline.compress(
        job, pipeline.plan(job, tmp_path / "r.toml"), data=train, valid=valid
    )
    out = tmp_path / "out"
    export(result, out)
    manifest = json.loads((out / "manifest.json").read_text())
    parity = manifest["onnx"]["parity"]
    assert parity["atol"] == BOUND and max(parity["max_abs_diff"].values()) <= BOUND
    assert manifest["plan"]["mlp"]["activations"] == "int8"
    keys = {d["key"] for d in manifest["dense"]}
    assert "over_arch.model.1.input_quant.scale" in keys
    assert verify_parity(out)["max_abs_diff"] <= BOUND
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert "MatMulIntegerToFloat" in {n.op_type for n in graph.graph.node}
    data = sample_inputs(job.spec, 300, 5)
    logits = Predictor(out).predict(data)
    served = load_torchrec_model(out)
    assert isinstance(served.over_arch.model[1], QuantizedLinear)
    batch = data.to_batch(job.spec.feature_names)
    with torch.no_grad():
        ours = result.model(batch.dense, batch.sparse).reshape(-1, 1).numpy()
        torchrec = served(batch.dense, batch.sparse).reshape(-1, 1).numpy()
    assert np.abs(torchrec - ours).max() <= BOUND
    assert np.abs(np.asarray(logits).reshape(-1, 1) - ours).max() <= BOUND
