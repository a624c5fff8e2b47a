"""Plans: rule precedence, byte accounting (Criteo Kaggle from shapes alone), plan errors."""

from __future__ import annotations

import json

import pytest
from helpers import make_dlrm

from compress.errors import RecipeError
from compress.io.architecture import infer_spec
from compress.io.model_spec import DLRMSpec, TableSpec
from compress.plan import crossnet_bytes, format_plan, linear_layers, make_plan, split_bytes
from compress.recipe.parse import load_recipe, parse_recipe

KAGGLE_ROWS = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
    5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip
KAGGLE_TOTAL_ROWS = 33_762_577
KAGGLE_EMB_FP32 = KAGGLE_TOTAL_ROWS * 16 * 4  # 2,160,804,928 (the paper's "FP32 2.161 GB")
# bottom 13-512-256-64-16, top 367-512-256-1: weights and biases
KAGGLE_WEIGHTS = 13 * 512 + 512 * 256 + 256 * 64 + 64 * 16 + 367 * 512 + 512 * 256 + 256 * 1
KAGGLE_CHANNELS = 512 + 256 + 64 + 16 + 512 + 256 + 1
KAGGLE_DENSE_FP32 = (KAGGLE_WEIGHTS + KAGGLE_CHANNELS) * 4  # 1,903,940


def spec_of(rows, dim: int = 16, names=None) -> DLRMSpec:
    names = names or [f"t_cat_{i}" for i in range(len(rows))]
    tables = tuple(
        TableSpec(name=n, num_embeddings=r, embedding_dim=dim, feature_names=(n[2:],))
        for n, r in zip(names, rows, strict=True)
    )
    return DLRMSpec("DLRM", tables, 13, (512, 256, 64, dim), (512, 256, 1))


KAGGLE = spec_of(KAGGLE_ROWS)


def recipe(body: str, finetune: bool = False):
    tail = "\n[finetune]\nepochs = 1\n" if finetune else ""
    return parse_recipe('name = "t"\n' + body + tail, "t.toml")


# --------------------------------------------------------------------------------------------------
# Criteo Kaggle from shapes


def test_kaggle_shapes() -> None:
    assert sum(KAGGLE_ROWS) == KAGGLE_TOTAL_ROWS and len(KAGGLE_ROWS) == 26
    layers = linear_layers(KAGGLE)
    assert layers[4].in_features == 367  # over arch input: 16 + 26*27/2
    assert sum(layer.in_features * layer.out_features for layer in layers) == KAGGLE_WEIGHTS


def test_kaggle_int4_qat() -> None:
    # the DQRM paper's all-INT4 storage is int4_ptq's (below); int4_qat keeps INT4 table-wise for
    # the 10 tables of 10,000+ rows and stores the 16 small ones and the MLP in INT8
    plan = make_plan(load_recipe("int4_qat"), KAGGLE)
    big = [t for t in plan.tables if t.rows >= 10_000]
    small = [t for t in plan.tables if t.rows < 10_000]
    assert len(big) == 10 and len(small) == 16 and sum(t.rows for t in small) == 19_889
    assert all(t.bytes_after == t.rows * 8 + 4 for t in big)  # 8 bytes a row + a scale
    assert all(t.bytes_after == t.rows * 16 + 4 for t in small)  # INT8: 16 bytes a row
    assert plan.embedding_bytes_before == KAGGLE_EMB_FP32 == 2_160_804_928
    assert plan.embedding_bytes_after == 8 * KAGGLE_TOTAL_ROWS + 8 * 19_889 + 26 * 4 == 270_259_832
    assert plan.dense_bytes_before == KAGGLE_DENSE_FP32 == 1_903_940
    # INT8 weights, one fp32 scale per output channel, fp32 biases
    assert plan.dense_bytes_after == KAGGLE_WEIGHTS + 8 * KAGGLE_CHANNELS == 487_304
    assert plan.bytes_after == 270_747_136
    assert round(plan.ratio, 2) == 7.99
    assert plan.needs_finetune
    assert {
        (t.method, t.bits, t.granularity, t.scale_refresh, t.rule_index) for t in plan.tables
    } == {("qat", 4, "table", 200, 0), ("qat", 8, "table", 200, 1)}


def test_kaggle_int4_rowwise() -> None:
    plan = make_plan(load_recipe("int4_rowwise_ptq"), KAGGLE)
    assert all(t.bytes_after == t.rows * 12 for t in plan.tables)  # 8 nibble bytes + fp16 s/b
    assert plan.embedding_bytes_after == 12 * KAGGLE_TOTAL_ROWS == 405_150_924
    assert round(plan.embedding_bytes_after / 1e9, 3) == 0.405  # FBGEMM INT4: "about 405 MB"
    assert plan.bytes_after == 405_150_924 + 250_632
    assert round(plan.ratio, 3) == 5.335
    assert not plan.needs_finetune


def test_kaggle_int4_ptq_is_dqrm_storage() -> None:
    ptq = make_plan(load_recipe("int4_ptq"), KAGGLE)
    assert all(t.bytes_after == t.rows * 8 + 4 for t in ptq.tables)  # 8 bytes a row + a scale
    assert ptq.embedding_bytes_after == 8 * KAGGLE_TOTAL_ROWS + 26 * 4 == 270_100_720
    # INT4 weight rows packed to whole bytes (13 and 367 inputs pad a nibble a row), one fp32
    # scale per output channel, fp32 biases
    packed_rows = sum(x.out_features * ((x.in_features + 1) // 2) for x in linear_layers(KAGGLE))
    assert packed_rows == KAGGLE_WEIGHTS // 2 + 512 // 2 + 512 // 2
    assert ptq.dense_bytes_after == packed_rows + 8 * KAGGLE_CHANNELS == 250_632
    assert ptq.bytes_before == 2_162_708_868
    assert ptq.bytes_after == 270_351_352
    assert round(ptq.bytes_after / 1e9, 3) == 0.270  # the paper's DQRM INT4 0.270 GB
    assert round(ptq.ratio, 2) == 8.00
    assert not ptq.needs_finetune
    # int4_qat stores its large tables exactly as int4_ptq does
    qat = make_plan(load_recipe("int4_qat"), KAGGLE)
    same = {t.name: t.bytes_after for t in ptq.tables if t.rows >= 10_000}
    assert same == {t.name: t.bytes_after for t in qat.tables if t.rows >= 10_000}


def test_kaggle_int8() -> None:
    ptq = make_plan(load_recipe("int8_ptq"), KAGGLE)
    assert ptq.embedding_bytes_after == 20 * KAGGLE_TOTAL_ROWS == 675_251_540
    assert ptq.dense_bytes_after == KAGGLE_WEIGHTS + 8 * KAGGLE_CHANNELS == 487_304
    assert ptq.bytes_after == 675_738_844
    qat = make_plan(load_recipe("int8_qat"), KAGGLE)
    assert qat.embedding_bytes_after == 16 * KAGGLE_TOTAL_ROWS + 26 * 4 == 540_201_336
    assert round(qat.ratio, 3) == 4.000


def test_kaggle_mixed() -> None:
    plan = make_plan(load_recipe("mixed_int4_int8"), KAGGLE)
    by_rule = {i: [t.rows for t in plan.tables if t.rule_index == i] for i in (0, 1, 2)}
    assert len(by_rule[0]) == 10 and min(by_rule[0]) == 12517
    assert len(by_rule[1]) == 9 and (min(by_rule[1]), max(by_rule[1])) == (105, 5683)
    assert len(by_rule[2]) == 7 and max(by_rule[2]) == 27
    expected = 12 * sum(by_rule[0]) + 20 * sum(by_rule[1]) + 64 * sum(by_rule[2])
    assert plan.embedding_bytes_after == expected == 405_314_480
    assert plan.dense_bytes_after == 487_304  # INT8 per-channel PTQ MLP
    assert plan.bytes_after == 405_801_784
    assert plan.unused_rules == ()


# --------------------------------------------------------------------------------------------------
# Precedence


def test_first_matching_rule_wins_and_unmatched_tables_are_kept() -> None:
    spec = spec_of((100, 200, 300, 400))
    plan = make_plan(
        recipe(
            '[[tables]]\nmatch = ["t_cat_1"]\nmethod = "fp16"\n'
            '[[tables]]\nmatch = ["t_cat_1", "t_cat_2"]\nmethod = "ptq"\nbits = 8\n'
        ),
        spec,
    )
    got = [(t.name, t.rule_index, t.method, t.bits) for t in plan.tables]
    assert got == [
        ("t_cat_0", None, "keep", None),
        ("t_cat_1", 0, "fp16", None),
        ("t_cat_2", 1, "ptq", 8),
        ("t_cat_3", None, "keep", None),
    ]
    t0, t1, t2 = plan.tables[:3]
    assert t0.bytes_after == t0.bytes_before == 100 * 16 * 4
    assert t1.bytes_after == 200 * 16 * 2
    assert t2.bytes_after == 300 * (16 + 4)
    assert t0.rule_text == "(no rule: kept)"


def test_size_bounds_are_inclusive_and_checked_in_order() -> None:
    spec = spec_of((99, 100, 9999, 10000, 10001))
    plan = make_plan(load_recipe("mixed_int4_int8"), spec)
    assert [t.rule_index for t in plan.tables] == [2, 1, 1, 0, 0]
    assert [t.bits for t in plan.tables] == [None, 8, 8, 4, 4]
    # a size-bounded rule may decide no table: reported, not an error
    small = make_plan(load_recipe("mixed_int4_int8"), spec_of((5, 500)))
    assert small.unused_rules == (0,)
    assert "rules that decide no table: 0" in format_plan(small)


def test_regex_versus_glob() -> None:
    names = ["t_cat_1", "t_cat_10", "t_cat_11", "t_cat_2"]
    spec = spec_of((10, 10, 10, 10), names=names)
    by_re = make_plan(recipe('[[tables]]\nmatch = ["re:t_cat_1"]\nmethod = "fp16"\n'), spec)
    assert [t.method for t in by_re.tables] == ["fp16", "keep", "keep", "keep"]
    by_glob = make_plan(recipe('[[tables]]\nmatch = ["t_cat_1*"]\nmethod = "fp16"\n'), spec)
    assert [t.method for t in by_glob.tables] == ["fp16", "fp16", "fp16", "keep"]
    mixed = make_plan(
        recipe(
            '[[tables]]\nmatch = ["re:t_cat_1\\\\d"]\nmethod = "ptq"\nbits = 4\n'
            '[[tables]]\nmatch = ["t_cat_?"]\nmethod = "fp16"\n'
        ),
        spec,
    )
    assert [t.rule_index for t in mixed.tables] == [1, 0, 0, 1]


# --------------------------------------------------------------------------------------------------
# Errors


def test_pattern_matching_no_table_lists_the_tables() -> None:
    r = recipe('[[tables]]\nmatch = ["t_cat_0", "t_kat_*"]\nmethod = "fp16"\n')
    with pytest.raises(RecipeError) as info:
        make_plan(r, spec_of((10, 20)))
    assert str(info.value) == (
        "t.toml: tables[0]: pattern 't_kat_*' matches no table of the model "
        "(tables: t_cat_0, t_cat_1)"
    )


def test_bits_that_cannot_be_packed() -> None:
    spec = spec_of((10, 20), dim=2)
    with pytest.raises(
        RecipeError,
        match=r"^t.toml: tables\[0\]: row-wise INT2 cannot store table "
        r"'t_cat_0' of dim 2",
    ):
        make_plan(recipe('[[tables]]\nmatch = ["*"]\nmethod = "ptq"\nbits = 2\n'), spec)
    # one packed stream per table: any dim works table-wise
    plan = make_plan(
        recipe('[[tables]]\nmatch = ["*"]\nmethod = "ptq"\nbits = 2\ngranularity = "table"\n'), spec
    )
    assert plan.tables[0].bytes_after == (10 * 2 * 2 + 7) // 8 + 4
    with pytest.raises(RecipeError, match="row-wise INT4 cannot store table 't_cat_0' of dim 6"):
        make_plan(recipe('[[tables]]\nmatch = ["*"]\nmethod = "ptq"\nbits = 4\n'), spec_of((4,), 6))


# --------------------------------------------------------------------------------------------------
# Share (bytes only; the method itself is built elsewhere)


def test_share_groups_bytes() -> None:
    spec = spec_of((1000, 3000, 500, 700))
    plan = make_plan(
        recipe(
            '[[tables]]\nmatch = ["t_cat_0"]\nmethod = "share"\ncompression = 10\nblock_size = 4\n'
            'group = "g"\n'
            '[[tables]]\nmatch = ["t_cat_1"]\nmethod = "share"\ncompression = 10\nblock_size = 4\n'
            'group = "g"\n'
            '[[tables]]\nmatch = ["t_cat_2"]\nmethod = "share"\nbytes = 1000\nblock_size = 8\n'
            'array_dtype = "int8"\n',
            finetune=True,
        ),
        spec,
    )
    g, alone = plan.share_groups
    assert (g.name, g.tables, g.rows_total, g.cells, g.bytes) == (
        "g",
        ("t_cat_0", "t_cat_1"),
        4000,
        4000 * 16 // 10,
        6400 * 4,
    )
    assert [t.bytes_after for t in plan.tables[:2]] == [6400, 19200]  # split by rows
    assert (alone.name, alone.cells, alone.bytes) == ("share2", 1000, 1000 + 4)
    assert plan.tables[2].bytes_after == 1004 and plan.tables[2].share_group == "share2"
    assert plan.embedding_bytes_after == 25600 + 1004 + 700 * 64
    assert plan.needs_finetune
    with pytest.raises(RecipeError, match=r"tables\[0\]: share group 'share0' .*block size"):
        make_plan(
            recipe(
                '[[tables]]\nmatch = ["t_cat_0"]\nmethod = "share"\nbytes = 8\nblock_size = 4\n',
                finetune=True,
            ),
            spec,
        )


def test_split_bytes_is_exact() -> None:
    shares = split_bytes(1001, [("a", 1), ("b", 1), ("c", 1)])
    assert shares == {"a": 335, "b": 333, "c": 333} and sum(shares.values()) == 1001


# --------------------------------------------------------------------------------------------------
# Dense bytes against real TorchRec models


@pytest.mark.parametrize("model_class", ["DLRM", "DLRM_DCN", "DLRM_Projection"])
def test_dense_bytes_match_torchrec(model_class: str) -> None:
    model = make_dlrm(model_class)
    sd = model.state_dict()
    spec = infer_spec(sd, source="m")
    layers = linear_layers(spec)
    linear_keys = {k.rsplit(".", 1)[0] for k in sd if "embedding" not in k and "crossnet" not in k}
    assert {layer.name for layer in layers} == linear_keys
    for layer in layers:
        assert tuple(sd[f"{layer.name}.weight"].shape) == (layer.out_features, layer.in_features)
    plan = make_plan(load_recipe("int8_ptq"), spec)
    assert plan.dense_bytes_before == spec.dense_bytes
    assert plan.embedding_bytes_before == spec.embedding_bytes
    cross = crossnet_bytes(spec)
    assert (cross > 0) == (model_class == "DLRM_DCN")
    assert plan.dense_bytes_after == plan.mlp.bytes_after + cross  # crossnet stays FP32


# --------------------------------------------------------------------------------------------------
# Output


def test_to_json_and_format() -> None:
    plan = make_plan(load_recipe("int4_qat"), KAGGLE)
    doc = json.loads(json.dumps(plan.to_json()))
    for key in (
        "recipe",
        "tables",
        "embedding_bytes_before",
        "embedding_bytes_after",
        "dense_bytes_before",
        "dense_bytes_after",
        "bytes_before",
        "bytes_after",
        "ratio",
    ):
        assert key in doc
    assert doc["recipe"] == "int4_qat"
    assert doc["bytes_after"] == doc["embedding_bytes_after"] + doc["dense_bytes_after"]
    assert doc["ratio"] == doc["bytes_before"] / doc["bytes_after"]
    first = doc["tables"][0]
    assert {
        k: first[k]
        for k in (
            "name",
            "rule",
            "method",
            "bits",
            "granularity",
            "rows",
            "dim",
            "bytes_before",
            "bytes_after",
        )
    } == {
        "name": "t_cat_0",
        "rule": 1,
        "method": "qat",
        "bits": 8,
        "granularity": "table",
        "rows": 1460,
        "dim": 16,
        "bytes_before": 1460 * 64,
        "bytes_after": 1460 * 16 + 4,
    }
    text = format_plan(plan)
    assert "t_cat_25" in text and "rule 0: * rows>=10000: qat INT4 table P=200" in text
    assert "rule 1: *: qat INT8 table P=200" in text
    assert "270,747,136" in text and "ratio: 7.99x" in text
