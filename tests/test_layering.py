"""The data path reads one way: ``compress`` never imports ``exporters`` at run time (only the CLI
and ``compress.run``, :mod:`compress.api`, join them; annotations under ``if TYPE_CHECKING:`` may
name exporter types), and every module imports cleanly."""

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


def _is_type_checking(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``): imports only a type checker runs."""
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, runtime_only: bool = False) -> set[str]:
    """Modules ``path`` imports; ``runtime_only`` leaves out those under ``if TYPE_CHECKING:``
    (annotations only: a method's export hooks name the exporter types they receive)."""
    names = set()
    nodes = [ast.parse(path.read_text())]
    while nodes:
        node = nodes.pop()
        if runtime_only and _is_type_checking(node):
            nodes.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        nodes.extend(ast.iter_child_nodes(node))
    return names


@pytest.mark.parametrize("module", MODULES)
def test_module_imports(module):
    importlib.import_module(module)


def test_compress_never_imports_exporters():
    offenders = {
        str(p.relative_to(ROOT)): sorted(
            n for n in _imports(p, runtime_only=True) if n.split(".")[0] == "exporters"
        )
        for p in (ROOT / "compress").rglob("*.py")
        if p.parent.name != "cli" and p != ROOT / "compress" / "api.py"
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_quant_formats_are_pure():
    """The quantization math imports nothing of the project but itself (the compiled kernels'
    loader, ``native.py``, also uses the atomic-file helper to install the library)."""
    modules = sorted(p for p in (ROOT / "compress" / "quant").glob("*.py") if p.name != "native.py")
    assert {p.stem for p in modules} >= {"packing", "fbgemm_rowwise", "tablewise", "fake_quant"}
    project = {
        p.name: sorted(
            n
            for n in _imports(p)
            if n.split(".")[0] in ("compress", "exporters") and not n.startswith("compress.quant")
        )
        for p in modules
    }
    assert {k: v for k, v in project.items() if v} == {}
    assert not (ROOT / "compress" / "quant" / "math.py").exists()  # split by idea, no shim


def test_type_checking_imports_are_told_apart(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import compress.plan\n"
        "if TYPE_CHECKING:\n"
        "    from exporters.onnx.lookup import RowsRequest\n"
        "else:\n"
        "    import exporters.export\n"
        "def f():\n"
        "    from exporters.artifacts import read\n"
    )
    assert _imports(source) == {
        "typing",
        "compress.plan",
        "exporters.onnx.lookup",
        "exporters.export",
        "exporters.artifacts",
    }
    assert _imports(source, runtime_only=True) == {
        "typing",
        "compress.plan",
        "exporters.export",
        "exporters.artifacts",
    }


def test_serving_entry_points_import_from_the_package():
    import exporters
    from exporters.runtime.predictor import Predictor
    from exporters.runtime.torchrec_ebc import quantized_ebc_from_artifacts
    from exporters.runtime.torchrec_model import load_torchrec_model

    assert exporters.Predictor is Predictor
    assert exporters.load_torchrec_model is load_torchrec_model
    assert exporters.quantized_ebc_from_artifacts is quantized_ebc_from_artifacts
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        exporters.nope  # noqa: B018
