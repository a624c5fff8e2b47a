"""Architecture of a TorchRec DLRM as plain data: the tables and layer sizes of a model.

A :class:`DLRMSpec` is what :mod:`compress.io.architecture` infers from a state dict and what
:mod:`compress.io.model` turns back into a TorchRec module. Everything downstream (data parsing, recipe
plans, exporters) reads the model's shape from here, never from module attributes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TableSpec:
    """One embedding table: ``num_embeddings`` rows of ``embedding_dim`` values.

    ``feature_names`` are the KeyedJaggedTensor keys that look up this table, in order (a table may
    serve several features). ``dtype`` is the stored element type (``float32`` for FP32 tables).
    """

    name: str
    num_embeddings: int
    embedding_dim: int
    feature_names: tuple[str, ...]
    dtype: str = "float32"

    @property
    def bytes(self) -> int:
        """Bytes of the stored table."""
        return self.num_embeddings * self.embedding_dim * dtype_size(self.dtype)


@dataclass(frozen=True)
class DLRMSpec:
    """Shapes that rebuild a ``torchrec.models.dlrm`` model.

    ``model_class`` names a registered class (:func:`compress.io.dlrm_classes.known_classes`:
    ``DLRM``, ``DLRM_DCN``, ``DLRM_Projection``), whose strategy says what else it means.
    Interaction parameters are set only for the class that uses them (the strategy's
    ``interaction_fields``). ``key_prefix`` is what every state-dict key carried
    (``"model."`` for a ``DLRMTrain`` wrapper), kept so that a rebuilt model saves the same keys.
    """

    model_class: str
    tables: tuple[TableSpec, ...]
    dense_in_features: int
    dense_arch_layer_sizes: tuple[int, ...]
    over_arch_layer_sizes: tuple[int, ...]
    dcn_num_layers: int | None = None
    dcn_low_rank_dim: int | None = None
    interaction_branch1_layer_sizes: tuple[int, ...] | None = None
    interaction_branch2_layer_sizes: tuple[int, ...] | None = None
    key_prefix: str = ""
    dense_dtype: str = "float32"
    dense_bytes: int = field(default=0, compare=False)

    @property
    def embedding_dim(self) -> int:
        return self.tables[0].embedding_dim

    @property
    def feature_names(self) -> tuple[str, ...]:
        """All sparse feature names in the order the model's KeyedJaggedTensor uses."""
        return tuple(f for t in self.tables for f in t.feature_names)

    @property
    def num_sparse_features(self) -> int:
        return len(self.feature_names)

    @property
    def embedding_bytes(self) -> int:
        return sum(t.bytes for t in self.tables)

    @property
    def total_bytes(self) -> int:
        return self.embedding_bytes + self.dense_bytes

    def table(self, name: str) -> TableSpec:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(name)

    def table_of_feature(self, feature: str) -> TableSpec:
        for t in self.tables:
            if feature in t.feature_names:
                return t
        raise KeyError(feature)


#: Names of the full ONNX graph's non-feature input and output (``exporters.onnx.model``'s
#: ``DENSE_INPUT`` and ``LOGITS``): no feature's input name may be one of them.
GRAPH_IO_NAMES = ("dense", "logits")


def sanitize_name(name: str) -> str:
    """``name`` as an identifier: characters outside ``[A-Za-z0-9_]`` become ``_``, and a leading
    digit (or an empty name) gets a ``_`` prefix. ``"cat-1"`` -> ``"cat_1"``. A feature's ONNX
    inputs are named from it (``<sanitized>__values``, ``<sanitized>__lengths``)."""
    out = "".join(c if (c.isascii() and (c.isalnum() or c == "_")) else "_" for c in name)
    return out if out and not out[0].isdigit() else "_" + out


def feature_input_problem(features: Iterable[str]) -> str | None:
    """Why ``features`` cannot all be inputs of one ONNX graph (two that sanitize alike, such as
    ``a.b`` and ``a_b``, or one that sanitizes to :data:`GRAPH_IO_NAMES`), or ``None``."""
    seen: dict[str, str] = {}
    for f in features:
        s = sanitize_name(f)
        if s in GRAPH_IO_NAMES:
            return f"feature {f!r} maps to input {s!r} of the ONNX graph, which is not a feature's"
        if s in seen:
            return f"features {seen[s]!r} and {f!r} both map to input {s!r} of the ONNX graph"
        seen[s] = f
    return None


def table_name_problem(tables: Iterable[str]) -> str | None:
    """Why ``tables`` cannot all be looked up in one ONNX graph (two whose names sanitize alike,
    such as ``t-a`` and ``t_a``: their initializers ``emb.<name>.*`` would be one), or ``None``."""
    seen: dict[str, str] = {}
    for t in tables:
        s = sanitize_name(t)
        if s in seen:
            return f"tables {seen[s]!r} and {t!r} both map to the name {s!r} in the ONNX graph"
        seen[s] = t
    return None


def graph_name_problem(spec: DLRMSpec) -> str | None:
    """Why ``spec``'s feature or table names cannot all appear in one ONNX graph, or ``None``
    (:func:`feature_input_problem`, :func:`table_name_problem`)."""
    return feature_input_problem(spec.feature_names) or table_name_problem(
        t.name for t in spec.tables
    )


_DTYPE_SIZES = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int8": 1,
    "uint8": 1,
}


def dtype_size(dtype: str) -> int:
    """Bytes per element of a dtype named as in torch without the prefix (``"float32"``)."""
    return _DTYPE_SIZES[dtype]


def precision_label(spec: DLRMSpec) -> str:
    """The checkpoint's float precision for reports: ``"FP32"``, ``"FP16"``, ``"BF16"``, or the
    ones it mixes (tables first, then the dense layers), e.g. ``"FP16/FP32"``."""
    dtypes = dict.fromkeys([*(t.dtype for t in spec.tables), spec.dense_dtype])
    return "/".join(_PRECISION_NAMES.get(d, d.upper()) for d in dtypes)


_PRECISION_NAMES = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16", "float64": "FP64"}
