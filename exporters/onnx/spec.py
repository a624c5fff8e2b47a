"""What the ONNX exporters take in: tables, layers and whole DLRMs as plain numpy dataclasses.

The dataclasses here are the only input of :mod:`exporters.onnx.lookup`, :mod:`exporters.onnx.dense`
and :mod:`exporters.onnx.model`. They hold finished arrays (packed codes, scales, float weights),
not modules, and take from the rest of the project only the conventions of the formats (the ROBE-Z
hash constants of :mod:`compress.methods.robe_hash`, the code offset of
:func:`compress.quant.math.signed_offset`), so any converter can fill them.

Table kinds (``TableLookup.kind``), for a table of ``R`` rows of ``D`` values:

* :class:`Fp32Table` ``weight`` float32 ``[R, D]``.
* :class:`Fp16Table` ``weight`` float16 ``[R, D]`` (cast to float32 after the gather).
* :class:`RowwiseTable` FBGEMM row-wise asymmetric: ``packed`` uint8 ``[R, D*bits/8]`` (low bits
  first), ``scale`` and ``bias`` float16 ``[R]``; value = ``float(code)*float(scale) + float(bias)``
  in float32, equal to ``FusedNBitRowwiseQuantizedSBHalfToFloat``.
* :class:`TablewiseTable` DQRM symmetric: ``packed`` uint8 holding ``u = q + 2^(bits-1)`` (same
  packing), one float32 ``scale``; value = ``(u - 2^(bits-1)) * scale``.
* :class:`RobeTable` ROBE-Z parameter sharing: element ``(i, d)`` =
  ``array[((i + O)*R3 + (d // Z)*R2 + R1) mod P mod (M - Z + 1) + d mod Z]``.

This module also holds :class:`GraphBuilder`, the small node/initializer accumulator every graph
builder shares, and the IR/opset versions the graphs declare.

Example::

    table = TableLookup(name="t0", features=("cat_0",), dim=16,
                        kind=Fp32Table(np.zeros((100, 16), np.float32)))
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compress.methods.robe_hash import DEFAULT_SEED, ROBE_PRIME, robe_constants
from compress.quant.math import signed_offset, symmetric_range

#: ONNX IR version of every graph: onnxruntime 1.31 loads 3..13 (onnx 1.23 writes 14 by default);
#: INT4 initializers need at least 10.
IR_VERSION = 10
#: Default-domain opset (DequantizeLinear with int4 and per-axis scales, ScatterND reductions).
OPSET = 21
MS_DOMAIN = "com.microsoft"
MS_OPSET = 1
#: R1, R2, R3 of the public ROBE-Z code's seed (:func:`compress.methods.robe_hash.robe_constants`).
ROBE_SEEDS = tuple(robe_constants(DEFAULT_SEED))
#: Symbolic name of the batch dimension in every graph.
BATCH = "batch"
#: ORT session config entries the graphs are meant to run with; stored in every model's
#: ``metadata_props`` under ``dqrm.ort_session_config`` (JSON). ORT 1.31 otherwise fuses
#: ``DequantizeLinear`` -> ``MatMul`` into ``MatMulNBits`` with int8 activations (level 4).
SESSION_CONFIG = {
    "session.intra_op.allow_spinning": "0",
    "session.inter_op.allow_spinning": "0",
    "session.qdq_matmulnbits_accuracy_level": "1",
}

MODEL_CLASSES = ("DLRM", "DLRM_DCN", "DLRM_Projection")


def sanitize_name(name: str) -> str:
    """``name`` as an identifier: characters outside ``[A-Za-z0-9_]`` become ``_``, and a leading
    digit (or an empty name) gets a ``_`` prefix. ``"cat-1"`` -> ``"cat_1"``."""
    out = "".join(c if (c.isascii() and (c.isalnum() or c == "_")) else "_" for c in name)
    return out if out and not out[0].isdigit() else "_" + out


def _check_bits(bits: int, dim: int, packed: np.ndarray, what: str) -> None:
    if bits not in (2, 4, 8):
        raise ValueError(f"{what}: bits must be 2, 4 or 8, got {bits}")
    if (dim * bits) % 8:
        raise ValueError(f"{what}: dim {dim} x {bits} bits is not a whole number of bytes")
    if packed.dtype != np.uint8 or packed.ndim != 2 or packed.shape[1] != dim * bits // 8:
        raise ValueError(
            f"{what}: packed must be uint8 [R, {dim * bits // 8}], got {packed.dtype} "
            f"{list(packed.shape)}"
        )


@dataclass(frozen=True)
class Fp32Table:
    """Float32 table ``weight`` [R, D]."""

    weight: np.ndarray
    KIND: ClassVar[str] = "fp32"

    @property
    def num_rows(self) -> int:
        return int(self.weight.shape[0])

    def validate(self, dim: int, what: str) -> None:
        if self.weight.dtype != np.float32 or self.weight.shape[1:] != (dim,):
            raise ValueError(f"{what}: weight must be float32 [R, {dim}]")


@dataclass(frozen=True)
class Fp16Table:
    """Float16 table ``weight`` [R, D]; rows are cast to float32 after the gather."""

    weight: np.ndarray
    KIND: ClassVar[str] = "fp16"

    @property
    def num_rows(self) -> int:
        return int(self.weight.shape[0])

    def validate(self, dim: int, what: str) -> None:
        if self.weight.dtype != np.float16 or self.weight.shape[1:] != (dim,):
            raise ValueError(f"{what}: weight must be float16 [R, {dim}]")


@dataclass(frozen=True)
class RowwiseTable:
    """FBGEMM row-wise asymmetric codes: ``packed`` uint8 [R, D*bits/8], fp16 ``scale``/``bias`` [R]."""

    packed: np.ndarray
    scale: np.ndarray
    bias: np.ndarray
    bits: int
    KIND: ClassVar[str] = "rowwise"

    @property
    def num_rows(self) -> int:
        return int(self.packed.shape[0])

    def validate(self, dim: int, what: str) -> None:
        _check_bits(self.bits, dim, self.packed, what)
        for arr, nm in ((self.scale, "scale"), (self.bias, "bias")):
            if arr.dtype != np.float16 or arr.shape != (self.num_rows,):
                raise ValueError(f"{what}: {nm} must be float16 [{self.num_rows}]")


@dataclass(frozen=True)
class TablewiseTable:
    """DQRM symmetric codes with one scale: ``packed`` uint8 of ``u = q + 2^(bits-1)``."""

    packed: np.ndarray
    scale: float
    bits: int
    KIND: ClassVar[str] = "tablewise"

    @property
    def num_rows(self) -> int:
        return int(self.packed.shape[0])

    @property
    def offset(self) -> int:
        """The code of zero, ``2^(bits-1)``."""
        return signed_offset(self.bits)

    def validate(self, dim: int, what: str) -> None:
        _check_bits(self.bits, dim, self.packed, what)
        if not np.isfinite(np.float32(self.scale)):
            raise ValueError(f"{what}: scale must be finite")


@dataclass(frozen=True)
class RobeTable:
    """ROBE-Z view of a shared float32 ``array`` [M].

    Tables that share one array must pass the same ``array_name`` (and the same array); the graph
    then holds it once. ``num_rows`` is the table's virtual row count, ``table_offset`` the sum of
    the row counts of the tables before it in the shared array.
    """

    array: np.ndarray
    num_rows: int
    block_size: int
    table_offset: int
    seeds: tuple[int, int, int] = ROBE_SEEDS
    prime: int = ROBE_PRIME
    array_name: str = "robe_array"
    KIND: ClassVar[str] = "robe"

    def validate(self, dim: int, what: str) -> None:
        if self.array.dtype != np.float32 or self.array.ndim != 1:
            raise ValueError(f"{what}: ROBE array must be float32 [M]")
        if not 1 <= self.block_size <= self.array.shape[0]:
            raise ValueError(f"{what}: block size {self.block_size} does not fit the array")
        if self.table_offset < 0 or self.num_rows < 0 or min(self.seeds) < 0:
            raise ValueError(f"{what}: ROBE offsets and seeds must be non-negative")
        hi = (self.table_offset + self.num_rows) * max(self.seeds[2], 1)
        hi += (dim // self.block_size + 1) * self.seeds[1] + self.seeds[0]
        if hi >= 2**63:
            raise ValueError(f"{what}: ROBE hash overflows int64")


TableKind = Fp32Table | Fp16Table | RowwiseTable | TablewiseTable | RobeTable


@dataclass(frozen=True)
class TableLookup:
    """One embedding table and the features (KJT keys) that look it up."""

    name: str
    features: tuple[str, ...]
    dim: int
    kind: TableKind

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
    """

    bias: np.ndarray
    weight: np.ndarray | None = None
    qweight: np.ndarray | None = None
    scales: np.ndarray | None = None
    bits: int | None = None

    @property
    def is_quantized(self) -> bool:
        return self.qweight is not None

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
        """Raise ValueError naming the first inconsistency."""
        if self.model_class not in MODEL_CLASSES:
            raise ValueError(f"unknown model class {self.model_class!r}")
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
        f_count = len(self.features)
        width = self._check_chain(self.dense_arch, self.dense_in_features, "dense_arch")
        if width != d:
            raise ValueError(f"dense_arch ends at {width}, embedding dim is {d}")
        inter_in = (f_count + 1) * d
        if self.model_class == "DLRM":
            over_in = d + f_count * (f_count + 1) // 2
        elif self.model_class == "DLRM_DCN":
            if not self.crossnet:
                raise ValueError("DLRM_DCN needs crossnet layers")
            for i, c in enumerate(self.crossnet):
                r = c.V_kernel.shape[0]
                if c.V_kernel.shape != (r, inter_in) or c.W_kernel.shape != (inter_in, r):
                    raise ValueError(
                        f"crossnet layer {i}: expected V [r, {inter_in}], W [{inter_in}, r]"
                    )
                if c.bias.shape != (inter_in,):
                    raise ValueError(f"crossnet layer {i}: bias must be [{inter_in}]")
            over_in = inter_in
        else:
            w1 = self._check_chain(self.branch1, inter_in, "branch1")
            w2 = self._check_chain(self.branch2, inter_in, "branch2")
            if w1 % d or w2 % d:
                raise ValueError(f"projection branch widths {w1}, {w2} must be multiples of {d}")
            over_in = d + (w1 // d) * (w2 // d)
        if len(self.over_arch) < 2:
            raise ValueError("over_arch needs at least two layers (TorchRec OverArch)")
        self._check_chain(self.over_arch, over_in, "over_arch")

    @staticmethod
    def _check_chain(layers: tuple[Linear, ...], width: int, what: str) -> int:
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
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def add_output(self, value: str, name: str, elem_type: int, shape: list[int | str]) -> str:
        """Expose ``value`` as graph output ``name`` (adds an Identity when the names differ)."""
        if value != name:
            self.nodes.append(helper.make_node("Identity", [value], [name]))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def initializer(self, name: str, value: np.ndarray | TensorProto) -> str:
        """Add a named initializer once; a second add under the same name must be the same data."""
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
        out = self.fresh(hint or op_type.lower())
        if domain == MS_DOMAIN:
            self.uses_ms_domain = True
        self.nodes.append(
            helper.make_node(op_type, inputs, [out], name=out, domain=domain or None, **attrs)
        )
        return out

    def opset_imports(self) -> list[onnx.OperatorSetIdProto]:
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
