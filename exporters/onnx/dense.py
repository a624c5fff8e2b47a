"""TorchRec DLRM dense parts as ONNX subgraphs: MLPs, the three interactions, the over arch.

Every builder appends to a :class:`~exporters.onnx.spec.GraphBuilder` and mirrors TorchRec
(``torchrec/models/dlrm.py``, ``torchrec/modules/mlp.py``, ``torchrec/modules/crossnet.py``):

* ``DenseArch`` / projection branches: ``MLP`` = Linear + ReLU for every layer, the last included.
* ``OverArch``: ``MLP`` over all but the last size (ReLU after each), then a plain ``nn.Linear``
  (no activation) giving the logits.
* ``InteractionArch`` (``DLRM``): ``cat(dense[:, None], sparse)`` ``[B, F+1, D]``, batched Gram
  matrix, the strict upper triangle (``torch.triu_indices(F+1, F+1, offset=1)``, row-major) by
  ``GatherElements``, then ``cat(dense, triu)``.
* ``InteractionDCNArch`` (``DLRM_DCN``): ``LowRankCrossNet`` on the flattened ``[B, (F+1)*D]``:
  ``x_{l+1} = x_0 * (x_l @ V.T @ W.T + b) + x_l``.
* ``InteractionProjectionArch``: ``bmm(branch1(x).reshape(B, F1, D), branch2(x).reshape(B, D, F2))``
  flattened, after ``dense``.

:data:`GRAPH_INTERACTIONS` holds one :class:`GraphInteraction` (its array check and its builder)
per interaction kind; a model class's strategy names its kind
(:attr:`compress.io.dlrm_classes.base.DLRMClass.interaction`), so :func:`graph_interaction` finds
the entry of any registered class, and :func:`validate_graph` checks a whole graph spec.

Linear layers are ``MatMul`` + ``Add`` (never ``Gemm``, which ORT's quantization tools skip). A
float weight is stored as the state dict holds it, ``[out, in]``, and transposed by a
``Transpose`` node, so that an artifact directory's graphs read it in place from its
``dense/<key>.npy`` file instead of carrying a copy (:mod:`exporters.onnx.stored_arrays`); ORT's
constant folding makes it the ``[in, out]`` float32 weight once, at load time (logits bit for bit
those of a stored transposed weight). Quantized layers keep their codes at their width
(``INT8``, or ``INT4`` packed by ONNX) and dequantize them with ``Cast`` to float32 and ``Mul`` by
the per-output-channel scales (broadcast over the last axis of the transposed weight): one float32
rounding, so the result equals ``qweight.float() * scales[:, None]`` exactly, the same value a
per-axis ``DequantizeLinear`` gives.

Why not ``DequantizeLinear``: ONNX Runtime (1.31, default session options) rewrites
``DequantizeLinear -> MatMul`` into ``com.microsoft::MatMulNBits`` with ``accuracy_level=4``, which
quantizes the *activations* to int8 as well (logits off by up to ~2e-2 on a small model). That
made exact results depend on a session option. ``Cast`` + ``Mul`` of two initializers matches no
quantization fusion; ORT's constant folding turns it into a float32 weight once when the session
is created, so a plain ``InferenceSession(path)`` computes float32 ``MatMul`` (as fast as the
folded form, and exact).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from compress.io.dlrm_classes import strategy_for
from compress.io.dlrm_classes.dlrm import dot_output_width
from compress.io.dlrm_classes.dlrm_projection import projection_output_width
from exporters.onnx.spec import MS_DOMAIN, CrossLayer, DLRMGraphSpec, GraphBuilder, Linear

if TYPE_CHECKING:  # the builders import onnx; the checks (validate_graph) need none
    from onnx import TensorProto


def _int64(values: list[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def quantized_weight_tensor(layer: Linear) -> TensorProto:
    """The transposed codes ``[in, out]`` as an INT8 or INT4 initializer (unnamed)."""
    from onnx import TensorProto, helper

    codes = np.ascontiguousarray(layer.qweight.T)
    if layer.bits == 8:
        return helper.make_tensor("", TensorProto.INT8, codes.shape, codes.tobytes(), raw=True)
    flat = codes.reshape(-1).astype(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)  # element 2j in the low nibble
    return helper.make_tensor("", TensorProto.INT4, codes.shape, packed.tobytes(), raw=True)


def int8_weight_tensor(layer: Linear) -> TensorProto:
    """The transposed codes ``[in, out]`` as an INT8 initializer (unnamed), whatever ``bits``:
    the integer kernels take int8 weights (INT4 codes are int8 values in [-8, 7])."""
    from onnx import TensorProto, helper

    codes = np.ascontiguousarray(layer.qweight.T)
    return helper.make_tensor("", TensorProto.INT8, codes.shape, codes.tobytes(), raw=True)


def add_int8_linear(gb: GraphBuilder, x: str, layer: Linear, name: str) -> str:
    """A layer with INT8 activations (:mod:`compress.quant.activation`): ``QuantizeLinear`` to
    uint8 with the layer's static scale and zero point, then
    ``com.microsoft::MatMulIntegerToFloat`` (integer products summed in int32, times
    ``act_scale * scales[o]``, plus the bias) on ONNX Runtime's integer GEMM kernels."""
    act_scale = gb.initializer(f"{name}.act_scale", np.asarray(layer.act_scale, np.float32))
    zero = np.asarray(layer.act_zero_point).astype(np.uint8)
    act_zero = gb.initializer(f"{name}.act_zero_point", zero)
    codes_in = gb.op("QuantizeLinear", [x, act_scale, act_zero], f"{name}.x_u8")
    weight = gb.initializer(f"{name}.qweight_t", int8_weight_tensor(layer))
    scales = gb.initializer(f"{name}.scales", layer.scales)
    bias = gb.initializer(f"{name}.bias", layer.bias)
    return gb.op(
        "MatMulIntegerToFloat",
        [codes_in, weight, act_scale, scales, act_zero, "", bias],
        f"{name}.out",
        domain=MS_DOMAIN,
    )


def add_linear(gb: GraphBuilder, x: str, layer: Linear, name: str) -> str:
    """``x @ W.T + bias`` for float32 ``x`` ``[..., in]``; initializers are named ``name.*``."""
    from onnx import TensorProto

    if layer.int8_activations:
        return add_int8_linear(gb, x, layer, name)
    if layer.is_quantized:
        codes = gb.initializer(f"{name}.qweight_t", quantized_weight_tensor(layer))
        scales = gb.initializer(f"{name}.scales", layer.scales)  # [out]: the last axis of [in, out]
        codes_f32 = gb.op("Cast", [codes], f"{name}.codes_f32", to=TensorProto.FLOAT)
        weight = gb.op("Mul", [codes_f32, scales], f"{name}.weight_t")
    else:
        # stored as the state dict holds it, [out, in] (an artifact directory's graphs read it
        # in place from dense/, exporters.onnx.stored_arrays), transposed in the graph: ONNX
        # Runtime folds the Transpose into the weight once, at load time (the same floats)
        stored = gb.initializer(f"{name}.weight", np.ascontiguousarray(layer.weight))
        weight = gb.op("Transpose", [stored], f"{name}.weight_t", perm=[1, 0])
    y = gb.op("MatMul", [x, weight], f"{name}.matmul")
    return gb.op("Add", [y, gb.initializer(f"{name}.bias", layer.bias)], f"{name}.out")


def add_mlp(
    gb: GraphBuilder, x: str, layers: tuple[Linear, ...], name: str, relu_last: bool = True
) -> str:
    """Stack of Linear layers with ReLU after each (after the last one only if ``relu_last``)."""
    for i, layer in enumerate(layers):
        x = add_linear(gb, x, layer, f"{name}.{i}")
        if relu_last or i < len(layers) - 1:
            x = gb.op("Relu", [x], f"{name}.{i}.relu")
    return x


def add_dense_arch(gb: GraphBuilder, dense: str, spec: DLRMGraphSpec) -> str:
    """TorchRec ``DenseArch``: ``[B, n]`` -> ``[B, D]``, ReLU after every layer."""
    return add_mlp(gb, dense, spec.dense_arch, "dense_arch")


def add_over_arch(gb: GraphBuilder, x: str, spec: DLRMGraphSpec) -> str:
    """TorchRec ``OverArch``: ReLU after every layer except the final Linear -> logits."""
    return add_mlp(gb, x, spec.over_arch, "over_arch", relu_last=False)


def triu_flat_indices(num_sparse: int) -> np.ndarray:
    """Flat positions in a ``(F+1) x (F+1)`` matrix of ``torch.triu_indices(F+1, F+1, offset=1)``."""
    n = num_sparse + 1
    rows, cols = np.triu_indices(n, k=1)  # row-major, the same order as torch.triu_indices
    return (rows * n + cols).astype(np.int64)


def _combined(gb: GraphBuilder, dense: str, sparse: str | list[str]) -> str:
    """``cat(dense.unsqueeze(1), *sparse, dim=1)``: ``[B, F+1, D]``."""
    parts = [sparse] if isinstance(sparse, str) else sparse
    dense_3d = gb.op("Unsqueeze", [dense, gb.const("axes1", _int64([1]))], "dense_3d")
    return gb.op("Concat", [dense_3d, *parts], "combined", axis=1)


def _flatten(gb: GraphBuilder, x: str, width: int, hint: str) -> str:
    """``[B, ...]`` -> ``[B, width]`` (a 0 in the shape keeps the batch dim)."""
    return gb.op("Reshape", [x, gb.const("shape", _int64([0, width]))], hint)


def add_dot_interaction(
    gb: GraphBuilder, dense: str, parts: list[str], num_sparse: int, order: list[int] | None = None
) -> str:
    """TorchRec ``InteractionArch``: ``[B, D + F + F*(F-1)/2]``.

    ``parts``: pooled embeddings ``[B, F_g, D]`` whose concatenation holds the ``F`` features in
    ``order`` (default: model order; :func:`~exporters.onnx.lookup.add_sparse_arch_parts`). They
    are concatenated with the dense vector in one op and the triangle indices permuted to match
    (the Gram matrix is symmetric), so the output equals the one for features in model order
    with no reordering copy. The strict upper triangle is taken by ``GatherElements`` (int32
    indices expanded to ``[B, T]``): a ``Gather`` on axis 1 runs element by element in ORT 1.31
    (8 ms vs 0.6 ms at batch 2048, F = 26). Same values: both copy Gram matrix entries.
    """
    combined = _combined(gb, dense, parts)
    transposed = gb.op("Transpose", [combined], "combined_t", perm=[0, 2, 1])
    gram = gb.op("MatMul", [combined, transposed], "interactions")  # [B, F+1, F+1]
    n = num_sparse + 1
    flat = _flatten(gb, gram, n * n, "interactions_flat_all")
    order = list(range(num_sparse)) if order is None else list(order)
    position = np.empty(n, np.int64)  # position in `combined` of model entry e (0: dense)
    position[0] = 0
    position[np.asarray(order, np.int64) + 1] = np.arange(1, n)
    rows, cols = np.divmod(triu_flat_indices(num_sparse), n)
    triu = (position[rows] * n + position[cols]).astype(np.int32)  # half the bytes of int64
    batch = gb.op(
        "Slice",
        [gb.op("Shape", [flat]), gb.const("start0", _int64([0])), gb.const("end1", _int64([1]))],
        "batch_size",
    )
    index_shape = gb.op("Concat", [batch, gb.const("triu_count", _int64([triu.size]))], axis=0)
    index = gb.op("Expand", [gb.const("triu_index", triu[None, :]), index_shape], "triu_index_b")
    picked = gb.op("GatherElements", [flat, index], "interactions_flat", axis=1)
    return gb.op("Concat", [dense, picked], "interaction_out", axis=1)


def add_dcn_interaction(
    gb: GraphBuilder, dense: str, sparse: str, layers: tuple[CrossLayer, ...], width: int
) -> str:
    """TorchRec ``InteractionDCNArch`` + ``LowRankCrossNet``: ``[B, (F+1)*D]``."""
    x0 = _flatten(gb, _combined(gb, dense, sparse), width, "crossnet_in")
    x = x0
    for i, layer in enumerate(layers):
        # as stored (read in place from dense/), transposed in the graph, as add_linear's weights
        v = gb.initializer(f"crossnet.{i}.V", np.ascontiguousarray(layer.V_kernel))
        w = gb.initializer(f"crossnet.{i}.W", np.ascontiguousarray(layer.W_kernel))
        v_t = gb.op("Transpose", [v], f"crossnet.{i}.V_t", perm=[1, 0])
        w_t = gb.op("Transpose", [w], f"crossnet.{i}.W_t", perm=[1, 0])
        bias = gb.initializer(f"crossnet.{i}.bias", layer.bias)
        low = gb.op("MatMul", [x, v_t], f"crossnet.{i}.xv")  # [B, r]
        high = gb.op("MatMul", [low, w_t], f"crossnet.{i}.xw")  # [B, in]
        gate = gb.op("Add", [high, bias], f"crossnet.{i}.xw_b")
        x = gb.op("Add", [gb.op("Mul", [x0, gate], f"crossnet.{i}.cross"), x], f"crossnet.{i}")
    return x


def add_projection_interaction(
    gb: GraphBuilder, dense: str, sparse: str, spec: DLRMGraphSpec
) -> str:
    """TorchRec ``InteractionProjectionArch``: ``[B, D + F1*F2]``."""
    d = spec.embedding_dim
    width = (len(spec.features) + 1) * d
    x = _flatten(gb, _combined(gb, dense, sparse), width, "projection_in")
    y1 = add_mlp(gb, x, spec.branch1, "branch1")
    y2 = add_mlp(gb, x, spec.branch2, "branch2")
    f1 = spec.branch1[-1].shape[0] // d
    f2 = spec.branch2[-1].shape[0] // d
    y1 = gb.op("Reshape", [y1, gb.const("shape", _int64([0, f1, d]))], "branch1_3d")
    y2 = gb.op("Reshape", [y2, gb.const("shape", _int64([0, d, f2]))], "branch2_3d")
    prod = gb.op("MatMul", [y1, y2], "projection")  # [B, F1, F2]
    flat = _flatten(gb, prod, f1 * f2, "projection_flat")
    return gb.op("Concat", [dense, flat], "interaction_out", axis=1)


# ---------------------------------------------------------------------------------------------
# One entry per interaction kind: what its arrays must satisfy, and its graph


@dataclass(frozen=True)
class GraphInteraction:
    """How the graphs hold one interaction kind.

    ``check(spec)`` raises ``ValueError`` naming the first inconsistency of the interaction's
    arrays and returns the over arch's input width. ``build(gb, dense, parts, spec, order)`` adds
    the interaction on ``dense`` ``[B, D]`` and pooled embeddings given as group ``parts``
    ``[B, F_g, D]`` holding the features in ``order`` (one part in model order is the plain
    ``sparse`` ``[B, F, D]``); it returns ``[B, over-arch input]``.
    """

    check: Callable[[DLRMGraphSpec], int]
    build: Callable[[GraphBuilder, str, list[str], DLRMGraphSpec, list[int]], str]


def _check_dot(spec: DLRMGraphSpec) -> int:
    return dot_output_width(len(spec.features), spec.embedding_dim)


def _build_dot(
    gb: GraphBuilder, dense: str, parts: list[str], spec: DLRMGraphSpec, order: list[int]
) -> str:
    return add_dot_interaction(gb, dense, parts, len(spec.features), order)


def _check_dcn(spec: DLRMGraphSpec) -> int:
    inter_in = (len(spec.features) + 1) * spec.embedding_dim
    if not spec.crossnet:
        raise ValueError(f"{spec.model_class} needs crossnet layers")
    for i, c in enumerate(spec.crossnet):
        r = c.V_kernel.shape[0]
        if c.V_kernel.shape != (r, inter_in) or c.W_kernel.shape != (inter_in, r):
            raise ValueError(f"crossnet layer {i}: expected V [r, {inter_in}], W [{inter_in}, r]")
        if c.bias.shape != (inter_in,):
            raise ValueError(f"crossnet layer {i}: bias must be [{inter_in}]")
    return inter_in


def _build_dcn(
    gb: GraphBuilder, dense: str, parts: list[str], spec: DLRMGraphSpec, order: list[int]
) -> str:
    from exporters.onnx.lookup import concat_in_order

    sparse = concat_in_order(gb, parts, order)
    width = (len(spec.features) + 1) * spec.embedding_dim
    return add_dcn_interaction(gb, dense, sparse, spec.crossnet, width)


def _check_projection(spec: DLRMGraphSpec) -> int:
    d = spec.embedding_dim
    inter_in = (len(spec.features) + 1) * d
    w1 = spec.check_chain(spec.branch1, inter_in, "branch1")
    w2 = spec.check_chain(spec.branch2, inter_in, "branch2")
    if w1 % d or w2 % d:
        raise ValueError(f"projection branch widths {w1}, {w2} must be multiples of {d}")
    return projection_output_width(d, w1, w2)


def _build_projection(
    gb: GraphBuilder, dense: str, parts: list[str], spec: DLRMGraphSpec, order: list[int]
) -> str:
    from exporters.onnx.lookup import concat_in_order

    return add_projection_interaction(gb, dense, concat_in_order(gb, parts, order), spec)


#: Interaction kind (a strategy's ``interaction``) -> how the graphs check and build it.
GRAPH_INTERACTIONS: dict[str, GraphInteraction] = {
    "dot": GraphInteraction(_check_dot, _build_dot),
    "dcn": GraphInteraction(_check_dcn, _build_dcn),
    "projection": GraphInteraction(_check_projection, _build_projection),
}


def graph_interaction(spec: DLRMGraphSpec) -> GraphInteraction:
    """The entry of ``spec``'s class (``ValueError`` for an unknown class or a kind no entry has)."""
    kind = strategy_for(spec.model_class).interaction
    try:
        return GRAPH_INTERACTIONS[kind]
    except KeyError:
        raise ValueError(
            f"{spec.model_class}: interaction {kind!r} has no graph builder (known: "
            f"{', '.join(GRAPH_INTERACTIONS)})"
        ) from None


def validate_graph(spec: DLRMGraphSpec) -> None:
    """Raise ``ValueError`` naming the first inconsistency of ``spec``: the parts every class
    shares (:meth:`~exporters.onnx.spec.DLRMGraphSpec.validate`), the interaction, and the over
    arch's input width."""
    interaction = graph_interaction(spec)
    spec.validate()
    spec.check_chain(spec.over_arch, interaction.check(spec), "over_arch")


def add_interaction(gb: GraphBuilder, dense: str, sparse: str, spec: DLRMGraphSpec) -> str:
    """The interaction of ``spec.model_class`` on ``dense`` ``[B, D]`` and ``sparse`` ``[B, F, D]``."""
    return graph_interaction(spec).build(gb, dense, [sparse], spec, list(range(len(spec.features))))


def add_interaction_parts(
    gb: GraphBuilder, dense: str, parts: list[str], spec: DLRMGraphSpec, order: list[int]
) -> str:
    """The interaction of ``spec`` on pooled embeddings given as group ``parts`` in ``order``
    (:func:`~exporters.onnx.lookup.add_sparse_arch_parts`): the dot interaction takes them as
    they are (it permutes its triangle indices), the others see them in model order."""
    return graph_interaction(spec).build(gb, dense, parts, spec, order)
