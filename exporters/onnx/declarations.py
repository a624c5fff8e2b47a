"""The declared inputs and outputs of the graphs an artifact directory holds (no onnx import).

What each graph must declare follows from the model's shape alone (its features, dense inputs and
embedding dim): :data:`GRAPH_IO` gives, by the graph's manifest name, its inputs and outputs as
:class:`TensorDecl` (``batch`` and ``n_<feature>`` are symbolic dims). The graph builders
(:mod:`exporters.onnx.model`) declare them, and the artifact checks
(:mod:`exporters.artifacts.graph_checks`) hold stored graphs to them; the checks import this
module, not ``onnx``, so ``verify`` starts fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from compress.io.model_spec import feature_input_problem, sanitize_name

#: The symbolic batch dim of every graph input and output.
BATCH = "batch"
DENSE_INPUT = "dense"
DENSE_EMBEDDING = "dense_embedding"
SPARSE_EMBEDDING = "sparse_embedding"
LOGITS = "logits"

#: ONNX ``TensorProto.DataType`` of the numpy dtypes the graphs declare (onnx.proto).
ELEM_TYPES = {"float32": 1, "uint8": 2, "int8": 3, "int32": 6, "int64": 7, "float16": 10}


@dataclass(frozen=True)
class TensorDecl:
    """One graph input or output: name, numpy dtype name, shape with symbolic dims as strings."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @property
    def elem_type(self) -> int:
        return ELEM_TYPES[self.dtype]


class ModelShape(Protocol):
    """What the declarations depend on: a :class:`GraphShape`, or a whole
    :class:`~exporters.onnx.spec.DLRMGraphSpec`."""

    @property
    def features(self) -> tuple[str, ...]: ...

    @property
    def dense_in_features(self) -> int: ...

    @property
    def embedding_dim(self) -> int: ...


@dataclass(frozen=True)
class GraphShape:
    """What the graphs' declared inputs and outputs depend on (a
    :class:`~exporters.onnx.spec.DLRMGraphSpec` has the same attributes): read from a manifest, it
    says what the stored graphs must declare."""

    features: tuple[str, ...]
    dense_in_features: int
    embedding_dim: int


def feature_input_names(spec: ModelShape) -> dict[str, tuple[str, str]]:
    """``feature -> (values input, lengths input)``; raises if two features sanitize alike."""
    problem = feature_input_problem(spec.features)
    if problem is not None:
        raise ValueError(problem)
    return {
        f: (f"{sanitize_name(f)}__values", f"{sanitize_name(f)}__lengths") for f in spec.features
    }


def full_model_io(spec: ModelShape) -> tuple[list[TensorDecl], list[TensorDecl]]:
    """Inputs and outputs of the full model (:func:`exporters.onnx.model.build_full_model`)."""
    inputs = [TensorDecl(DENSE_INPUT, "float32", (BATCH, spec.dense_in_features))]
    for f, (values, lengths) in feature_input_names(spec).items():
        inputs.append(TensorDecl(values, "int64", (f"n_{sanitize_name(f)}",)))
        inputs.append(TensorDecl(lengths, "int64", (BATCH,)))
    return inputs, [TensorDecl(LOGITS, "float32", (BATCH, 1))]


def dense_graph_io(spec: ModelShape) -> tuple[list[TensorDecl], list[TensorDecl]]:
    """Inputs and outputs of the dense arch (:func:`exporters.onnx.model.build_dense_graph`)."""
    return (
        [TensorDecl(DENSE_INPUT, "float32", (BATCH, spec.dense_in_features))],
        [TensorDecl(DENSE_EMBEDDING, "float32", (BATCH, spec.embedding_dim))],
    )


def over_graph_io(spec: ModelShape) -> tuple[list[TensorDecl], list[TensorDecl]]:
    """Inputs and outputs of the over graph (:func:`exporters.onnx.model.build_over_graph`)."""
    d, f = spec.embedding_dim, len(spec.features)
    return (
        [
            TensorDecl(DENSE_EMBEDDING, "float32", (BATCH, d)),
            TensorDecl(SPARSE_EMBEDDING, "float32", (BATCH, f, d)),
        ],
        [TensorDecl(LOGITS, "float32", (BATCH, 1))],
    )


#: The declared inputs and outputs of each graph an artifact directory holds, by manifest name.
GRAPH_IO: dict[str, Callable[[ModelShape], tuple[list[TensorDecl], list[TensorDecl]]]] = {
    "model": full_model_io,
    "dense_arch": dense_graph_io,
    "over_arch": over_graph_io,
}
