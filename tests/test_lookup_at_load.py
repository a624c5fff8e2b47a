"""Small row-wise tables are dequantized once at session load (ONNX Runtime's constant folding)
and looked up as float32 rows: bit for bit the per-row lookup, the stored arrays untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from exporters.onnx import stacked_rows
from exporters.onnx.parity import ort_session, run_session
from exporters.onnx.spec import TableLookup
from tests.test_onnx_lookup import _build_sparse_arch, make_table

DIM = 16


def _tables() -> list[TableLookup]:
    """f0..f4: INT4 ``a`` (two features), INT2 ``b``, INT8 ``c``, INT4 ``d``."""

    def named(name: str, bits: int, rows: int, seed: int) -> TableLookup:
        return TableLookup(name, ("f",), DIM, make_table("rowwise", bits, DIM, rows, seed).kind)

    a, b, c, d = (
        named("a", 4, 60, 1),
        named("b", 2, 25, 2),
        named("c", 8, 33, 3),
        named("d", 4, 9, 4),
    )
    return [a, b, a, c, d]


def _graph(tables: list[TableLookup], one_hot: tuple[bool, ...]) -> onnx.ModelProto:
    """The grouped lookup of ``tables`` (feature ``f<i>`` reads ``tables[i]``), checked."""
    return _build_sparse_arch(tables, one_hot)


def _feeds(tables: list[TableLookup], lengths: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Ids over each table's range and one past both ends (they read row 0 of their table)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for i, (table, ln) in enumerate(zip(tables, lengths, strict=True)):
        feeds[f"f{i}__lengths"] = ln.astype(np.int64)
        feeds[f"f{i}__values"] = rng.integers(-2, table.num_rows + 2, int(ln.sum()))
    return feeds


BATCHES = {
    "multi_hot_with_empty_bags": lambda rng, f, b: rng.integers(0, 5, (f, b)),
    "one_hot": lambda rng, f, b: np.ones((f, b), np.int64),
    "long_bags": lambda rng, f, b: rng.integers(30, 40, (f, b)),
}


def test_limit_is_the_float32_copy_size() -> None:
    """1 MiB of float32: 16,384 rows of dim 16 are dequantized at load, one more row is not."""
    for rows, fits in ((16384, True), (16385, False)):
        table = TableLookup("t", ("f",), DIM, make_table("rowwise", 4, DIM, rows, 0).kind)
        assert stacked_rows.dequantize_at_load(table, DIM) is fits


@pytest.mark.parametrize("hint", [(False,) * 5, (True, False, True, True, False)])
@pytest.mark.parametrize("case", list(BATCHES))
def test_at_load_equals_per_row_bit_for_bit(
    case: str, hint: tuple[bool, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    tables = _tables()
    at_load = ort_session(_graph(tables, hint), threads=2)
    monkeypatch.setattr(stacked_rows, "DEQUANTIZED_TABLE_BYTES", 0)
    per_row = ort_session(_graph(tables, hint), threads=2)
    for batch in (1, 23):
        rng = np.random.default_rng(batch)
        feeds = _feeds(tables, BATCHES[case](rng, len(tables), batch), seed=batch)
        want = run_session(per_row, feeds)["pooled"]
        got = run_session(at_load, feeds)["pooled"]
        assert got.shape == (batch, len(tables), DIM)
        np.testing.assert_array_equal(got, want)


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes of ``graph`` and of every subgraph (``If`` branches), depth first."""
    out = []
    for node in graph.node:
        out.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                out += _all_nodes(attr.g)
    return out


@pytest.mark.parametrize(
    "hint", [(False,) * 5, (True,) * 5, (True, False, False, True, False)]
)  # the last: table a read by a one-hot (f0) and a multi-hot (f2) feature
def test_session_folds_the_tables_and_gathers_float_rows(
    tmp_path: Path, hint: tuple[bool, ...]
) -> None:
    """The graph keeps the stored arrays (no Gather reads them: only the whole-table
    dequantization); the session ONNX Runtime builds has folded that into one float32
    ``[sum R + 1, D]`` array a bit width (its tables one after another, a zero row last), read by
    Gathers, with no unpacking or dequantizing node left; a table read by one-hot and multi-hot
    features is in that array once."""
    tables = _tables()
    model = _graph(tables, hint)
    stored = {n.name for n in model.graph.initializer if n.name.startswith("emb.")}
    assert stored == {f"emb.{t}.{r}" for t in "abcd" for r in ("packed", "scale", "bias")}
    readers = {n.op_type for n in _all_nodes(model.graph) for x in n.input if x in stored}
    assert "Gather" not in readers

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # folds
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "optimized.onnx")
    nodes = _all_nodes(optimized.graph)
    assert not {n.op_type for n in nodes} & {"BitShift", "BitwiseAnd", "Mul"}
    assert not {i.name for i in optimized.graph.initializer} & stored  # folded, then dropped
    floats = {
        i.name: list(i.dims)
        for i in optimized.graph.initializer
        if i.data_type == TensorProto.FLOAT and len(i.dims) == 2 and i.dims[1] == DIM
    }
    gathered = {
        tuple(floats[n.input[0]]) for n in nodes if n.op_type == "Gather" and n.input[0] in floats
    }
    # a + d (INT4; a read by two features, stored once), b (INT2), c (INT8)
    assert gathered == {(60 + 9 + 1, DIM), (25 + 1, DIM), (33 + 1, DIM)}
    per_table = {(t.num_rows, DIM) for t in tables}
    assert not per_table & set(map(tuple, floats.values()))  # no per-table copy left
