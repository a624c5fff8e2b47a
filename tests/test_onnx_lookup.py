"""Embedding lookup graphs: every table kind and bit width is bit-exact against numpy (and the
row-wise kind against FBGEMM's own dequantization); jagged pooling handles empty bags."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from compress.methods.fp16 import Fp16Table
from compress.methods.keep import Fp32Table
from compress.methods.robe.graph import RobeTable
from compress.methods.rowwise import RowwiseTable, gbq_block_size, resolve_rowwise_impl
from compress.methods.tablewise import TablewiseTable
from exporters.onnx import stacked_rows
from exporters.onnx.lookup import build_gather_model, build_pool_model
from exporters.onnx.parity import compare_outputs, ort_session, run_session
from exporters.onnx.spec import GraphBuilder, TableLookup

ROWS = 40
DIMS = (8, 16, 12)


# ---------------------------------------------------------------- numpy references (test side)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [R, D] -> packed [R, D*bits/8], element k*j+i in bits i*bits.. (low first)."""
    per = 8 // bits
    codes = codes.astype(np.uint8)
    out = np.zeros((codes.shape[0], codes.shape[1] // per), np.uint8)
    for k in range(per):
        out |= (codes[:, k::per] << (k * bits)).astype(np.uint8)
    return out


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    per = 8 // bits
    parts = [(packed >> (k * bits)) & ((1 << bits) - 1) for k in range(per)]
    return np.stack(parts, axis=-1).reshape(packed.shape[0], packed.shape[1] * per)


def rowwise_reference(kind: RowwiseTable, ids: np.ndarray) -> np.ndarray:
    codes = unpack_codes(kind.packed[ids], kind.bits).astype(np.float32)
    scale = kind.scale[ids].astype(np.float32)[:, None]
    bias = kind.bias[ids].astype(np.float32)[:, None]
    return codes * scale + bias


def tablewise_reference(kind: TablewiseTable, ids: np.ndarray) -> np.ndarray:
    codes = unpack_codes(kind.packed[ids], kind.bits).astype(np.int32) - kind.offset
    return codes.astype(np.float32) * np.float32(kind.scale)


def robe_reference(kind: RobeTable, ids: np.ndarray, dim: int) -> np.ndarray:
    """With Python integers (no int64 overflow possible) to check the graph's int64 hash."""
    r1, r2, r3 = kind.seeds
    span = kind.array.shape[0] - kind.block_size + 1
    out = np.empty((len(ids), dim), np.float32)
    for n, i in enumerate(ids.tolist()):
        for d in range(dim):
            key = ((i + kind.table_offset) * r3 + (d // kind.block_size) * r2 + r1) % kind.prime
            out[n, d] = kind.array[key % span + d % kind.block_size]
    return out


def reference_rows(table: TableLookup, ids: np.ndarray) -> np.ndarray:
    kind = table.kind
    if isinstance(kind, (Fp32Table, Fp16Table)):
        return kind.weight[ids].astype(np.float32)
    if isinstance(kind, RowwiseTable):
        return rowwise_reference(kind, ids)
    if isinstance(kind, TablewiseTable):
        return tablewise_reference(kind, ids)
    return robe_reference(kind, ids, table.dim)


def fbgemm_rowwise(weight: torch.Tensor, bits: int) -> tuple[RowwiseTable, torch.Tensor]:
    """Quantize with FBGEMM; reorder its ``[packed][fp16 scale][fp16 bias]`` rows into our arrays.
    Returns the table and FBGEMM's own dequantization of every row."""
    import fbgemm_gpu  # noqa: F401 - registers torch.ops.fbgemm

    fused = torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(weight, bits)
    deq = torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(fused, bits)
    raw = fused.numpy()
    nbytes = weight.shape[1] * bits // 8
    packed = np.ascontiguousarray(raw[:, :nbytes])
    scale = np.ascontiguousarray(raw[:, nbytes : nbytes + 2]).view(np.float16).reshape(-1)
    bias = np.ascontiguousarray(raw[:, nbytes + 2 : nbytes + 4]).view(np.float16).reshape(-1)
    return RowwiseTable(packed, scale, bias, bits), deq


def make_table(kind_name: str, bits: int | None, dim: int, rows: int = ROWS, seed: int = 0):
    """A random table of one kind; ``bits`` is the width (or ROBE block size Z)."""
    rng = np.random.default_rng(seed)
    if kind_name == "fp32":
        kind = Fp32Table(rng.standard_normal((rows, dim), dtype=np.float32))
    elif kind_name == "fp16":
        kind = Fp16Table(rng.standard_normal((rows, dim)).astype(np.float16))
    elif kind_name == "rowwise":
        codes = rng.integers(0, 1 << bits, (rows, dim))
        scale = (rng.random(rows) * 0.2 + 1e-3).astype(np.float16)
        bias = rng.standard_normal(rows).astype(np.float16)
        kind = RowwiseTable(pack_codes(codes, bits), scale, bias, bits)
    elif kind_name == "tablewise":
        codes = rng.integers(0, 1 << bits, (rows, dim))  # u = q + 2^(bits-1), full range
        kind = TablewiseTable(pack_codes(codes, bits), float(rng.random() * 0.1 + 1e-3), bits)
    elif kind_name == "robe":
        array = rng.standard_normal(101, dtype=np.float32)
        # a large offset exercises the int64 products of the hash
        kind = RobeTable(array, num_rows=rows, block_size=bits, table_offset=3_000_000_007)
    else:
        raise ValueError(kind_name)
    return TableLookup(name=f"t_{kind_name}", features=("f",), dim=dim, kind=kind)


CASES = [
    ("fp32", None),
    ("fp16", None),
    *[("rowwise", b) for b in (8, 4, 2)],
    *[("tablewise", b) for b in (8, 4, 2)],
    ("robe", 1),
    ("robe", 4),
]


def _ids(rows: int = ROWS, n: int = 64, seed: int = 1) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(0, rows, n).astype(np.int64)
    ids[:3] = [0, rows - 1, 0]  # first and last rows, and a repeat
    return ids


def _gather(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    onnx.checker.check_model(model, full_check=True)
    return run_session(ort_session(model, threads=1), {"ids": ids})["rows"]


# ---------------------------------------------------------------- gather exactness


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize(("kind_name", "bits"), CASES)
def test_gather_is_bit_exact(kind_name: str, bits: int | None, dim: int) -> None:
    table = make_table(kind_name, bits, dim)
    ids = _ids()
    impls = ("gbq", "standard") if kind_name == "rowwise" else ("auto",)
    for impl in impls:
        got = _gather(build_gather_model(table, impl), ids)
        assert got.dtype == np.float32 and got.shape == (len(ids), dim)
        assert compare_outputs(reference_rows(table, ids), got, 0.0, "rows")["max_abs_diff"] == 0


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("bits", (8, 4, 2))
def test_rowwise_matches_fbgemm(bits: int, dim: int) -> None:
    if (dim * bits // 8) % 2:
        pytest.skip("FBGEMM needs an even number of packed bytes per row")
    weight = torch.randn(ROWS, dim, generator=torch.Generator().manual_seed(bits + dim))
    weight[3] = 0.5  # a constant row: FBGEMM's scale 1.0 case
    kind, deq = fbgemm_rowwise(weight, bits)
    table = TableLookup("t", ("f",), dim, kind)
    ids = _ids()
    for impl in ("gbq", "standard"):
        got = _gather(build_gather_model(table, impl), ids)
        compare_outputs(deq.numpy()[ids], got, 0.0, f"rowwise{bits}/{impl}")


def test_rowwise_auto_uses_gather_block_quantized_for_4_and_8_bits() -> None:
    ops = {
        bits: {n.op_type for n in build_gather_model(make_table("rowwise", bits, 16)).graph.node}
        for bits in (8, 4, 2)
    }
    assert "GatherBlockQuantized" in ops[8] and "GatherBlockQuantized" in ops[4]
    assert "GatherBlockQuantized" not in ops[2] and "BitShift" in ops[2]
    assert resolve_rowwise_impl(2) == "standard" and resolve_rowwise_impl(2, "gbq") == "gbq"
    assert [gbq_block_size(d) for d in (8, 12, 16, 24, 64)] == [16, 16, 16, 32, 64]


@pytest.mark.parametrize(("kind_name", "bits"), CASES)
def test_tables_are_only_gathered_never_dequantized_whole(kind_name: str, bits: int | None) -> None:
    table = make_table(kind_name, bits, 16, rows=256)
    for impl in ("gbq", "standard"):
        model = build_gather_model(table, impl)
        big = {t.name for t in model.graph.initializer if t.dims and t.dims[0] >= 101}
        assert big, "table initializers expected"
        for node in model.graph.node:
            for pos, name in enumerate(node.input):
                if name in big:
                    gathered = (node.op_type == "Gather" and pos == 0) or (
                        node.op_type == "GatherBlockQuantized" and pos != 1
                    )
                    assert gathered, f"{name} consumed by {node.op_type}"


def test_graph_declares_versions_and_dynamic_dims() -> None:
    model = build_gather_model(make_table("rowwise", 4, 16))
    assert model.ir_version == 10
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets == {"": 21, "com.microsoft": 1}
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "n"
    plain = build_gather_model(make_table("fp32", None, 8))
    assert {o.domain for o in plain.opset_import} == {""}


# ---------------------------------------------------------------- jagged pooling


def _pool_reference(rows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    out = np.zeros((len(lengths), rows.shape[1]), np.float64)
    np.add.at(out, np.repeat(np.arange(len(lengths)), lengths), rows.astype(np.float64))
    return out


LENGTHS = {
    "mixed": [2, 0, 3, 1, 0, 4, 1, 0, 0],  # empty bags in the middle and two trailing
    "leading_empty": [0, 0, 1, 5, 2],
    "one_hot": [1] * 7,
    "all_empty": [0, 0, 0],
}


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize(
    ("kind_name", "bits"),
    [("fp32", None), ("rowwise", 4), ("rowwise", 2), ("tablewise", 4), ("robe", 4), ("fp16", None)],
)
def test_sum_pooling_multi_hot(kind_name: str, bits: int | None, dim: int) -> None:
    table = make_table(kind_name, bits, dim)
    session = ort_session(build_pool_model(table), threads=1)
    rng = np.random.default_rng(dim)
    for case, lengths in LENGTHS.items():
        lengths = np.asarray(lengths, np.int64)
        values = rng.integers(0, ROWS, int(lengths.sum())).astype(np.int64)
        got = run_session(session, {"values": values, "lengths": lengths})["pooled"]
        assert got.shape == (len(lengths), dim)
        ref = _pool_reference(reference_rows(table, values), lengths)
        compare_outputs(ref, got, 1e-6, f"pooled/{case}")
        assert not got[lengths == 0].any()


def test_pooling_is_deterministic_with_threads() -> None:
    """ORT 1.31's ScatterND add races across threads; the running-sum pooling does not."""
    table = make_table("fp32", None, 64, rows=500)
    rng = np.random.default_rng(0)
    lengths = np.full(64, 300, np.int64)
    lengths[::3] = 1
    values = rng.integers(0, 500, int(lengths.sum())).astype(np.int64)
    feeds = {"values": values, "lengths": lengths}
    rows = reference_rows(table, values)
    session = ort_session(build_pool_model(table), threads=4)
    outs = [run_session(session, feeds)["pooled"] for _ in range(5)]
    assert len({o.tobytes() for o in outs}) == 1
    # float64 running sums: within float32 rounding of the exact sum
    compare_outputs(_pool_reference(rows, lengths), outs[0], 1e-5, "pooled/cumsum")


def test_pooling_dynamic_batch() -> None:
    table = make_table("rowwise", 8, 16)
    model = build_pool_model(table)
    onnx.checker.check_model(model, full_check=True)
    session = ort_session(model, threads=1)
    for batch in (1, 5, 33):
        lengths = np.random.default_rng(batch).integers(0, 4, batch).astype(np.int64)
        values = np.random.default_rng(0).integers(0, ROWS, int(lengths.sum())).astype(np.int64)
        got = run_session(session, {"values": values, "lengths": lengths})["pooled"]
        compare_outputs(_pool_reference(reference_rows(table, values), lengths), got, 1e-6)


def test_shared_robe_array_is_stored_once() -> None:
    from exporters.onnx.lookup import add_gather

    array = np.random.default_rng(0).standard_normal(64, dtype=np.float32)
    t1 = TableLookup("a", ("fa",), 8, RobeTable(array, 10, 2, 0))
    t2 = TableLookup("b", ("fb",), 8, RobeTable(array, 20, 2, 10))
    gb = GraphBuilder("shared")
    ids = gb.add_input("ids", TensorProto.INT64, ["n"])
    gb.add_output(add_gather(gb, t1, ids), "ra", TensorProto.FLOAT, ["n", 8])
    gb.add_output(add_gather(gb, t2, ids), "rb", TensorProto.FLOAT, ["n", 8])
    model = gb.make_model()
    assert sum(1 for t in model.graph.initializer if list(t.dims) == [64]) == 1
    ids_v = np.arange(10, dtype=np.int64)
    out = run_session(ort_session(model, threads=1), {"ids": ids_v})
    compare_outputs(reference_rows(t1, ids_v), out["ra"], 0.0, "ra")
    compare_outputs(reference_rows(t2, ids_v), out["rb"], 0.0, "rb")


# ---------------------------------------------------------------- all features at once


def _sparse_arch_features() -> list[TableLookup]:
    """Tables of the features f0..f5, in feature order: two INT4 tables stacked into one
    initializer (``t4a`` serves f0 and f3), an INT2 table (its own stacked group) and an fp32
    table (gathered per feature), interleaved so the groups' outputs must be reordered."""

    def named(name: str, kind_name: str, bits: int | None, rows: int, seed: int) -> TableLookup:
        table = make_table(kind_name, bits, 16, rows=rows, seed=seed)
        return TableLookup(name, ("f",), 16, table.kind)

    t4a = named("t4a", "rowwise", 4, 50, 1)
    t4b = named("t4b", "rowwise", 4, 30, 2)
    t2 = named("t2", "rowwise", 2, 20, 3)
    t32 = named("t32", "fp32", None, 40, 4)
    return [t4a, t2, t4b, t4a, t32, t4b]


#: One-hot layout hints for f0..f5 (``add_sparse_arch(one_hot=...)``): a hinted and an unhinted
#: INT4 group, as the exporter builds them from data in which f0, f2 and f3 are one-hot.
HINT = (True, False, True, True, False, False)


def _build_sparse_arch(
    tables: list[TableLookup], one_hot: tuple[bool, ...] | None = None
) -> onnx.ModelProto:
    from exporters.onnx.lookup import add_sparse_arch

    gb = GraphBuilder("sparse_arch")
    features = []
    for i, table in enumerate(tables):
        values = gb.add_input(f"f{i}__values", TensorProto.INT64, [f"n{i}"])
        lengths = gb.add_input(f"f{i}__lengths", TensorProto.INT64, ["batch"])
        features.append((table, values, lengths))
    pooled = add_sparse_arch(gb, features, 16, one_hot=one_hot)
    gb.add_output(pooled, "pooled", TensorProto.FLOAT, ["batch", len(tables), 16])
    model = gb.make_model()
    onnx.checker.check_model(model, full_check=True)
    return model


def _sparse_feeds(tables: list[TableLookup], lengths: np.ndarray, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for i, (table, ln) in enumerate(zip(tables, lengths, strict=True)):
        feeds[f"f{i}__lengths"] = ln.astype(np.int64)
        feeds[f"f{i}__values"] = rng.integers(0, table.num_rows, int(ln.sum())).astype(np.int64)
    feeds["f0__values"][:1] = tables[0].num_rows - 1  # last row of the first table, if any id
    return feeds


def _sparse_reference(tables: list[TableLookup], feeds: dict) -> np.ndarray:
    pooled = [
        _pool_reference(reference_rows(t, feeds[f"f{i}__values"]), feeds[f"f{i}__lengths"])
        for i, t in enumerate(tables)
    ]
    return np.stack(pooled, axis=1)  # [B, F, D]


SPARSE_BATCHES = {
    "multi_hot_with_empty_bags": lambda rng, f, b: np.where(
        rng.random((f, b)) < 0.2, 0, rng.integers(1, 6, (f, b))
    ),
    "one_hot": lambda rng, f, b: np.ones((f, b), np.int64),
    "one_hot_but_one_empty_bag": lambda rng, f, b: np.pad(
        np.ones((f, b - 1), np.int64), ((0, 0), (0, 1))
    ),
    "all_empty": lambda rng, f, b: np.zeros((f, b), np.int64),
    "long_bags": lambda rng, f, b: rng.integers(0, 40, (f, b)),
    "hinted_features_one_hot": lambda rng, f, b: np.where(
        np.asarray(HINT)[:, None], 1, rng.integers(0, 6, (f, b))
    ),
}


@pytest.fixture(params=["per_row", "at_load"])
def row_layout(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both lookups of row-wise tables: dequantized per gathered row (every table here is small
    enough for the other: forced by a zero size limit), and dequantized whole at session load."""
    if request.param == "per_row":
        monkeypatch.setattr(stacked_rows, "DEQUANTIZED_TABLE_BYTES", 0)
    return request.param


@pytest.mark.parametrize("hinted", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 37])
@pytest.mark.parametrize("case", list(SPARSE_BATCHES))
def test_sparse_arch_matches_reference(
    case: str, batch: int, threads: int, hinted: bool, row_layout: str
) -> None:
    """Stacked row-wise groups (a table shared by two features), a per-feature fp32 group, empty
    bags, one-hot batches (the ``If`` that skips pooling), bags longer than a pooling chunk,
    batches of one, and one-hot layout hints both kept and broken by the batch, against a
    float64 numpy reference: within float32 rounding (1e-6, relative to the largest sum)."""
    tables = _sparse_arch_features()
    model = _build_sparse_arch(tables, HINT if hinted else None)
    session = ort_session(model, threads=threads)
    rng = np.random.default_rng(batch)
    lengths = SPARSE_BATCHES[case](rng, len(tables), batch)
    if case == "one_hot_but_one_empty_bag" and batch == 1:
        lengths = np.zeros_like(lengths)
    feeds = _sparse_feeds(tables, lengths, seed=batch)
    got = run_session(session, feeds)["pooled"]
    assert got.shape == (batch, len(tables), 16)
    ref = _sparse_reference(tables, feeds)
    atol = 1e-6 * max(1.0, float(np.abs(ref).max(initial=0.0)))  # float32 sums of up to 40 rows
    compare_outputs(ref, got, atol, f"pooled/{case}")
    assert not got.transpose(1, 0, 2)[lengths == 0].any()


def test_sparse_arch_reads_rowwise_tables_as_stored(monkeypatch: pytest.MonkeyPatch) -> None:
    """Row-wise tables are initializers holding their stored arrays as they are (packed codes,
    fp16 scale and bias; a table shared by two features once), each read by Gathers only (the
    per-row lookup of tables over the at-load size limit, forced here), so a saved graph can
    point at the table files instead of carrying a derived copy."""
    monkeypatch.setattr(stacked_rows, "DEQUANTIZED_TABLE_BYTES", 0)
    tables = _sparse_arch_features()
    model = _build_sparse_arch(tables)
    init = {t.name: t for t in model.graph.initializer}
    for table in (tables[0], tables[1], tables[2]):  # t4a, t2, t4b
        kind = table.kind
        for role, stored in (("packed", kind.packed), ("scale", kind.scale), ("bias", kind.bias)):
            np.testing.assert_array_equal(
                onnx.numpy_helper.to_array(init[f"emb.{table.name}.{role}"]), stored
            )
    tables_in_graph = {n for n in init if n.startswith("emb.")}
    assert len(tables_in_graph) == 3 * 3 + 1  # three row-wise tables, one fp32
    consumers = [
        (n.op_type, pos)
        for n in model.graph.node
        for pos, x in enumerate(n.input)
        if x in tables_in_graph
    ]
    # a Gather per array and feature: t4a (two features), t2, t4b (two features), t32
    assert consumers == [("Gather", 0)] * (3 * 5 + 1)
