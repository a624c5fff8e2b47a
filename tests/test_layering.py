"""The data path reads one way: ``compress`` never imports ``exporters`` (only the CLI joins them),
and every module imports cleanly."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for pkg in ("compress", "exporters")
    for p in (ROOT / pkg).rglob("*.py")
    if p.name not in ("__main__.py",)
)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", MODULES)
def test_module_imports(module):
    importlib.import_module(module)


def test_compress_never_imports_exporters():
    offenders = {
        str(p.relative_to(ROOT)): sorted(n for n in _imports(p) if n.split(".")[0] == "exporters")
        for p in (ROOT / "compress").rglob("*.py")
        if p.parent.name != "cli"
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_quant_math_is_pure():
    project = {
        n
        for n in _imports(ROOT / "compress" / "quant" / "math.py")
        if n.split(".")[0] in ("compress", "exporters")
    }
    assert project == set()
