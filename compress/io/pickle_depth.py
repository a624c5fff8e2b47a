"""Refuse a pickle that nests objects deeply enough to crash Python, before it is unpickled.

Unpickling builds nested objects without recursion, but using them may recurse in C: a dict key
that is a tuple nested 200,000 deep is hashed when the dict is built, and ``tuple.__hash__``
recurses once per level until the interpreter's stack overflows (a segfault, not an exception).
:func:`check_pickle_depth` therefore reads the pickle's opcodes with :func:`pickletools.genops`
(nothing is built or run) and tracks how deep each object on the unpickler's stack is, from the
stack effects :mod:`pickletools` documents for every opcode; an object deeper than
:data:`MAX_PICKLE_DEPTH` is refused. Real checkpoints nest a few levels (a state dict of tensors,
DCP's metadata dataclasses), so the bound never refuses one.

Depth is exact for objects built bottom-up (tuples and frozensets, the hashable containers whose
hashing recurses). A list or dict filled in place after it was put inside another object is
counted at the depth it had then; deep lists and dicts are freed and compared without unbounded
C recursion, so they cannot crash Python this way.

A stream whose opcodes are malformed stops the scan where the unpickler would stop too; the loader
then reports the damage in its own words.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from compress.errors import CheckpointError, first_line

MAX_PICKLE_DEPTH = 1000
# A legacy (non-zip) torch.save file is five pickles in a row (magic number, protocol, system
# info, the object, its storage keys) followed by raw storage bytes.
_LEGACY_PICKLES = 5


class _Node:
    """One object on the simulated stack: how many containers deep it is (an atom is 1)."""

    __slots__ = ("depth",)

    def __init__(self, depth: int) -> None:
        self.depth = depth


_MARK = object()


class _Malformed(Exception):
    """The opcodes do not make a valid pickle: the unpickler fails at the same place."""


class _BoundedReader:
    """``stream`` read at most ``size`` bytes in all: a length field of 2**62 in the pickle reads
    what is there instead of allocating what the field claims."""

    def __init__(self, stream: IO[bytes], size: int) -> None:
        self._stream, self._left = stream, size

    def read(self, n: int = -1) -> bytes:
        n = self._left if n is None or n < 0 else min(n, self._left)
        data = self._stream.read(n)
        self._left -= len(data)
        return data

    def readline(self) -> bytes:
        line = self._stream.readline(self._left)
        self._left -= len(line)
        return line


def pickle_depth_exceeds(stream: IO[bytes], limit: int = MAX_PICKLE_DEPTH) -> int | None:
    """The depth of the first object in the pickle read from ``stream`` that is nested more than
    ``limit`` deep, or ``None`` when there is none (or the opcodes are malformed before one)."""
    try:
        return _scan(pickletools.genops(stream), limit)
    except (_Malformed, ValueError, IndexError, KeyError, EOFError):
        return None


def _scan(ops: Iterator, limit: int) -> int | None:
    stack: list[object] = []
    memo: dict[object, object] = {}
    for op, arg, _pos in ops:
        kind, count, marked, produces = _EFFECTS[op.code]
        if kind == _PLAIN:
            if marked:
                popped = _pop_to_mark(stack, count)
            elif count:
                popped = _pop(stack, count)
            else:
                popped = ()
            depth = max((p.depth for p in popped), default=0) + 1
            for is_mark in produces:
                stack.append(_MARK if is_mark else _Node(depth))
            if depth > limit:
                return depth
        elif kind == _IN_PLACE:
            popped = _pop_to_mark(stack, count) if marked else _pop(stack, count)
            target = popped[0]
            target.depth = max(target.depth, max((p.depth for p in popped[1:]), default=0) + 1)
            stack.append(target)
            if target.depth > limit:
                return target.depth
        elif kind == _PUT:
            memo[len(memo) if arg is None else arg] = _top(stack)
        elif kind == _GET:
            stack.append(memo[arg])
        elif kind == _DUP:
            stack.append(_top(stack))
        elif kind == _POP:
            if not stack:
                raise _Malformed
            stack.pop()  # a node, or a mark (POP of a mark is POP_MARK)
        else:  # STOP
            return None
    return None


def _top(stack: list[object]) -> object:
    if not stack or stack[-1] is _MARK:
        raise _Malformed
    return stack[-1]


def _pop(stack: list[object], count: int) -> list[_Node]:
    if count > len(stack):
        raise _Malformed
    popped = stack[len(stack) - count :]
    del stack[len(stack) - count :]
    if any(p is _MARK for p in popped):
        raise _Malformed
    return popped  # type: ignore[return-value]


def _pop_to_mark(stack: list[object], count: int) -> list[_Node]:
    """The items above the topmost mark, after the ``count`` operands below that mark."""
    for at in range(len(stack) - 1, -1, -1):
        if stack[at] is _MARK:
            break
    else:
        raise _Malformed
    sliced = stack[at + 1 :]
    del stack[at:]
    return _pop(stack, count) + sliced


_PLAIN, _IN_PLACE, _PUT, _GET, _DUP, _POP, _STOP = range(7)


def _effects() -> dict[str, tuple[int, int, bool, tuple[bool, ...]]]:
    """Per opcode: (kind, operands below any mark, consumes a mark, what it pushes: mark or not),
    from pickletools' documented stack effects."""
    special = {
        **dict.fromkeys(
            ("APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"), _IN_PLACE
        ),
        **dict.fromkeys(("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"), _PUT),
        **dict.fromkeys(("GET", "BINGET", "LONG_BINGET"), _GET),
        "DUP": _DUP,
        "POP": _POP,
        "STOP": _STOP,
    }
    effects = {}
    for op in pickletools.opcodes:
        before, mark = op.stack_before, pickletools.markobject
        marked = mark in before  # [operands..., markobject, stackslice]
        count = before.index(mark) if marked else len(before)
        produces = tuple(item is mark for item in op.stack_after)
        effects[op.code] = (special.get(op.name, _PLAIN), count, marked, produces)
    return effects


_EFFECTS = _effects()


def _refusal(where: str, depth: int) -> CheckpointError:
    return CheckpointError(
        f"{where}: refused: the pickle nests objects more than {MAX_PICKLE_DEPTH} levels deep "
        f"(found {depth}; unpickling it could crash Python); nothing was loaded"
    )


def check_pickle_bytes(data: bytes, where: str) -> None:
    """Raise :class:`CheckpointError` naming ``where`` if the pickle in ``data`` nests too deep."""
    depth = pickle_depth_exceeds(io.BytesIO(data))
    if depth is not None:
        raise _refusal(where, depth)


def check_torch_file(path: Path) -> None:
    """Raise :class:`CheckpointError` naming ``path`` (and the archive member) if a pickle of the
    ``torch.save`` file ``path`` nests too deep: every ``.pkl`` member of a zip archive, or the
    leading pickles of a legacy file. A zip whose members cannot be read is refused as corrupt."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    if not info.filename.endswith(".pkl"):
                        continue
                    with archive.open(info) as member:
                        depth = pickle_depth_exceeds(_BoundedReader(member, info.file_size))
                    if depth is not None:
                        raise _refusal(f"{path} ({info.filename})", depth)
        except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as e:
            raise CheckpointError(
                f"{path}: not a readable torch checkpoint (truncated or corrupt?): {first_line(e)}"
            ) from e
        return
    with open(path, "rb") as f:
        reader = _BoundedReader(f, path.stat().st_size)
        for _ in range(_LEGACY_PICKLES):
            depth = pickle_depth_exceeds(reader)
            if depth is not None:
                raise _refusal(str(path), depth)
