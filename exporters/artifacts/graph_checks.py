"""The ONNX graphs of an artifact directory held to its manifest.

ONNX Runtime takes data locations and input names from the graph itself, so a graph is refused
(:func:`onnx_graph_problems`) when it is not a readable ONNX model, reads external data (anywhere: an
initializer, a ``Constant``'s ``value`` or ``sparse_value``, an ``If``/``Loop``/``Scan`` body, a
model-local function) from a file the manifest does not list for it (format 3: the table files it reads in place, and at most one
``.data`` file), reads bytes outside the payload of such a file (an offset into a ``.npy`` header,
past its end, or a length that is not the tensor's size), or declares inputs/outputs other than
the manifest's model and features give it (:data:`exporters.onnx.declarations.GRAPH_IO`): a
manifest that swaps features is caught here. Only the graph and file headers are read (no external
data), by :mod:`exporters.onnx.proto_reader`, without the ``onnx`` package (``verify`` starts in a
fraction of its import time).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from compress.io.model_spec import DLRMSpec
from exporters.artifacts.confined_paths import path_problem
from exporters.onnx.declarations import GRAPH_IO, GraphShape, feature_input_names
from exporters.onnx.proto_reader import ExternalTensor, ModelFile, ProtoError, read_model_file

#: ``TensorProto.DataType`` names (onnx.proto), as problem lines show them (lower case).
DATA_TYPE_NAMES = (
    "UNDEFINED", "FLOAT", "UINT8", "INT8", "UINT16", "INT16", "INT32", "INT64", "STRING", "BOOL",
    "FLOAT16", "DOUBLE", "UINT32", "UINT64", "COMPLEX64", "COMPLEX128", "BFLOAT16",
    "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "UINT4", "INT4",
    "FLOAT4E2M1", "FLOAT8E8M0", "UINT2", "INT2", "FLOAT6E2M3", "FLOAT6E3M2",
)  # fmt: skip
#: Bytes per element of each data type with a fixed size (the numpy dtype onnx maps it to; the
#: packed 4-bit types: half a byte, :func:`_tensor_bytes`); STRING and unknown types: none.
ITEM_BYTES = {
    1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16,
    16: 2, 17: 1, 18: 1, 19: 1, 20: 1, 23: 1, 24: 1, 25: 1, 26: 1, 27: 1, 28: 1,
}  # fmt: skip
PACKED_4BIT = (21, 22)  # UINT4, INT4


def onnx_graph_problems(root: Path, spec: DLRMSpec, graphs: list) -> list[str]:
    """A line for every graph of ``graphs`` (:class:`~exporters.artifacts.manifest_schema.OnnxGraphEntry`)
    that is not a readable ONNX model, reads external data the manifest does not list for it or
    outside a listed file's payload, or declares inputs/outputs other than the model ``spec`` (the
    manifest's) gives it. ONNX Runtime takes data locations and input names from the graph
    itself, so both are held to the manifest (module docstring)."""
    out = []
    for graph in graphs:
        path = root / graph.file
        try:
            model = read_model_file(path)
        except (ProtoError, OSError) as e:
            out.append(f"{path}: not a readable ONNX model ({e})")
            continue
        out += _external_data_problems(root, path, graph, model)
        out += declared_io_problems(path, graph, model, spec)
    return out


def _external_data_problems(root: Path, path: Path, graph, model: ModelFile) -> list[str]:
    """A line for every externally stored tensor of ``model`` (the manifest graph ``graph`` at
    ``path``) that reads a file the manifest does not list for it, or bytes outside the payload
    of that file (:func:`_span_problem`)."""
    folder = PurePosixPath(graph.file).parent
    listed = ", ".join(map(repr, graph.external_data)) or "none"
    out = []
    seen: set[str] = set()
    for tensor in model.external_tensors:
        info = tensor.info
        location = info.get("location", "")
        rel = (folder / location).as_posix() if not path_problem(location) else None
        if rel is None or rel not in graph.external_data:
            if location not in seen:
                seen.add(location)
                out.append(
                    f"{path}: reads external data from {location!r}; the manifest lists {listed}"
                )
            continue
        problem = _span_problem(root / rel, tensor, info)
        if problem:
            out.append(f"{path}: initializer {tensor.name!r} reads {rel} {problem}")
    return out


def _span_problem(file: Path, tensor: ExternalTensor, info: dict[str, str]) -> str | None:
    """Why ``tensor``'s external bytes (``offset``, ``length``) are not all payload of ``file``
    (inside it, past a ``.npy`` header, exactly the tensor's size), or ``None``."""
    offset, length = info.get("offset"), info.get("length")
    if offset is None or length is None or not (offset.isdigit() and length.isdigit()):
        return f"with offset {offset!r} and length {length!r} (two byte counts are required)"
    from exporters.artifacts.directory_checks import read_npy_header  # (imports this module)

    start, nbytes = int(offset), int(length)
    expected = _tensor_bytes(tensor)
    if expected is not None and nbytes != expected:
        return f"as {nbytes} bytes; its type and shape make {expected}"
    try:
        size = file.stat().st_size
        payload = read_npy_header(file)[2] if file.suffix == ".npy" else 0
    except (OSError, ValueError, EOFError) as e:
        return f"({e})"
    if start < payload or start + nbytes > size:
        return (
            f"at bytes [{start}, {start + nbytes}), outside its payload [{payload}, {size}) "
            "(an offset or length changed after export?)"
        )
    return None


def _tensor_bytes(tensor: ExternalTensor) -> int | None:
    """Bytes of a tensor's data from its type and dims (``None`` for a type without a fixed
    size)."""
    import math

    elements = math.prod(tensor.dims)
    if tensor.data_type in PACKED_4BIT:
        return (elements + 1) // 2
    itemsize = ITEM_BYTES.get(tensor.data_type)
    return None if itemsize is None else elements * itemsize


def declared_io_problems(path: Path, graph, model: ModelFile, spec: DLRMSpec) -> list[str]:
    """``[problem]`` when the ONNX graph's declared inputs or outputs (names in order, element
    types, fixed dims) are not what the model ``spec`` gives the manifest graph ``graph``
    (:data:`exporters.onnx.declarations.GRAPH_IO`), or the manifest maps a feature of the full
    model to other input names than its own; else ``[]``."""
    io_of = GRAPH_IO.get(graph.name)
    if io_of is None:
        return [f"{path}: graph {graph.name!r} is not one dqrm-compress writes"]
    shape = GraphShape(spec.feature_names, spec.dense_in_features, spec.embedding_dim)
    try:
        want_inputs, want_outputs = io_of(shape)
        names = feature_input_names(shape) if graph.name == "model" else {}
    except ValueError as e:  # two features whose input names coincide
        return [f"{path}: the manifest's features give no valid inputs ({e})"]
    for f, pair in graph.features.items():
        if names.get(f) != pair:
            return [
                f"{path}: the manifest feeds feature {f!r} to inputs {list(pair)}, its graph "
                f"{graph.name!r} takes it as {list(names.get(f, ()))}"
            ]
    for kind, want, have in (
        ("input", want_inputs, model.inputs),
        ("output", want_outputs, model.outputs),
    ):
        got = [(v.name, v.elem_type, v.dims) for v in have]
        for i, (w, g) in enumerate(zip(want, got, strict=False)):
            if (w.name, w.elem_type, w.shape) != g:
                return [
                    f"{path}: graph {graph.name!r} {kind} {i} is {g[0]!r} {_show_decl(g)}, the "
                    f"manifest's model makes it {w.name!r} {_show_decl((w.name, w.elem_type, w.shape))}"
                ]
        if len(got) != len(want):
            extra = got[len(want)][0] if len(got) > len(want) else want[len(got)].name
            return [
                f"{path}: graph {graph.name!r} declares {len(got)} {kind}s, the manifest's model "
                f"{len(want)} ({'unexpected' if len(got) > len(want) else 'missing'} {kind} "
                f"{extra!r})"
            ]
    return []


def _show_decl(decl: tuple[str, int, tuple[int | str, ...]]) -> str:
    """``float[batch, 13]``: an element type (its name, or its number) and dims."""
    known = 0 <= decl[1] < len(DATA_TYPE_NAMES)
    name = DATA_TYPE_NAMES[decl[1]] if known else str(decl[1])
    return f"{name.lower()}{list(decl[2])}"
