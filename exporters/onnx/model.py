"""Whole-model ONNX graphs of a compressed TorchRec DLRM, and saving them (with external data).

Graphs and their declared inputs/outputs (``batch`` is dynamic in all of them; ``n_<feature>`` is
the number of ids of one feature in the batch):

* :func:`build_full_model` -- inputs ``dense`` float32 ``[batch, dense_in]`` and, for every
  feature ``f`` in ``spec.features`` order, ``<f>__values`` int64 ``[n_<f>]`` (row ids of all bags,
  concatenated) and ``<f>__lengths`` int64 ``[batch]`` (ids per bag, zeros allowed); output
  ``logits`` float32 ``[batch, 1]``. ``<f>`` is :func:`~exporters.onnx.spec.sanitize_name` of the
  feature name (``"cat-1"`` -> ``cat_1``); :func:`feature_input_names` gives the mapping. An id
  outside ``[0, rows)`` reads row 0 of its own table (FBGEMM's bounds check,
  :data:`~exporters.onnx.lookup.OUT_OF_RANGE_IDS`); ``sum(lengths)`` must equal the number of ids
  (the :class:`~exporters.runtime.predictor.Predictor` checks it). The graph needs no session option: a
  plain ``onnxruntime.InferenceSession(path)`` computes the same logits.
* :func:`build_dense_graph` -- ``dense`` ``[batch, dense_in]`` -> ``dense_embedding``
  ``[batch, D]`` (TorchRec ``DenseArch``).
* :func:`build_over_graph` -- ``dense_embedding`` ``[batch, D]`` and ``sparse_embedding``
  ``[batch, F, D]`` -> ``logits`` ``[batch, 1]`` (interaction + ``OverArch``).

Saving: protobuf cannot hold more than 2 GB, so :func:`save_model` moves every initializer of at
least ``external_data_threshold_bytes`` (and, largest first, more until the rest fits) to one
external data file ``<model file name>.data`` next to the ``.onnx``. :func:`export_full_model`
does the same while building, writing big tables straight from numpy without ever copying them
into protobuf (the path for tables over 2 GB); given the memory-mapped ``.npy`` files the tables
are stored in (``stored``, :mod:`exporters.onnx.stored_arrays`), it points those initializers at
the files instead, and the graph carries no copy of them (what an artifact directory's
``model.onnx`` does); :func:`export_dense_graph` and :func:`export_over_graph` write the split
graphs the same way (:func:`write_graph`), so the float MLP weights of a directory's three graphs
are its ``dense/`` files. Both write temporary files beside the target, run ``onnx.checker`` on the
written path, then rename, so a crash never leaves a half-written model.

Example::

    model = build_full_model(spec)          # onnx.ModelProto, already checked
    save_model(model, "out/dlrm.onnx")       # small tables stay inside the .onnx
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper

from compress.io.atomic_file import replacing
from exporters.onnx.declarations import (  # the declarations (importable from here too)
    DENSE_EMBEDDING,
    DENSE_INPUT,
    LOGITS,
    TensorDecl,
    dense_graph_io,
    feature_input_names,
    full_model_io,
    over_graph_io,
)
from exporters.onnx.declarations import GRAPH_IO as GRAPH_IO
from exporters.onnx.declarations import SPARSE_EMBEDDING as SPARSE_EMBEDDING
from exporters.onnx.declarations import GraphShape as GraphShape
from exporters.onnx.dense import (
    add_dense_arch,
    add_interaction,
    add_interaction_parts,
    add_over_arch,
    validate_graph,
)
from exporters.onnx.lookup import RowwiseImpl, add_sparse_arch_parts
from exporters.onnx.spec import DLRMGraphSpec, ExternalRouting, GraphBuilder
from exporters.onnx.stored_arrays import StoredArray, TensorReference, references

#: Protobuf's hard limit on one serialized message.
PROTOBUF_LIMIT_BYTES = 2**31
#: What may stay inside the .onnx: the limit less headroom for the graph itself.
PROTOBUF_SAFE_BYTES = PROTOBUF_LIMIT_BYTES - 64 * 2**20
#: Default size from which an initializer goes to the external data file.
DEFAULT_EXTERNAL_DATA_THRESHOLD = 256 * 2**20
#: External tensors start at multiples of this (page aligned, so ORT can map them).
EXTERNAL_DATA_ALIGNMENT = 4096


def dummy_inputs(
    spec: DLRMGraphSpec, batch: int = 8, max_bag: int = 3, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random feeds for :func:`build_full_model`: bags of 0..``max_bag`` valid ids per feature."""
    rng = np.random.default_rng(seed)
    feeds = {DENSE_INPUT: rng.standard_normal((batch, spec.dense_in_features), dtype=np.float32)}
    for f, (values, lengths) in feature_input_names(spec).items():
        ln = rng.integers(0, max_bag + 1, batch).astype(np.int64)
        feeds[lengths] = ln
        feeds[values] = rng.integers(0, spec.table_of(f).num_rows, int(ln.sum())).astype(np.int64)
    return feeds


def _declare(gb: GraphBuilder, decls: list[TensorDecl]) -> list[str]:
    return [gb.add_input(d.name, d.elem_type, list(d.shape)) for d in decls]


# ---------------------------------------------------------------------------------------------
# Graphs


def _full_builder(spec: DLRMGraphSpec, rowwise_impl: RowwiseImpl) -> GraphBuilder:
    validate_graph(spec)
    ins, outs = full_model_io(spec)
    gb = GraphBuilder(f"{spec.model_class.lower()}_full")
    _declare(gb, ins)
    dense = add_dense_arch(gb, DENSE_INPUT, spec)
    inputs = feature_input_names(spec)
    lookups = [(spec.table_of(f), v, ln) for f, (v, ln) in inputs.items()]
    one_hot = [f in spec.one_hot_features for f in inputs]
    parts, order = add_sparse_arch_parts(
        gb, lookups, spec.embedding_dim, rowwise_impl, one_hot
    )  # [B, F_g, D] each, features in `order`
    logits = add_over_arch(gb, add_interaction_parts(gb, dense, parts, spec, order), spec)
    gb.add_output(logits, LOGITS, outs[0].elem_type, list(outs[0].shape))
    return gb


def build_full_model(spec: DLRMGraphSpec, rowwise_impl: RowwiseImpl = "auto") -> onnx.ModelProto:
    """Lookups + dense arch + interaction + over arch in one graph (see the module docstring).

    ``rowwise_impl`` chooses how row-wise tables are looked up (:mod:`exporters.onnx.lookup`).

    Tables must fit in protobuf together (< 2 GB); larger models go through
    :func:`export_full_model`, which writes tables to external data while building.
    """
    gb = _full_builder(spec, rowwise_impl)
    total = sum(gb.initializer_sizes().values())
    if total >= PROTOBUF_SAFE_BYTES:
        raise ValueError(
            f"initializers total {total} bytes, over protobuf's 2 GB: use export_full_model"
        )
    return check_model(gb.make_model())


def _dense_builder(spec: DLRMGraphSpec) -> GraphBuilder:
    validate_graph(spec)
    ins, outs = dense_graph_io(spec)
    gb = GraphBuilder("dense_arch")
    _declare(gb, ins)
    out = add_dense_arch(gb, DENSE_INPUT, spec)
    gb.add_output(out, DENSE_EMBEDDING, outs[0].elem_type, list(outs[0].shape))
    return gb


def _over_builder(spec: DLRMGraphSpec) -> GraphBuilder:
    validate_graph(spec)
    ins, outs = over_graph_io(spec)
    gb = GraphBuilder(f"{spec.model_class.lower()}_over")
    dense, sparse = _declare(gb, ins)
    logits = add_over_arch(gb, add_interaction(gb, dense, sparse, spec), spec)
    gb.add_output(logits, LOGITS, outs[0].elem_type, list(outs[0].shape))
    return gb


def build_dense_graph(spec: DLRMGraphSpec) -> onnx.ModelProto:
    """TorchRec ``DenseArch`` alone: ``dense`` -> ``dense_embedding``."""
    return check_model(_dense_builder(spec).make_model())


def build_over_graph(spec: DLRMGraphSpec) -> onnx.ModelProto:
    """Interaction + ``OverArch``: (``dense_embedding``, ``sparse_embedding``) -> ``logits``."""
    return check_model(_over_builder(spec).make_model())


def check_model(model: onnx.ModelProto | str | Path) -> onnx.ModelProto | str | Path:
    """``onnx.checker.check_model`` (full check with shape inference); returns its argument.

    Pass a path for models with external data or over 2 GB.
    """
    if isinstance(model, onnx.ModelProto):
        onnx.checker.check_model(model, full_check=True)
    else:
        onnx.checker.check_model(str(model), full_check=True)
    return model


# ---------------------------------------------------------------------------------------------
# External data


def needs_external_data(
    nbytes: int, threshold: int | None = DEFAULT_EXTERNAL_DATA_THRESHOLD
) -> bool:
    """Whether one initializer of ``nbytes`` goes to the external data file.

    True at or above ``threshold`` (``None``: no threshold), and always when protobuf could not
    hold it. Pure: decides from sizes alone, so a 2 GB table is routed before it is allocated.
    """
    return nbytes >= PROTOBUF_SAFE_BYTES or (threshold is not None and nbytes >= threshold)


def plan_external_data(
    sizes: Mapping[str, int], threshold: int | None = DEFAULT_EXTERNAL_DATA_THRESHOLD
) -> set[str]:
    """Names of the initializers to store externally: those :func:`needs_external_data` picks,
    then the largest of the others until what stays inline fits in protobuf."""
    chosen = {name for name, n in sizes.items() if needs_external_data(n, threshold)}
    inline = sorted((-n, name) for name, n in sizes.items() if name not in chosen)  # largest first
    total = sum(-neg for neg, _ in inline)
    for neg, name in inline:
        if total < PROTOBUF_SAFE_BYTES:
            break
        chosen.add(name)
        total += neg
    return chosen


class ExternalDataFile(ExternalRouting):
    """Appends tensors to one open data file and returns TensorProtos that point into it; the
    initializers in ``stored`` point at the files that already hold them instead
    (:mod:`exporters.onnx.stored_arrays`)."""

    def __init__(
        self,
        handle: BinaryIO,
        location: str,
        names: set[str],
        stored: Mapping[str, TensorReference] | None = None,
    ) -> None:
        self.handle = handle
        self.location = location
        self.names = names
        self.stored = dict(stored or {})

    def wants(self, name: str) -> bool:
        return name in self.names or name in self.stored

    def write(self, name: str, value: np.ndarray | TensorProto) -> TensorProto:
        if name in self.stored:
            return self.stored[name].tensor(name, value)
        if isinstance(value, np.ndarray):
            arr = np.ascontiguousarray(value)
            data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
            dims = list(arr.shape)
            buffer = memoryview(arr.reshape(-1).view(np.uint8))
        else:
            if not value.HasField("raw_data"):
                return value
            data_type, dims, buffer = value.data_type, list(value.dims), value.raw_data
        return self.write_bytes(name, data_type, dims, buffer)

    def write_bytes(self, name: str, data_type: int, dims: list[int], buffer) -> TensorProto:
        pos = self.handle.seek(0, os.SEEK_END)
        pad = -pos % EXTERNAL_DATA_ALIGNMENT
        if pad:
            self.handle.write(b"\0" * pad)
        offset = pos + pad
        self.handle.write(buffer)
        tensor = TensorProto(name=name, data_type=data_type, dims=dims)
        tensor.data_location = TensorProto.EXTERNAL
        for key, val in (
            ("location", self.location),
            ("offset", offset),
            ("length", self.handle.tell() - offset),
        ):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(val)
        return tensor


def external_tensors(graph: onnx.GraphProto) -> list[TensorProto]:
    """Every externally stored tensor of an ONNX graph and its subgraphs (initializers, sparse
    initializers, tensor and sparse-tensor attributes such as a ``Constant``'s ``value`` and
    ``sparse_value``, the ``g``/``graphs`` bodies of ``If``/``Loop``/``Scan``)."""
    tensors = list(graph.initializer)
    tensors += [t for s in graph.sparse_initializer for t in (s.values, s.indices)]
    out = [t for t in tensors if t.data_location == TensorProto.EXTERNAL]
    return out + _external_in_nodes(graph.node)


def _external_in_nodes(nodes) -> list[TensorProto]:
    """Externally stored tensors of ``nodes``' attributes and of their subgraphs."""
    tensors: list[TensorProto] = []
    subgraphs = []
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                tensors.append(attr.t)
            tensors.extend(attr.tensors)
            sparse = [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
            for s in (*sparse, *attr.sparse_tensors):
                tensors += [s.values, s.indices]
            if attr.HasField("g"):
                subgraphs.append(attr.g)
            subgraphs.extend(attr.graphs)
    out = [t for t in tensors if t.data_location == TensorProto.EXTERNAL]
    for sub in subgraphs:
        out += external_tensors(sub)
    return out


def model_external_tensors(model: onnx.ModelProto) -> list[TensorProto]:
    """Every externally stored tensor of ``model``: its graph's (:func:`external_tensors`) and
    those of its model-local functions' nodes (ONNX Runtime inlines them, data included)."""
    out = external_tensors(model.graph)
    for function in model.functions:
        out += _external_in_nodes(function.node)
    return out


def external_files(model: onnx.ModelProto, rel: str) -> list[str]:
    """The files the external data of ``model`` (saved as ``rel`` in a directory) lies in, as
    sorted paths relative to that directory."""
    folder = PurePosixPath(rel).parent
    locations = {
        e.value
        for t in model_external_tensors(model)
        for e in t.external_data
        if e.key == "location"
    }
    return sorted((folder / loc).as_posix() for loc in locations)


def external_data_location(path: str | Path) -> str:
    """File name of the external data of the model at ``path``: ``<name>.data``."""
    return Path(path).name + ".data"


def _atomic_save(path: Path, write: Callable[[Path, BinaryIO], None]) -> Path:
    """Run ``write(model_path, data_handle)`` on temporary files beside ``path`` (the model's
    external data locations are relative to its directory: files it points at are found from
    there), move the data file into place, check the model by path, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    final_data = path.parent / external_data_location(path)
    # fixed temporary names (a later save overwrites what a killed one left), created by open():
    # the files get the usual mode, not mkstemp's private one
    with replacing(path, _temp_name(path)) as tmp_model:
        with replacing(final_data, _temp_name(final_data)) as tmp_data:
            with open(tmp_data, "wb") as handle:
                write(tmp_model, handle)
            has_data = tmp_data.stat().st_size > 0
        if not has_data:
            final_data.unlink()  # nothing external (or a stale file of an earlier save)
        check_model(tmp_model)
    return path


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _copy_without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose graph has no initializers (the big data is never copied)."""
    light = onnx.ModelProto()
    for fd, value in model.ListFields():
        if fd.name != "graph":
            _copy_field(light, fd, value)
    for fd, value in model.graph.ListFields():
        if fd.name != "initializer":
            _copy_field(light.graph, fd, value)
    return light


def _copy_field(dst, fd, value) -> None:  # noqa: ANN001 - protobuf descriptor plumbing
    if getattr(fd, "is_repeated", None) or getattr(fd, "label", None) == 3:  # LABEL_REPEATED
        getattr(dst, fd.name).extend(value)
    elif fd.message_type is not None:
        getattr(dst, fd.name).CopyFrom(value)
    else:
        setattr(dst, fd.name, value)


def _initializers(model: onnx.ModelProto) -> Iterator[TensorProto]:
    yield from model.graph.initializer


def save_model(
    model: onnx.ModelProto,
    path: str | Path,
    external_data_threshold_bytes: int | None = DEFAULT_EXTERNAL_DATA_THRESHOLD,
) -> Path:
    """Write ``model`` to ``path`` atomically; big initializers go to ``<path name>.data``.

    ``model`` is not modified. Returns ``path``. The written file passes ``onnx.checker``.
    """
    sizes = {t.name: t.ByteSize() for t in _initializers(model)}
    external = plan_external_data(sizes, external_data_threshold_bytes)

    def write(model_path: Path, handle: BinaryIO) -> None:
        if not external:
            onnx.save_model(model, str(model_path))
            return
        light = _copy_without_initializers(model)
        sink = ExternalDataFile(handle, external_data_location(path), external)
        for tensor in _initializers(model):
            if tensor.name in external:
                light.graph.initializer.append(sink.write(tensor.name, tensor))
            else:
                light.graph.initializer.append(tensor)
        handle.flush()
        onnx.save_model(light, str(model_path))

    return _atomic_save(Path(path), write)


def export_full_model(
    spec: DLRMGraphSpec,
    path: str | Path,
    external_data_threshold_bytes: int | None = DEFAULT_EXTERNAL_DATA_THRESHOLD,
    rowwise_impl: RowwiseImpl = "auto",
    stored: Sequence[StoredArray] = (),
) -> Path:
    """Build the full model and write it to ``path``, streaming big tables to external data.

    Same graph as :func:`build_full_model`, but an initializer that is one of the ``stored``
    arrays (memory-mapped ``.npy`` files under ``path``'s directory) points at its file
    (:mod:`exporters.onnx.stored_arrays`: the graph carries no copy of it), and of the others
    those chosen by :func:`plan_external_data` go from numpy to the data file directly, so models
    with tables over 2 GB can be written without holding a second copy in memory.
    """
    return write_graph(
        _full_builder(spec, rowwise_impl), path, external_data_threshold_bytes, stored
    )


def export_dense_graph(
    spec: DLRMGraphSpec,
    path: str | Path,
    external_data_threshold_bytes: int | None = DEFAULT_EXTERNAL_DATA_THRESHOLD,
    stored: Sequence[StoredArray] = (),
) -> Path:
    """:func:`build_dense_graph` written to ``path`` as :func:`write_graph` writes (its float
    weights that are ``stored`` arrays read in place)."""
    return write_graph(_dense_builder(spec), path, external_data_threshold_bytes, stored)


def export_over_graph(
    spec: DLRMGraphSpec,
    path: str | Path,
    external_data_threshold_bytes: int | None = DEFAULT_EXTERNAL_DATA_THRESHOLD,
    stored: Sequence[StoredArray] = (),
) -> Path:
    """:func:`build_over_graph` written to ``path`` as :func:`write_graph` writes."""
    return write_graph(_over_builder(spec), path, external_data_threshold_bytes, stored)


def write_graph(
    gb: GraphBuilder,
    path: str | Path,
    external_data_threshold_bytes: int | None = DEFAULT_EXTERNAL_DATA_THRESHOLD,
    stored: Sequence[StoredArray] = (),
) -> Path:
    """Write the graph of ``gb`` to ``path`` atomically: an initializer that is one of the
    ``stored`` arrays (memory-mapped ``.npy`` files under ``path``'s directory) points at its file
    (:mod:`exporters.onnx.stored_arrays`), of the others those :func:`plan_external_data` picks go
    from numpy to ``<path name>.data`` directly, the rest stay inside the ``.onnx``."""
    in_files = references(gb.initializers, list(stored), Path(path).parent)
    sizes = {n: b for n, b in gb.initializer_sizes().items() if n not in in_files}
    external = plan_external_data(sizes, external_data_threshold_bytes)

    def write(model_path: Path, handle: BinaryIO) -> None:
        sink = ExternalDataFile(handle, external_data_location(path), external, in_files)
        model = gb.make_model(sink if external or in_files else None)
        handle.flush()
        onnx.save_model(model, str(model_path))

    return _atomic_save(Path(path), write)
