"""What the artifact checks read from an ONNX model file, decoded without the ``onnx`` package.

``import onnx`` costs about half a second and more (``ml_dtypes`` and the generated protobuf
classes), most of ``dqrm-compress verify``'s time, which needs only each graph's declared inputs
and outputs and every tensor that reads external data. :func:`read_model_file` decodes just those
fields of ``onnx.proto``'s ``ModelProto`` from the protobuf wire format
(https://protobuf.dev/programming-guides/encoding/):

- the graph's ``input`` and ``output`` declarations: name, tensor element type, dimensions (a
  number, or the symbolic name);
- every tensor whose ``data_location`` is ``EXTERNAL``, wherever ONNX Runtime would read one: the
  graph's initializers and sparse initializers, tensor attributes of its nodes (``t``,
  ``tensors``, ``sparse_tensor``, ``sparse_tensors``: a ``Constant``'s ``value``...), the
  ``g``/``graphs`` bodies of ``If``/``Loop``/``Scan`` (recursively), and the nodes of the
  model-local functions: name, data type, dims, and its ``external_data`` entries.

Decoding follows protobuf's own parser, so a crafted file cannot show this reader one thing and
ONNX Runtime another: a repeated field keeps every element (packed or not), a singular scalar its
last value (an ``int32`` truncated from the 64-bit varint), a singular message seen several times
is the merge of all of them (parsed from the concatenation of their bytes, which protobuf defines
as merging), a ``oneof`` its last member, and the closed enum ``data_location`` ignores values it
does not define (proto2). Unknown fields are skipped by their wire type; a malformed message
(wire type 6 or 7, field number 0, a truncated field or varint, an unterminated group) raises
:class:`ProtoError`. Only numbers, names and lengths are read: the tensors' bytes are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

#: Bytes of a message or field: a ``memoryview`` of the file's bytes (not copied) or ``bytes``.
Buffer = Union[bytes, memoryview]  # noqa: UP007 - a runtime alias

#: ``TensorProto.DataLocation.EXTERNAL`` (``DEFAULT`` is 0; proto2 ignores other values).
EXTERNAL = 1
_DATA_LOCATIONS = (0, 1)

_VARINT, _FIXED64, _BYTES, _GROUP_START, _GROUP_END, _FIXED32 = 0, 1, 2, 3, 4, 5
_MAX_DEPTH = 100  # protobuf's default recursion limit


class ProtoError(ValueError):
    """The bytes are not a well-formed protobuf message."""


@dataclass(frozen=True)
class ValueDecl:
    """A graph input or output: ``name``, tensor ``elem_type`` (0 when it is not a tensor type)
    and ``dims`` (a fixed size, or the symbolic name; ``""`` when neither is set)."""

    name: str
    elem_type: int
    dims: tuple[int | str, ...]


@dataclass(frozen=True)
class ExternalTensor:
    """A tensor stored in external data: ``name``, ``data_type``, ``dims`` and its
    ``external_data`` ``(key, value)`` entries in file order (:attr:`info`: the last of a key)."""

    name: str
    data_type: int
    dims: tuple[int, ...]
    external_data: tuple[tuple[str, str], ...]

    @property
    def info(self) -> dict[str, str]:
        return dict(self.external_data)


@dataclass(frozen=True)
class ModelFile:
    """What :func:`read_model_file` read: the graph's declared inputs and outputs, and every
    externally stored tensor (module docstring)."""

    inputs: tuple[ValueDecl, ...]
    outputs: tuple[ValueDecl, ...]
    external_tensors: tuple[ExternalTensor, ...]


def read_model_file(path: str | Path) -> ModelFile:
    """Decode the ONNX model file ``path`` (:class:`ProtoError` when it is not a protobuf message;
    ``OSError`` when it cannot be read)."""
    return read_model_bytes(Path(path).read_bytes())


def read_model_bytes(data: Buffer) -> ModelFile:
    """:func:`read_model_file` of a model's serialized bytes."""
    model = _Fields(data)
    graph = _Fields(model.message(7))  # ModelProto.graph
    external = _graph_external(graph, 0)
    for function in model.repeated(25):  # ModelProto.functions
        for node in _Fields(function).repeated(7):  # FunctionProto.node
            external += _node_external(node, 0)
    return ModelFile(
        inputs=tuple(_value_decl(v) for v in graph.repeated(11)),
        outputs=tuple(_value_decl(v) for v in graph.repeated(12)),
        external_tensors=tuple(external),
    )


# ---------------------------------------------------------------------------------------------
# The messages read


def _graph_external(graph: _Fields, depth: int) -> list[ExternalTensor]:
    """Externally stored tensors of a ``GraphProto`` and its nodes' subgraphs."""
    if depth > _MAX_DEPTH:
        raise ProtoError("graphs nested too deep")
    out = [t for t in map(_tensor, graph.repeated(5)) if t is not None]  # initializer
    for sparse in graph.repeated(15):  # sparse_initializer
        out += _sparse_external(sparse)
    for node in graph.repeated(1):  # node
        out += _node_external(node, depth)
    return out


def _sparse_external(data: Buffer) -> list[ExternalTensor]:
    """``SparseTensorProto``: ``values`` (1) and ``indices`` (2)."""
    sparse = _Fields(data)
    tensors = [_tensor(sparse.message(1)) if sparse.has(1) else None]
    tensors.append(_tensor(sparse.message(2)) if sparse.has(2) else None)
    return [t for t in tensors if t is not None]


def _node_external(data: Buffer, depth: int) -> list[ExternalTensor]:
    """A ``NodeProto``'s attributes (5): tensors and subgraphs."""
    out: list[ExternalTensor] = []
    for raw in _Fields(data).repeated(5):
        attr = _Fields(raw)
        tensors = [attr.message(5)] if attr.has(5) else []  # t
        tensors += attr.repeated(10)  # tensors
        out += [t for t in map(_tensor, tensors) if t is not None]
        sparse = [attr.message(22)] if attr.has(22) else []  # sparse_tensor
        for s in sparse + attr.repeated(23):  # sparse_tensors
            out += _sparse_external(s)
        graphs = [attr.message(6)] if attr.has(6) else []  # g
        for g in graphs + attr.repeated(11):  # graphs
            out += _graph_external(_Fields(g), depth + 1)
    return out


def _tensor(data: Buffer) -> ExternalTensor | None:
    """A ``TensorProto`` stored externally, else ``None``."""
    t = _Fields(data)
    locations = [v for v in t.varints(14) if v in _DATA_LOCATIONS]  # data_location (closed enum)
    if not locations or locations[-1] != EXTERNAL:
        return None
    entries = []
    for raw in t.repeated(13):  # external_data: StringStringEntryProto key (1), value (2)
        entry = _Fields(raw)
        entries.append((entry.string(1), entry.string(2)))
    dims = tuple(_int64(v) for v in t.varints(1, packed=True))
    return ExternalTensor(t.string(8), _int32(t.last_varint(2)), dims, tuple(entries))


def _value_decl(data: Buffer) -> ValueDecl:
    """A ``ValueInfoProto``: name (1), and from its ``TypeProto`` (2) the ``tensor_type`` (1)'s
    ``elem_type`` (1) and ``shape`` (2) dims."""
    v = _Fields(data)
    tensor = _Fields(_oneof_member(_Fields(v.message(2)), 1, (1, 4, 5, 7, 8, 9)))
    shape = _Fields(tensor.message(2))
    return ValueDecl(
        v.string(1), _int32(tensor.last_varint(1)), tuple(map(_dim, shape.repeated(1)))
    )


def _dim(data: Buffer) -> int | str:
    """A ``TensorShapeProto.Dimension``: ``dim_value`` (1) or ``dim_param`` (2), the last set."""
    last: int | str = ""
    for number, wire, value in _Fields(data).items:
        if number == 1 and wire == _VARINT:
            last = _int64(value)
        elif number == 2 and wire == _BYTES:
            last = _text(value)
    return last


def _oneof_member(message: _Fields, member: int, members: tuple[int, ...]) -> Buffer:
    """The merged bytes of oneof message field ``member`` of ``message`` (empty when another of
    ``members`` was set after it, or it is absent): setting a member clears the others."""
    parts: list[Buffer] = []
    for number, wire, value in message.items:
        if number in members and wire == _BYTES:
            parts = [*parts, value] if number == member else []
    return _joined(parts)


# ---------------------------------------------------------------------------------------------
# Wire format


def _int64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >> 63 else value


def _int32(value: int) -> int:
    value &= (1 << 32) - 1
    return value - (1 << 32) if value >> 31 else value


def _text(data: Buffer) -> str:
    return bytes(data).decode("utf-8", errors="surrogateescape")


def _joined(parts: list[Buffer]) -> Buffer:
    return parts[0] if len(parts) == 1 else b"".join(parts)


class _Fields:
    """The fields of one message, decoded once: ``items`` is ``[(number, wire type, value)]`` in
    file order, ``value`` an ``int`` (varint, fixed) or the bytes of a length-delimited field. A
    field read with another wire type than its own is an unknown field to protobuf: skipped."""

    def __init__(self, data: Buffer) -> None:
        self.items = _items(memoryview(data))

    def has(self, number: int) -> bool:
        return any(n == number and w == _BYTES for n, w, _ in self.items)

    def message(self, number: int) -> Buffer:
        """A singular message field: the merge of every occurrence (empty when absent)."""
        return _joined(self.repeated(number))

    def repeated(self, number: int) -> list[Buffer]:
        """A repeated message (or string) field's elements."""
        return [v for n, w, v in self.items if n == number and w == _BYTES]

    def string(self, number: int) -> str:
        """A singular string field: its last value (``""`` when absent)."""
        values = self.repeated(number)
        return _text(values[-1]) if values else ""

    def varints(self, number: int, packed: bool = False) -> list[int]:
        """Every value of a varint field in file order; ``packed`` (a repeated field) also reads
        the packed encoding."""
        out: list[int] = []
        for n, w, v in self.items:
            if n != number:
                continue
            if w == _VARINT:
                out.append(v)
            elif w == _BYTES and packed:
                at = 0
                while at < len(v):
                    value, at = _varint(v, at)
                    out.append(value)
        return out

    def last_varint(self, number: int) -> int:
        values = self.varints(number)
        return values[-1] if values else 0


def _varint(data: Buffer, at: int) -> tuple[int, int]:
    """The varint at ``data[at:]`` (64 bits kept) and the position after it."""
    value = shift = 0
    for i in range(10):
        if at + i >= len(data):
            raise ProtoError("truncated varint")
        byte = data[at + i]
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value & ((1 << 64) - 1), at + i + 1
    raise ProtoError("varint longer than 10 bytes")


def _items(data: memoryview) -> list[tuple[int, int, object]]:
    """``(field number, wire type, value)`` of every field of the message ``data``; groups (an
    obsolete encoding, unknown to onnx.proto) are skipped."""
    out: list[tuple[int, int, object]] = []
    at, end = 0, len(data)
    while at < end:
        number, wire, at = _tag(data, at)
        if wire == _GROUP_START:
            at = _skip_group(data, at, number)
            continue
        if wire == _GROUP_END:
            raise ProtoError("end-group tag outside a group")
        value, at = _value(data, at, wire)
        out.append((number, wire, value))
    return out


def _tag(data: memoryview, at: int) -> tuple[int, int, int]:
    key, at = _varint(data, at)
    number, wire = key >> 3, key & 7
    if number == 0 or number > (1 << 29) - 1:
        raise ProtoError(f"field number {number}")
    if wire > _FIXED32:
        raise ProtoError(f"wire type {wire}")
    return number, wire, at


def _value(data: memoryview, at: int, wire: int) -> tuple[object, int]:
    """The value of a field of wire type ``wire`` (not a group) at ``at``, and the position after
    it."""
    if wire == _VARINT:
        return _varint(data, at)
    size = {_FIXED64: 8, _FIXED32: 4}.get(wire)
    if size is None:  # length-delimited
        size, at = _varint(data, at)
    if at + size > len(data):
        raise ProtoError("truncated field")
    if wire == _BYTES:
        return data[at : at + size], at + size
    return int.from_bytes(data[at : at + size], "little"), at + size


def _skip_group(data: memoryview, at: int, number: int) -> int:
    """The position after the group of field ``number`` whose content starts at ``at``."""
    open_groups = [number]
    while open_groups:
        if at >= len(data):
            raise ProtoError("unterminated group")
        n, wire, at = _tag(data, at)
        if wire == _GROUP_START:
            open_groups.append(n)
            if len(open_groups) > _MAX_DEPTH:
                raise ProtoError("groups nested too deep")
        elif wire == _GROUP_END:
            if open_groups.pop() != n:
                raise ProtoError("mismatched end-group tag")
        else:
            _, at = _value(data, at, wire)
    return at
