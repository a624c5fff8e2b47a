"""The ONNX graphs of an artifact directory held to its manifest.

ONNX Runtime takes data locations and input names from the graph itself, so a graph is refused
(:func:`onnx_graph_problems`) when it is not a readable ONNX model, reads external data (anywhere: an
initializer, a ``Constant``'s ``value`` or ``sparse_value``, an ``If``/``Loop``/``Scan`` body, a
model-local function) from a file the manifest does not list for it (format 3: the table files it reads in place, and at most one
``.data`` file), reads bytes outside the payload of such a file (an offset into a ``.npy`` header,
past its end, or a length that is not the tensor's size), or declares inputs/outputs other than
the manifest's model and features give it (:data:`exporters.onnx.model.GRAPH_IO`): a manifest that
swaps features is caught here. Only the graph and file headers are read (no external data).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from compress.io.model_spec import DLRMSpec
from exporters.artifacts.confined_paths import path_problem


def onnx_graph_problems(root: Path, spec: DLRMSpec, graphs: list) -> list[str]:
    """A line for every graph of ``graphs`` (:class:`~exporters.artifacts.manifest_schema.OnnxGraphEntry`)
    that is not a readable ONNX model, reads external data the manifest does not list for it or
    outside a listed file's payload, or declares inputs/outputs other than the model ``spec`` (the
    manifest's) gives it. ONNX Runtime takes data locations and input names from the graph
    itself, so both are held to the manifest (module docstring)."""
    import onnx
    from google.protobuf.message import DecodeError

    out = []
    for graph in graphs:
        path = root / graph.file
        try:
            model = onnx.load(str(path), load_external_data=False)
        except (DecodeError, ValueError, OSError) as e:
            out.append(f"{path}: not a readable ONNX model ({e})")
            continue
        out += _external_data_problems(root, path, graph, model)
        out += declared_io_problems(path, graph, model.graph, spec)
    return out


def _external_data_problems(root: Path, path: Path, graph, model) -> list[str]:
    """A line for every externally stored tensor of ``model`` (the manifest graph ``graph`` at
    ``path``) that reads a file the manifest does not list for it, or bytes outside the payload
    of that file (:func:`_span_problem`)."""
    folder = PurePosixPath(graph.file).parent
    listed = ", ".join(map(repr, graph.external_data)) or "none"
    out = []
    seen: set[str] = set()
    from exporters.onnx.model import model_external_tensors

    for tensor in model_external_tensors(model):
        info = {e.key: e.value for e in tensor.external_data}
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


def _span_problem(file: Path, tensor, info: dict[str, str]) -> str | None:
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


def _tensor_bytes(tensor) -> int | None:
    """Bytes of a tensor's data from its type and dims (``None`` for a type without a fixed
    size)."""
    import math

    import onnx

    elements = math.prod(tensor.dims)
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (elements + 1) // 2
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None
    return elements * itemsize if tensor.data_type != onnx.TensorProto.STRING else None


def declared_io_problems(path: Path, graph, onnx_graph, spec: DLRMSpec) -> list[str]:
    """``[problem]`` when the ONNX graph's declared inputs or outputs (names in order, element
    types, fixed dims) are not what the model ``spec`` gives the manifest graph ``graph``
    (:data:`exporters.onnx.model.GRAPH_IO`), or the manifest maps a feature of the full model to
    other input names than its own; else ``[]``."""
    from exporters.onnx.model import GRAPH_IO, GraphShape, feature_input_names

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
        ("input", want_inputs, onnx_graph.input),
        ("output", want_outputs, onnx_graph.output),
    ):
        got = [_decl_of(v) for v in have]
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


def _decl_of(value_info) -> tuple[str, int, tuple[int | str, ...]]:
    """``(name, element type, dims)`` of an ONNX graph input/output (a dim is its value, or its
    symbolic name)."""
    t = value_info.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim)
    return value_info.name, t.elem_type, dims


def _show_decl(decl: tuple[str, int, tuple[int | str, ...]]) -> str:
    import onnx

    name = (
        onnx.TensorProto.DataType.Name(decl[1])
        if decl[1] in onnx.TensorProto.DataType.values()
        else str(decl[1])
    )
    return f"{name.lower()}{list(decl[2])}"
