"""The method registry is the extension point: a method defined here, in the test module, and
registered with one line goes recipe -> plan -> QAT -> convert -> artifacts -> ONNX Runtime parity
-> TorchRec loader without a change to any project module; the registry refuses duplicates; an
unknown method is a one-line recipe error listing the registered ones; and the built-in methods'
names appear only in their own modules and the registry."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from helpers import tiny_world
from test_torchrec_model import _assert_ort_parity

from compress import pipeline
from compress.cli.main import main
from compress.data.npz import load_npz
from compress.errors import RecipeError
from compress.io.model_spec import TableSpec
from compress.methods import registry
from compress.methods.base import (
    ConvertedTable,
    MethodConfig,
    MethodFields,
    PreparedTable,
    TableMethod,
)
from compress.methods.qat_embedding import (
    QATEmbeddingBagCollection,
    QuantizedEmbeddingBagCollection,
)
from compress.methods.registry import MethodError, register
from compress.plan import format_plan
from compress.recipe.parse import parse_recipe
from compress.recipe.reader import BOOLEAN
from compress.recipe.toml_out import recipe_to_toml
from compress.train.evaluate import predict_logits
from exporters.artifacts.read import load_artifacts
from exporters.artifacts.verify import verify_artifacts
from exporters.export import export
from exporters.runtime.predictor import Predictor
from exporters.runtime.torchrec_model import OURS, load_torchrec_model, table_placement

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------
# A new method, defined here: symmetric INT8 codes per row with a float32 scale per row
# (q = round(w / s), s = max|row| / 127; value q * s), trainable when the recipe says qat = true.

NAME = "int8sym"


def _row_scale(w: torch.Tensor) -> torch.Tensor:
    return w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127


def _codes(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(w / scale).clamp_(-127, 127)


@dataclass(frozen=True)
class SymConfig(MethodConfig):
    qat: bool = False
    METHOD: ClassVar[str] = NAME


class SymPrepared(PreparedTable):
    def fake_quantize_(self, rows: torch.Tensor) -> None:
        scale = _row_scale(rows)
        rows.copy_(_codes(rows, scale) * scale)


class SymConverted(ConvertedTable):
    ROLES = ("data", "scale")

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        codes = self.data.index_select(0, ids).to(torch.float32)
        return codes * self.scale.index_select(0, ids).unsqueeze(1)


@dataclass(frozen=True)
class SymTable:
    codes: np.ndarray  # int8 [R, D]
    scale: np.ndarray  # float32 [R]
    METHOD: ClassVar[str] = NAME

    @property
    def num_rows(self) -> int:
        return int(self.codes.shape[0])

    def validate(self, dim: int, what: str) -> None:
        if self.codes.dtype != np.int8 or self.codes.shape[1:] != (dim,):
            raise ValueError(f"{what}: codes must be int8 [R, {dim}]")


class SymMethod(TableMethod):
    name = NAME
    config_type = SymConfig
    converted_type = SymConverted

    def recipe_keys(self, spelling: str) -> tuple[str, ...]:
        return ("qat",)

    def parse(self, spelling: str, keys: Any) -> MethodConfig:
        return SymConfig(qat=bool(keys.get("qat", BOOLEAN)))

    def recipe_items(self, config: SymConfig) -> list[tuple[str, Any]]:
        return [("method", NAME), ("qat", config.qat)]

    def fields(self, config: SymConfig) -> MethodFields:
        return MethodFields(NAME, 8)

    def describe(self, config: SymConfig) -> str:
        return f"{NAME}{' qat' if config.qat else ''}"

    def trains(self, config: SymConfig) -> bool:
        return config.qat

    def table_bytes(self, config: MethodConfig, table: TableSpec) -> int:
        return table.num_embeddings * (table.embedding_dim + 4)

    def prepare(self, config: SymConfig, weight: torch.Tensor) -> PreparedTable:
        return SymPrepared(weight, config, trainable=config.qat)

    def convert(self, prepared: PreparedTable, name: str) -> ConvertedTable:
        w = prepared.weight.detach()
        scale = _row_scale(w)
        arrays = {"data": _codes(w, scale).to(torch.int8), "scale": scale.squeeze(1).contiguous()}
        return SymConverted(name, w.shape[0], w.shape[1], prepared.config, arrays)

    def stored_arrays(self, rows: int, dim: int, bits: int | None) -> dict:
        return {"data": ("int8", (rows, dim)), "scale": ("float32", (rows,))}

    def graph_table(self, table: Any) -> SymTable:
        return SymTable(table.arrays["data"], table.arrays["scale"])

    def onnx_rows(self, request: Any) -> str:
        gb, kind = request.gb, request.table.kind
        codes = gb.op("Gather", [request.initializer("codes", kind.codes), request.ids], axis=0)
        scale = request.row_param("scale", kind.scale)  # float32 [N, 1]
        return gb.op("Mul", [request.to_float(codes, "codes_f32"), scale], "rows")


@pytest.fixture
def sym():
    method = register(SymMethod())  # the one line that adds the method
    yield method
    registry.unregister(NAME)


RECIPE = """
name = "sym_mix"
[[tables]]
match = ["t_cat_2", "t_cat_3"]
method = "int8sym"
qat = true
[[tables]]
match = ["*"]
method = "ptq"
bits = 4
granularity = "row"
[finetune]
steps = 8
batch_size = 128
optimizer = "sgd"
lr_embedding = 0.5
eval_every = 0
"""


def test_a_method_defined_in_a_test_runs_the_whole_pipeline(sym, tmp_path):
    ckpt, train, valid, _ = tiny_world(tmp_path, n=1200)
    (tmp_path / "sym.toml").write_text(RECIPE)

    recipe = parse_recipe(RECIPE)
    assert recipe.rules[0].config == SymConfig(qat=True) and recipe.needs_finetune
    assert parse_recipe(recipe_to_toml(recipe)) == recipe

    job = pipeline.load(ckpt)
    plan = pipeline.plan(job, tmp_path / "sym.toml")
    t3 = plan.table("t_cat_3")
    assert (t3.method, t3.bits, t3.bytes_after) == (NAME, 8, 5000 * (8 + 4))
    assert plan.table("t_cat_0").method == "ptq"
    assert f"rule 0: t_cat_2, t_cat_3: {NAME} qat" in format_plan(plan)

    result = pipeline.compress(job, plan, data=train, valid=valid)
    assert result.train is not None and result.train.steps == 8
    ebc = result.model.sparse_arch.embedding_bag_collection
    assert isinstance(ebc, QuantizedEmbeddingBagCollection)
    stored = ebc.quantized["t_cat_3"]
    assert isinstance(stored, SymConverted) and stored.data.dtype == torch.int8
    assert result.metrics["before_finetune"] is not None  # prepared (fake-quantized), then tuned

    out = export(result, tmp_path / "out").path
    assert verify_artifacts(out) == []
    arts = load_artifacts(out)
    entry = next(t for t in arts.manifest["tables"] if t["name"] == "t_cat_3")
    assert entry["layout"] == NAME and entry["method"] == NAME and entry["bits"] == 8
    assert entry["files"] == {"data": "tables/t_cat_3.npy", "scale": "tables/t_cat_3.scale.npy"}
    assert entry["bytes"] == entry["bytes_planned"] == t3.bytes_after
    np.testing.assert_array_equal(arts.tables["t_cat_3"].arrays["data"], stored.data.numpy())
    parity = arts.manifest["onnx"]["parity"]
    assert max(parity["max_abs_diff"].values()) <= parity["atol"] == 1e-5

    # ONNX Runtime serves what the converted PyTorch model computes
    data = load_npz(valid)
    served = Predictor(out, threads=1).predict(data)
    expected = predict_logits(
        lambda b: result.model(b.dense, b.sparse), data, job.spec.feature_names
    )
    np.testing.assert_allclose(served.reshape(-1), expected.reshape(-1), atol=1e-5, rtol=0)

    # and the TorchRec loader gives the method's converted table back, equal to ORT's logits
    placement = table_placement(arts)
    assert placement["t_cat_3"].kind == OURS and NAME in placement["t_cat_3"].reason
    _assert_ort_parity(out)
    loaded = load_torchrec_model(out)
    assert any(isinstance(m, SymConverted) for m in loaded.modules())


def test_prepared_and_converted_tables_of_the_new_method_agree_exactly(sym):
    tables = [TableSpec("t", 40, 8, ("f",))]
    weight = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    qat = QATEmbeddingBagCollection(tables, {"t": weight}, {"t": SymConfig(qat=True)}).eval()
    converted = QuantizedEmbeddingBagCollection.from_qat(qat)
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f"], values=torch.tensor([3, 39, 0, 7, 7]), lengths=torch.tensor([2, 0, 3])
    )
    with torch.no_grad():
        assert torch.equal(qat(kjt).values(), converted(kjt).values())
    qat.train()(kjt).values().sum().backward()  # trainable, sparse straight-through gradient
    grad = qat.embedding_bags["t"].weight.grad
    assert grad.is_sparse and float(grad.to_dense()[7].sum()) == 2 * 8
    state = converted.state_dict()
    assert set(state) == {"embedding_bags.t.data", "embedding_bags.t.scale"}


# --------------------------------------------------------------------------------------------
# The registry's rules


def test_registering_a_name_twice_is_refused(sym):
    with pytest.raises(MethodError, match=f"'{NAME}' is already registered"):
        register(SymMethod())
    with pytest.raises(MethodError, match="already registered"):
        register(type("Again", (SymMethod,), {"name": "rowwise"})())


def test_a_recipe_spelling_or_a_second_array_sharing_method_is_refused():
    with pytest.raises(MethodError, match="'keep' is a recipe spelling"):
        register(type("Keep2", (SymMethod,), {"name": "keep"})())
    with pytest.raises(MethodError, match="shares arrays, and 'robe' already does"):
        register(type("Share2", (SymMethod,), {"name": "share2", "shares_arrays": True})())
    with pytest.raises(MethodError, match="must be an identifier"):
        register(type("Bad", (SymMethod,), {"name": "two words"})())
    assert registry.names() == ("fp32", "fp16", "rowwise", "tablewise", "robe")


def test_unknown_method_is_one_line_listing_the_registered_ones(sym, tmp_path, capsys):
    text = 'name = "r"\n[[tables]]\nmatch = ["*"]\nmethod = "int3"\n'
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, "r.toml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("r.toml: tables[0]: method must be one of")
    for spelling in ("keep", "fp16", "ptq", "qat", "share", NAME):
        assert f'"{spelling}"' in message
    assert message.endswith('got "int3"')

    ckpt, *_ = tiny_world(tmp_path, n=300)
    (tmp_path / "r.toml").write_text(text)
    code = main(["--no-progress", "plan", "--recipe", str(tmp_path / "r.toml"), str(ckpt)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and NAME in err


def test_a_new_methods_keys_are_its_own(sym):
    with pytest.raises(RecipeError, match=r"key 'bits' does not apply to method 'int8sym' \(it "):
        parse_recipe(f'name = "r"\n[[tables]]\nmatch = ["*"]\nmethod = "{NAME}"\nbits = 8\n')
    with pytest.raises(RecipeError, match="qat must be true or false, got 1"):
        parse_recipe(f'name = "r"\n[[tables]]\nmatch = ["*"]\nmethod = "{NAME}"\nqat = 1\n')
    with pytest.raises(RecipeError, match="key 'qat' does not apply to method 'ptq'"):
        parse_recipe(
            'name = "r"\n[[tables]]\nmatch = ["*"]\nmethod = "ptq"\nbits = 8\nqat = true\n'
        )


BUILTIN_NAMES = {"rowwise", "tablewise", "robe", "share"}
METHOD_MODULES = {
    "compress/methods/registry.py",
    "compress/methods/rowwise.py",
    "compress/methods/tablewise.py",
}


def _strings(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants that are not docstrings."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def test_only_method_modules_name_the_built_in_methods():
    found = {}
    for pkg in ("compress", "exporters"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in METHOD_MODULES or rel.startswith("compress/methods/robe/"):
                continue
            hits = [(n, s) for n, s in _strings(ast.parse(path.read_text())) if s in BUILTIN_NAMES]
            if hits:
                found[rel] = hits
    assert found == {}
