"""Recipes: built-ins load and round-trip; every validation error names file, section and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from compress.errors import RecipeError
from compress.methods.keep import KeepConfig
from compress.methods.robe.method import ShareConfig
from compress.methods.rowwise import RowwiseConfig
from compress.methods.tablewise import TablewiseConfig
from compress.recipe.builtin import builtin_names, builtin_recipes
from compress.recipe.parse import load_recipe, parse_recipe
from compress.recipe.schema import MLPSettings, Recipe, TableRule, pattern_matches
from compress.recipe.toml_out import recipe_to_toml
from compress.train.loop import TrainConfig

BUILTINS = (
    "int2_qat",
    "int2_rowwise_ptq",
    "int4_ptq",
    "int4_qat",
    "int4_rowwise_ptq",
    "int8_ptq",
    "int8_qat",
    "mixed_int2_ptq",
    "mixed_int4_int8",
    "mixed_int4_ptq",
    "mixed_robe_int4",
    "robe_1000x",
    "robe_100x",
)

FINETUNE = """
[finetune]
epochs = 1
batch_size = 2048
"""


def write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str) -> Recipe:
    return load_recipe(write(tmp_path, text))


# --------------------------------------------------------------------------------------------------
# Built-ins


def test_builtin_names_and_descriptions() -> None:
    assert tuple(builtin_names()) == BUILTINS
    listed = builtin_recipes()
    assert [n for n, _ in listed] == list(BUILTINS)
    assert all(len(d) > 20 for _, d in listed)


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_loads_and_round_trips(name: str, tmp_path: Path) -> None:
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.source.endswith(f"{name}.toml")
    text = recipe_to_toml(recipe)
    assert parse_recipe(text) == recipe
    again = load_recipe(write(tmp_path, text, f"{name}.toml"))
    assert again == recipe
    assert recipe_to_toml(again) == text


def test_builtin_contents() -> None:
    qat = load_recipe("int4_qat")
    assert qat.rules == (
        TableRule(
            match=("*",),
            config=TablewiseConfig(bits=4, qat=True, scale_refresh=200),
            min_rows=10_000,
        ),
        TableRule(match=("*",), config=TablewiseConfig(bits=8, qat=True, scale_refresh=200)),
    )
    assert qat.mlp == MLPSettings(method="qat", bits=8, per_channel=True)
    assert qat.finetune == TrainConfig(
        epochs=1.0,
        batch_size=2048,
        optimizer="sgd",
        lr_embedding=0.3,
        lr_dense=0.0005,
        eval_every=200,
        keep_best=True,
        seed=0,
    )
    assert qat.needs_finetune
    assert load_recipe("int8_qat").finetune == qat.finetune
    for name, config in (
        ("int8_ptq", RowwiseConfig(bits=8)),
        ("int4_ptq", TablewiseConfig(bits=4)),
        ("int4_rowwise_ptq", RowwiseConfig(bits=4)),
    ):
        ptq = load_recipe(name)
        assert ptq.rules == (TableRule(match=("*",), config=config),)
        assert ptq.rules[0].method == "ptq"
        assert ptq.finetune is None and not ptq.needs_finetune
    mixed = load_recipe("mixed_int4_int8")
    assert [(r.min_rows, r.max_rows, r.method, r.config) for r in mixed.rules] == [
        (10000, None, "qat", RowwiseConfig(bits=4, qat=True)),
        (100, 9999, "qat", RowwiseConfig(bits=8, qat=True)),
        (None, 99, "keep", KeepConfig()),
    ]
    assert mixed.mlp == MLPSettings(method="ptq", bits=8)
    assert mixed.finetune == qat.finetune


def test_defaults_and_round_trip_of_every_feature(tmp_path: Path) -> None:
    text = """
name = "all"
description = "quote \\" backslash \\\\ tab \\t ünïcode"
[[tables]]
match = ["re:t_cat_(1|2)", "big_*"]
min_rows = 10
max_rows = 5000
method = "qat"
bits = 2
[[tables]]
match = ["t_cat_3"]
method = "share"
compression = 100
block_size = 32
group = "g"
[[tables]]
match = ["t_cat_4"]
method = "share"
compression = 100.0
block_size = 32
group = "g"
[[tables]]
match = ["t_cat_5"]
method = "share"
bytes = 4096
block_size = 8
array_dtype = "int8"
[[tables]]
match = ["t_cat_6"]
method = "fp16"
[[tables]]
match = ["t_cat_7"]
method = "qat"
bits = 8
granularity = "table"
[finetune]
steps = 300
optimizer = "sgd"
"""
    r = load_text(tmp_path, text)
    assert r.rules[0].config == RowwiseConfig(bits=2, qat=True)  # granularity "row" by default
    assert r.rules[1].config == ShareConfig(block_size=32, compression=100.0, group="g")
    assert r.rules[1].config.array_dtype == "fp32" and r.rules[1].config.projection == "frequency"
    assert r.rules[3].config.bytes == 4096 and r.rules[3].config.compression is None
    assert r.rules[5].config == TablewiseConfig(bits=8, qat=True, scale_refresh=200)
    assert r.mlp == MLPSettings()
    assert r.finetune == TrainConfig(steps=300, optimizer="sgd")
    assert r.description == 'quote " backslash \\ tab \t ünïcode'
    assert parse_recipe(recipe_to_toml(r)) == r


def test_mlp_only_qat_is_fine(tmp_path: Path) -> None:
    r = load_text(
        tmp_path,
        'name = "m"\n[[tables]]\nmatch=["*"]\nmethod="ptq"\nbits=8\n'
        '[mlp]\nmethod="qat"\nbits=8\n' + FINETUNE,
    )
    assert r.needs_finetune and r.mlp.method == "qat"


def test_pattern_matching() -> None:
    assert pattern_matches("t_cat_1*", "t_cat_10")
    assert pattern_matches("t_cat_1*", "t_cat_1")
    assert not pattern_matches("re:t_cat_1", "t_cat_10")  # fullmatch, not search
    assert pattern_matches("re:t_cat_1\\d", "t_cat_10")
    assert not pattern_matches("T_CAT_*", "t_cat_1")  # case-sensitive
    assert pattern_matches("t_cat_?", "t_cat_7") and not pattern_matches("t_cat_?", "t_cat_17")
    rule = TableRule(match=("re:a.*",), config=KeepConfig(), min_rows=10, max_rows=20)
    assert rule.matches("ab", 10) and rule.matches("ab", 20)
    assert not rule.matches("ab", 9) and not rule.matches("ab", 21) and not rule.matches("ba", 15)


# --------------------------------------------------------------------------------------------------
# Loading errors


def test_unknown_builtin_and_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"unknown recipe 'int3_qat': not a built-in \(int2_qat"):
        load_recipe("int3_qat")
    with pytest.raises(RecipeError, match="nope.toml: no such recipe file"):
        load_recipe(tmp_path / "nope.toml")
    with pytest.raises(RecipeError, match="must be a .toml file"):
        load_recipe(write(tmp_path, 'name = "x"\n', "r.txt"))


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'name = "x"\n[[tables]]\nmatch = ["*"\nmethod = "keep"\n')
    with pytest.raises(RecipeError, match=rf"^{path}:4:1: invalid TOML: "):
        load_recipe(path)
    path = write(tmp_path, 'name = "x"\ndescription = "open', "eof.toml")
    with pytest.raises(RecipeError, match=rf"^{path}:2: invalid TOML: Unterminated string"):
        load_recipe(path)


R = 'name = "r"\n'
QAT = '[[tables]]\nmatch = ["*"]\nmethod = "qat"\nbits = 4\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # unknown keys, everywhere
        (R + "bitz = 4\n", "unknown top-level key 'bitz'"),
        (
            R
            + '[[tables]]\nmatch=["a"]\nmethod="keep"\n' * 2
            + '[[tables]]\nmatch=["*"]\nmethod="ptq"\nbitz=4\n',
            "tables[2]: unknown key 'bitz'; did you mean 'bits'?",
        ),
        (
            R + '[mlp]\nmethod = "ptq"\nbits = 8\nper_chanel = true\n',
            "mlp: unknown key 'per_chanel'; did you mean 'per_channel'?",
        ),
        (R + QAT + "[finetune]\nlr = 0.1\n", "finetune: unknown key 'lr'"),
        # the document's shape
        ('description = "no name"\n', "missing required key 'name'"),
        ('name = ""\n', "name must not be empty"),
        ("name = 3\n", "name must be a string, got 3"),
        (R + 'tables = "all"\n', "'tables' must be an array of tables"),
        (R + 'mlp = "ptq"\n', "'mlp' must be a table ([mlp])"),
        # table rules
        (R + '[[tables]]\nmethod = "keep"\n', "tables[0]: missing required key 'match'"),
        (
            R + '[[tables]]\nmatch = "*"\nmethod = "keep"\n',
            "tables[0]: match must be a non-empty list",
        ),
        (
            R + '[[tables]]\nmatch = []\nmethod = "keep"\n',
            "tables[0]: match must be a non-empty list",
        ),
        (R + '[[tables]]\nmatch = ["a", 3]\nmethod = "keep"\n', "tables[0]: match[1] must be"),
        (
            R + '[[tables]]\nmatch = ["re:t_(cat"]\nmethod = "keep"\n',
            "tables[0]: match[0] 're:t_(cat': invalid regular expression",
        ),
        (R + '[[tables]]\nmatch = ["*"]\n', "tables[0]: missing required key 'method'"),
        (
            R + '[[tables]]\nmatch = ["*"]\nmethod = "int4"\n',
            'tables[0]: method must be one of "keep", "fp16", "ptq", "qat", "share", got "int4"',
        ),
        (
            R + '[[tables]]\nmatch = ["*"]\nmethod = "ptq"\n',
            "tables[0]: missing required key 'bits'",
        ),
        (
            R + '[[tables]]\nmatch = ["*"]\nmethod = "ptq"\nbits = 3\n',
            "tables[0]: bits must be one of 8, 4, 2, got 3",
        ),
        (
            R + '[[tables]]\nmatch = ["*"]\nmethod = "ptq"\nbits = "4"\n',
            'tables[0]: bits must be one of 8, 4, 2, got "4"',
        ),
        (
            R + '[[tables]]\nmatch = ["*"]\nmethod = "ptq"\nbits = 4\ngranularity = "column"\n',
            'tables[0]: granularity must be one of "row", "table", got "column"',
        ),
        (
            R + '[[tables]]\nmatch = ["*"]\nmethod = "keep"\nbits = 4\n',
            "tables[0]: key 'bits' does not apply to method 'keep'",
        ),
        (
            R + '[[tables]]\nmatch = ["*"]\nmethod = "ptq"\nbits = 4\ngranularity = "table"\n'
            "scale_refresh = 100\n",
            "tables[0]: key 'scale_refresh' does not apply to method 'ptq'",
        ),
        (
            R + QAT + "scale_refresh = 100\n" + FINETUNE,
            "tables[0]: scale_refresh applies only to granularity 'table'",
        ),
        (
            R + QAT + 'granularity = "table"\nscale_refresh = 0\n' + FINETUNE,
            "tables[0]: scale_refresh must be >= 1, got 0",
        ),
        (
            R + '[[tables]]\nmatch = ["*"]\nmethod = "keep"\nmin_rows = 100\nmax_rows = 99\n',
            "tables[0]: min_rows 100 > max_rows 99",
        ),
        (
            R + '[[tables]]\nmatch = ["*"]\nmethod = "keep"\nmin_rows = -1\n',
            "tables[0]: min_rows must be >= 0, got -1",
        ),
        (
            R + '[[tables]]\nmatch = ["*"]\nmethod = "keep"\nmax_rows = 1.5\n',
            "tables[0]: max_rows must be an integer, got 1.5",
        ),
        # share
        (
            R + '[[tables]]\nmatch = ["*"]\nmethod = "share"\nblock_size = 32\n' + FINETUNE,
            "tables[0]: method 'share' needs exactly one of 'compression'",
        ),
        (
            R + '[[tables]]\nmatch = ["*"]\nmethod = "share"\ncompression = 10\nbytes = 100\n'
            "block_size = 32\n" + FINETUNE,
            "tables[0]: method 'share' needs exactly one of 'compression'",
        ),
        (
            R
            + '[[tables]]\nmatch = ["*"]\nmethod = "share"\ncompression = 1\nblock_size = 32\n'
            + FINETUNE,
            "tables[0]: compression must be > 1, got 1",
        ),
        (
            R
            + '[[tables]]\nmatch = ["*"]\nmethod = "share"\nbytes = 0\nblock_size = 32\n'
            + FINETUNE,
            "tables[0]: bytes must be >= 1, got 0",
        ),
        (
            R + '[[tables]]\nmatch = ["*"]\nmethod = "share"\ncompression = 10\n' + FINETUNE,
            "tables[0]: missing required key 'block_size'",
        ),
        (
            R
            + '[[tables]]\nmatch = ["*"]\nmethod = "share"\ncompression = 10\nblock_size = 0\n'
            + FINETUNE,
            "tables[0]: block_size must be >= 1, got 0",
        ),
        (
            R + '[[tables]]\nmatch = ["*"]\nmethod = "share"\ncompression = 10\nblock_size = 4\n'
            'array_dtype = "bf16"\n' + FINETUNE,
            'tables[0]: array_dtype must be one of "fp32", "fp16", "int8", got "bf16"',
        ),
        (
            R + '[[tables]]\nmatch = ["a"]\nmethod = "share"\ncompression = 10\nblock_size = 4\n'
            'group = "g"\n[[tables]]\nmatch = ["b"]\nmethod = "share"\ncompression = 20\n'
            'block_size = 4\ngroup = "g"\n' + FINETUNE,
            "tables[1]: group 'g' has compression 10.0 in tables[0] but 20.0 here",
        ),
        # mlp
        (R + "[mlp]\nbits = 8\n", "mlp: missing required key 'method'"),
        (R + '[mlp]\nmethod = "ptq"\n', "mlp: missing required key 'bits'"),
        (R + '[mlp]\nmethod = "ptq"\nbits = 2\n', "mlp: bits must be one of 8, 4, got 2"),
        (R + '[mlp]\nmethod = "fp16"\n', 'mlp: method must be one of "keep", "ptq", "qat"'),
        (
            R + '[mlp]\nmethod = "keep"\nbits = 8\n',
            "mlp: key 'bits' does not apply to method 'keep'",
        ),
        (
            R + '[mlp]\nmethod = "ptq"\nbits = 8\nper_channel = false\n',
            "mlp: per_channel = false is not supported",
        ),
        (
            R + '[mlp]\nmethod = "ptq"\nbits = 8\nper_channel = 1\n',
            "mlp: per_channel must be true or false, got 1",
        ),
        # finetune values
        (R + QAT + "[finetune]\nepochs = 0\n", "finetune: epochs must be > 0, got 0"),
        (R + QAT + "[finetune]\nsteps = 0\n", "finetune: steps must be >= 1, got 0"),
        (R + QAT + "[finetune]\nsteps = 1.5\n", "finetune: steps must be an integer, got 1.5"),
        (R + QAT + '[finetune]\nbatch_size = "big"\n', "finetune: batch_size must be an integer"),
        (R + QAT + "[finetune]\nlr_dense = -0.1\n", "finetune: lr_dense must be > 0, got -0.1"),
        (
            R + QAT + '[finetune]\noptimizer = "rmsprop"\n',
            'finetune: optimizer must be one of "adagrad", "sgd", "adam", "rowwise_adagrad", got "rmsprop"',
        ),
        (R + QAT + "[finetune]\nkeep_best = 1\n", "finetune: keep_best must be true or false"),
        # the recipe as a whole
        (
            R + QAT,
            "tables[0]: method 'qat' needs fine-tuning but the recipe has no [finetune] table",
        ),
        (R + '[mlp]\nmethod = "qat"\nbits = 4\n', "mlp: method 'qat' needs fine-tuning"),
        (
            R + '[[tables]]\nmatch = ["*"]\nmethod = "share"\ncompression = 10\nblock_size = 4\n',
            "tables[0]: method 'share' needs fine-tuning",
        ),
        (
            R + '[[tables]]\nmatch = ["*"]\nmethod = "ptq"\nbits = 4\n' + FINETUNE,
            "finetune: nothing is fine-tuned",
        ),
        (
            R + QAT + '[finetune]\noptimizer = "adam"\n',
            "finetune: optimizer 'adam' cannot take the sparse embedding gradients",
        ),
        (
            R + '[[tables]]\nmatch = ["*"]\nmethod = "fp16"\n[[tables]]\nmatch = ["t_1"]\n'
            'method = "keep"\n',
            "tables[1]: can never apply: tables[0] matches every table",
        ),
    ],
)
def test_errors(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ")
    assert message in msg
    assert "\n" not in msg


def test_parse_recipe_names_its_source() -> None:
    with pytest.raises(RecipeError, match=r"^<string>: unknown top-level key 'x'"):
        parse_recipe('name = "a"\nx = 1\n')
    with pytest.raises(RecipeError, match=r"^mine: missing required key 'name'"):
        parse_recipe("", "mine")


def test_an_unreadable_recipe_file_is_one_line(tmp_path, monkeypatch):
    """A recipe the user may not read is a RecipeError naming it, not a PermissionError."""
    path = tmp_path / "secret.toml"
    path.write_text('name = "x"\n')
    real_read = Path.read_text

    def denied(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied")
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(RecipeError, match="secret.toml: cannot read: Permission denied"):
        load_recipe(path)
