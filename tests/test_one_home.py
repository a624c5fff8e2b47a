"""Shared conventions live in one module each, and the atomic-write helper keeps its promises.

A value written out again in a second module can drift from the first without any test noticing
(the ROBE-Z hash constants, the code offset of symmetric quantization, DQRM's default scale
refresh), so the source of ``compress``, ``exporters`` and ``benchmarks`` is checked for copies.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from compress.io.atomic_file import atomic_open, replacing, temp_dir_beside

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("compress", "exporters", "benchmarks")
ROBE_NUMBERS = {2038074743, 634329019, 1825252241, 871205356}
SIMPLE_STATEMENTS = (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.Return, ast.Expr)


def _sources() -> Iterator[tuple[str, str, ast.AST]]:
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            text = path.read_text()
            yield path.relative_to(ROOT).as_posix(), text, ast.parse(text)


def _where(match: Callable[[ast.AST, str], bool]) -> dict[str, int]:
    """``{module: number of nodes for which match(node, module source) holds}``."""
    found: dict[str, int] = {}
    for name, text, tree in _sources():
        n = sum(1 for node in ast.walk(tree) if match(node, text))
        if n:
            found[name] = n
    return found


def _is_robe_number(node: ast.AST, _: str) -> bool:
    return isinstance(node, ast.Constant) and node.value in ROBE_NUMBERS


def _is_signed_offset(node: ast.AST, _: str) -> bool:
    """``x << (y - 1)``: the ``2^(bits-1)`` of symmetric codes."""
    return (
        isinstance(node, ast.BinOp)
        and isinstance(node.op, ast.LShift)
        and isinstance(node.right, ast.BinOp)
        and isinstance(node.right.op, ast.Sub)
        and isinstance(node.right.right, ast.Constant)
        and node.right.right.value == 1
    )


def _is_refresh_default(node: ast.AST, text: str) -> bool:
    """A simple statement about the scale refresh with the number 200 in it."""
    if not isinstance(node, SIMPLE_STATEMENTS):
        return False
    if "refresh" not in (ast.get_source_segment(text, node) or "").lower():
        return False
    return any(isinstance(c, ast.Constant) and c.value == 200 for c in ast.walk(node))


def _calls(name: str) -> Callable[[ast.AST, str], bool]:
    def match(node: ast.AST, _: str) -> bool:
        if not isinstance(node, ast.Call):
            return False
        f = node.func
        return (isinstance(f, ast.Attribute) and f.attr == name) or (
            isinstance(f, ast.Name) and f.id == name
        )

    return match


def test_robe_hash_constants_live_in_robe_hashing():
    assert set(_where(_is_robe_number)) == {"compress/methods/robe/hashing.py"}


def test_the_signed_code_offset_lives_in_quant_sizes():
    assert _where(_is_signed_offset) == {"compress/quant/sizes.py": 1}


def test_the_default_scale_refresh_lives_in_train_config():
    assert _where(_is_refresh_default) == {"compress/train/config.py": 1}


def test_one_onnx_runtime_session_factory():
    assert _where(_calls("InferenceSession")) == {"exporters/onnx/sessions.py": 1}


def test_temporary_files_beside_a_target_are_made_in_one_place():
    made = _where(_calls("mkstemp"))
    for name, n in _where(_calls("mkdtemp")).items():
        made[name] = made.get(name, 0) + n
    assert made == {"compress/io/atomic_file.py": 2}


# --------------------------------------------------------------------------------------------
# compress.io.atomic_file


def _hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_replacing_moves_the_new_file_into_place(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with replacing(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.bin.")
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # untouched until the block ends
    assert target.read_bytes() == b"new" and _hidden(tmp_path) == []


@pytest.mark.parametrize("error", [ValueError("boom"), KeyboardInterrupt()])
def test_replacing_keeps_the_old_file_when_the_block_fails(tmp_path, error):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(type(error)), replacing(target) as tmp:
        tmp.write_bytes(b"half")
        raise error
    assert target.read_bytes() == b"old" and _hidden(tmp_path) == []


def test_atomic_open_writes_through_a_named_temporary(tmp_path):
    target, tmp = tmp_path / "state.pt", tmp_path / "state.tmp"
    with atomic_open(target, tmp) as f:
        f.write(b"abc")
        assert tmp.exists() and not target.exists()
    assert target.read_bytes() == b"abc" and not tmp.exists()
    with pytest.raises(OSError), atomic_open(target, tmp) as f:
        f.write(b"xyz")
        raise OSError(28, os.strerror(28))
    assert target.read_bytes() == b"abc" and not tmp.exists()


def test_temp_dir_beside_is_removed_whatever_happens(tmp_path):
    target = tmp_path / "deep" / "model.onnx"
    with temp_dir_beside(target, "partial-") as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".model.onnx.partial-")
        (tmp / "model.onnx").write_bytes(b"m")
        os.replace(tmp / "model.onnx", target)  # what the block moved out stays
        (tmp / "left").write_bytes(b"x")
    assert target.read_bytes() == b"m" and _hidden(target.parent) == []
    with pytest.raises(RuntimeError), temp_dir_beside(target) as tmp:
        raise RuntimeError
    assert _hidden(target.parent) == []
