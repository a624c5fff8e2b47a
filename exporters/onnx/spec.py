"""What the ONNX exporters take in: tables, layers and whole DLRMs as plain numpy dataclasses.

The dataclasses here are the only input of :mod:`exporters.onnx.lookup`, :mod:`exporters.onnx.dense`
and :mod:`exporters.onnx.model`. They hold finished arrays (packed codes, scales, float weights),
not modules, so any converter can fill them.

A :class:`TableLookup` holds its table as a **graph table** (``TableLookup.kind``): a numpy
dataclass of the table's method (:mod:`compress.methods.registry`) whose ``METHOD`` names it, e.g.
:class:`compress.methods.keep.Fp32Table`, :class:`compress.methods.rowwise.RowwiseTable`,
:class:`compress.methods.tablewise.TablewiseTable`, :class:`compress.methods.robe.method.RobeTable`;
that method builds its lookup nodes (:meth:`~compress.methods.registry.TableMethod.onnx_rows`).

This module also holds :class:`GraphBuilder`, the small node/initializer accumulator every graph
builder shares, and the IR/opset versions the graphs declare.

Example::

    table = TableLookup(name="t0", features=("cat_0",), dim=16,
                        kind=Fp32Table(np.zeros((100, 16), np.float32)))
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np

from compress.io.model_spec import sanitize_name  # noqa: F401  (one home; imported from here)
from compress.quant.sizes import symmetric_range
from exporters.onnx.declarations import BATCH  # noqa: F401  (one home; imported from here)

if TYPE_CHECKING:  # the GraphBuilder imports onnx when it builds: the dataclasses need none
    import onnx
    from onnx import TensorProto

#: ONNX IR version of every graph: onnxruntime 1.31 loads 3..13 (onnx 1.23 writes 14 by default);
#: INT4 initializers need at least 10.
IR_VERSION = 10
#: Default-domain opset (DequantizeLinear with int4 and per-axis scales, ScatterND reductions).
OPSET = 21
MS_DOMAIN = "com.microsoft"
MS_OPSET = 1


class GraphTable(Protocol):
    """A table's arrays as its method's lookup reads them (``METHOD``: the method's registered
    name, :func:`compress.methods.registry.get`)."""

    METHOD: ClassVar[str]

    @property
    def num_rows(self) -> int: ...

    def validate(self, dim: int, what: str) -> None:
        """Raise ValueError naming what does not fit a table of ``dim`` values a row."""


@dataclass(frozen=True)
class TableLookup:
    """One embedding table and the features (KJT keys) that look it up."""

    name: str
    features: tuple[str, ...]
    dim: int
    kind: GraphTable

    @property
    def num_rows(self) -> int:
        return self.kind.num_rows

    def validate(self) -> None:
        if not self.features:
            raise ValueError(f"table {self.name!r} serves no feature")
        self.kind.validate(self.dim, f"table {self.name!r}")


@dataclass(frozen=True)
class Linear:
    """``y = x @ W.T + bias``: float ``weight`` [out, in], or ``qweight`` int8 [out, in] with
    per-output-channel float32 ``scales`` [out] and ``bits`` 8 or 4 (W = qweight * scales[:, None]).

    A quantized layer may also quantize its input to static INT8 (``act_scale``, float32 scalar
    > 0, and ``act_zero_point``, a float32 scalar holding an integer in [0, 255]): it then
    computes in integers as :mod:`compress.quant.activation` says.
    """

    bias: np.ndarray
    weight: np.ndarray | None = None
    qweight: np.ndarray | None = None
    scales: np.ndarray | None = None
    bits: int | None = None
    act_scale: np.ndarray | None = None
    act_zero_point: np.ndarray | None = None

    @property
    def is_quantized(self) -> bool:
        return self.qweight is not None

    @property
    def int8_activations(self) -> bool:
        return self.act_scale is not None

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)``."""
        w = self.qweight if self.is_quantized else self.weight
        return int(w.shape[0]), int(w.shape[1])

    def dequantized(self) -> np.ndarray:
        """The float32 weight [out, in] the layer computes with."""
        if not self.is_quantized:
            return self.weight
        return self.qweight.astype(np.float32) * self.scales[:, None]

    def validate(self, what: str) -> None:
        if (self.weight is None) == (self.qweight is None):
            raise ValueError(f"{what}: give exactly one of weight and qweight")
        out, _ = self.shape
        if self.bias.dtype != np.float32 or self.bias.shape != (out,):
            raise ValueError(f"{what}: bias must be float32 [{out}]")
        if not self.is_quantized:
            if self.weight.dtype != np.float32 or self.weight.ndim != 2:
                raise ValueError(f"{what}: weight must be float32 [out, in]")
            if self.act_scale is not None or self.act_zero_point is not None:
                raise ValueError(f"{what}: INT8 activations need quantized weights")
            return
        if self.bits not in (4, 8):
            raise ValueError(f"{what}: quantized bits must be 4 or 8, got {self.bits}")
        if self.qweight.dtype != np.int8 or self.qweight.ndim != 2:
            raise ValueError(f"{what}: qweight must be int8 [out, in]")
        lo, hi = symmetric_range(self.bits)
        if self.qweight.size and (self.qweight.min() < lo or self.qweight.max() > hi):
            raise ValueError(f"{what}: qweight outside the signed {self.bits}-bit range")
        if self.scales is None or self.scales.dtype != np.float32 or self.scales.shape != (out,):
            raise ValueError(f"{what}: scales must be float32 [{out}]")
        self._validate_activations(what)

    def _validate_activations(self, what: str) -> None:
        """INT8 activations: a positive finite float32 scale and an integer zero point in
        [0, 255], both scalars, on a quantized layer."""
        if (self.act_scale is None) != (self.act_zero_point is None):
            raise ValueError(f"{what}: give both act_scale and act_zero_point, or neither")
        if self.act_scale is None:
            return
        scale, zero = np.asarray(self.act_scale), np.asarray(self.act_zero_point)
        if scale.shape != () or scale.dtype != np.float32:
            raise ValueError(f"{what}: act_scale must be a float32 scalar")
        if not (np.isfinite(scale) and scale > 0):
            raise ValueError(f"{what}: act_scale must be finite and > 0, got {float(scale)!r}")
        if zero.shape != () or zero.dtype != np.float32:
            raise ValueError(f"{what}: act_zero_point must be a float32 scalar")
        if not (np.isfinite(zero) and zero == np.round(zero) and 0 <= zero <= 255):
            raise ValueError(f"{what}: act_zero_point must be an integer in [0, 255]")


@dataclass(frozen=True)
class CrossLayer:
    """One low-rank DCN layer (TorchRec ``LowRankCrossNet``), kept float32:
    ``x_{l+1} = x_0 * (W @ (V @ x_l) + bias) + x_l`` with ``W`` [in, r], ``V`` [r, in]."""

    W_kernel: np.ndarray  # noqa: N815 - TorchRec's name
    V_kernel: np.ndarray  # noqa: N815 - TorchRec's name
    bias: np.ndarray


@dataclass(frozen=True)
class DLRMGraphSpec:
    """A whole TorchRec DLRM as arrays.

    ``features`` is the order of the F axis of the pooled sparse tensor ``[B, F, D]``: TorchRec's
    ``SparseArch.sparse_feature_names`` (table config order, then each table's feature order).
    ``dense_arch`` has ReLU after every layer, ``over_arch`` after every layer but the last,
    ``branch1``/``branch2`` (DLRM_Projection) after every layer. ``one_hot_features``: features
    whose bags are expected to hold exactly one id (seen so in the data): the full model looks
    them up apart from the others and skips their pooling while a batch agrees (any batch is
    still served exactly: a runtime check pools them when it does not).
    """

    model_class: str
    dense_in_features: int
    features: tuple[str, ...]
    tables: tuple[TableLookup, ...]
    dense_arch: tuple[Linear, ...]
    over_arch: tuple[Linear, ...]
    crossnet: tuple[CrossLayer, ...] = ()
    branch1: tuple[Linear, ...] = ()
    branch2: tuple[Linear, ...] = ()
    one_hot_features: frozenset[str] = frozenset()

    @property
    def embedding_dim(self) -> int:
        return self.tables[0].dim

    def table_of(self, feature: str) -> TableLookup:
        for t in self.tables:
            if feature in t.features:
                return t
        raise KeyError(feature)

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistency of what every model class shares
        (tables, features, the dense arch, the over arch's depth). The interaction and the over
        arch's input width depend on the class: :func:`exporters.onnx.dense.validate_graph`
        checks the whole spec."""
        if not self.tables or not self.features:
            raise ValueError("a DLRM needs at least one table and feature")
        d = self.embedding_dim
        served: dict[str, str] = {}
        for t in self.tables:
            t.validate()
            if t.dim != d:
                raise ValueError(f"table {t.name!r} has dim {t.dim}, expected {d}")
            for f in t.features:
                if f in served:
                    raise ValueError(f"feature {f!r} served by {served[f]!r} and {t.name!r}")
                served[f] = t.name
        if len(set(self.features)) != len(self.features) or set(self.features) != set(served):
            raise ValueError("features must list every table feature exactly once")
        width = self.check_chain(self.dense_arch, self.dense_in_features, "dense_arch")
        if width != d:
            raise ValueError(f"dense_arch ends at {width}, embedding dim is {d}")
        if len(self.over_arch) < 2:
            raise ValueError("over_arch needs at least two layers (TorchRec OverArch)")

    @staticmethod
    def check_chain(layers: tuple[Linear, ...], width: int, what: str) -> int:
        """Check that ``layers`` chain from ``width`` inputs; returns their output width."""
        if not layers:
            raise ValueError(f"{what} is empty")
        for i, layer in enumerate(layers):
            layer.validate(f"{what}[{i}]")
            out, inp = layer.shape
            if inp != width:
                raise ValueError(f"{what}[{i}] takes {inp} inputs, gets {width}")
            width = out
        return width


# --------------------------------------------------------------------------------------------
# Graph building primitive shared by the exporters.


@dataclass
class GraphBuilder:
    """Accumulates nodes and initializers; names are made unique with a counter.

    Initializers are kept as numpy arrays (or ready TensorProtos) until :meth:`make_model`, so
    that a caller can route big ones to external data without copying them into protobuf.
    """

    name: str = "graph"
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    outputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    initializers: dict[str, np.ndarray | TensorProto] = field(default_factory=dict)
    uses_ms_domain: bool = False
    _count: int = 0

    def fresh(self, hint: str) -> str:
        """A new unique value name starting with ``hint``."""
        self._count += 1
        return f"{hint}_{self._count}"

    def add_input(self, name: str, elem_type: int, shape: list[int | str]) -> str:
        from onnx import helper

        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def add_output(self, value: str, name: str, elem_type: int, shape: list[int | str]) -> str:
        """Expose ``value`` as graph output ``name`` (adds an Identity when the names differ)."""
        from onnx import helper

        if value != name:
            self.nodes.append(helper.make_node("Identity", [value], [name]))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def initializer(self, name: str, value: np.ndarray | TensorProto) -> str:
        """Add a named initializer once; a second add under the same name must be the same data."""
        from onnx import TensorProto

        if name in self.initializers:
            old = self.initializers[name]
            same = old is value or (
                isinstance(old, np.ndarray)
                and isinstance(value, np.ndarray)
                and old.shape == value.shape
                and old.dtype == value.dtype
                and np.array_equal(old, value)
            )
            if not same:
                raise ValueError(f"initializer {name!r} added twice with different data")
            return name
        if isinstance(value, TensorProto):
            value.name = name
        self.initializers[name] = value
        return name

    def const(self, hint: str, value: np.ndarray | int | float, dtype: type | None = None) -> str:
        """A fresh small constant initializer."""
        return self.initializer(self.fresh(hint), np.asarray(value, dtype=dtype))

    def op(
        self, op_type: str, inputs: list[str], hint: str | None = None, domain: str = "", **attrs
    ) -> str:
        """Append one single-output node and return its output name."""
        from onnx import helper

        out = self.fresh(hint or op_type.lower())
        if domain == MS_DOMAIN:
            self.uses_ms_domain = True
        self.nodes.append(
            helper.make_node(op_type, inputs, [out], name=out, domain=domain or None, **attrs)
        )
        return out

    def opset_imports(self) -> list[onnx.OperatorSetIdProto]:
        from onnx import helper

        ops = [helper.make_opsetid("", OPSET)]
        if self.uses_ms_domain:
            ops.append(helper.make_opsetid(MS_DOMAIN, MS_OPSET))
        return ops

    def initializer_sizes(self) -> dict[str, int]:
        """Bytes of every initializer (what the external-data plan is made from)."""
        return {
            name: (v.nbytes if isinstance(v, np.ndarray) else v.ByteSize())
            for name, v in self.initializers.items()
        }

    def make_model(self, external: ExternalRouting | None = None) -> onnx.ModelProto:
        """Finish the model; with ``external``, the initializers it wants are written straight to
        its file (never copied into protobuf)."""
        from onnx import TensorProto, helper, numpy_helper

        from exporters.onnx.sessions import SESSION_CONFIG

        tensors = []
        for name, value in self.initializers.items():
            if external is not None and external.wants(name):
                tensors.append(external.write(name, value))
            elif isinstance(value, TensorProto):
                tensors.append(value)
            else:
                tensors.append(numpy_helper.from_array(value, name))
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, tensors)
        model = helper.make_model(
            graph,
            opset_imports=self.opset_imports(),
            ir_version=IR_VERSION,
            producer_name="dqrm-compress",
        )
        helper.set_model_props(model, {"dqrm.ort_session_config": json.dumps(SESSION_CONFIG)})
        return model


class ExternalRouting:
    """What :meth:`GraphBuilder.make_model` hands big initializers to (see ``onnx_model``)."""

    def wants(self, name: str) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def write(self, name: str, value: np.ndarray | TensorProto) -> TensorProto:  # pragma: no cover
        raise NotImplementedError
