"""Hostile inputs (issue 10, section 7): each is one ``error:`` line naming the file and the line,
sample or key, exit code 2, never a traceback; ``--on-bad-line skip`` counts and drops a malformed
text line.

Covers Criteo text (over-long and sign-bearing dense fields, over-long lines, truncated gzip), the
project ``.npz`` and TorchRec npy days (NaN/inf dense values, labels outside {0, 1}, negative ids)
and recipe numbers beyond int64/float32 (``seed = 99999999999999999999``).
"""

from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_world

from compress.cli.main import main
from compress.data import criteo_text as criteo
from compress.data.criteo_text import MAX_DEC_DIGITS, MAX_HEX_DIGITS, CriteoLayout, parse_block
from compress.data.dataset import Dataset
from compress.data.npz import load_npz, save_npz
from compress.errors import DataError, RecipeError
from compress.recipe.parse import parse_recipe

NUM_DENSE = 5  # tiny_world's model: 5 dense features, sparse features cat_0..cat_3
NUM_SPARSE = 4


@pytest.fixture
def world(tmp_path):
    return tiny_world(tmp_path, n=400)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["--no-progress", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


def text_line(i: int) -> str:
    """A valid line for tiny_world's model; labels alternate so AUC is defined."""
    dense = [str(i % 7), "", "-1", str(i), "42"]
    sparse = [f"{i:x}", "", "DEADbeef", "ffffffffffffffff"]
    return "\t".join([str(i % 2), *dense, *sparse])


def with_field(line: str, column: int, value: str) -> str:
    fields = line.split("\t")
    fields[column] = value
    return "\t".join(fields)


def write_text(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def eval_json(capsys, ckpt: Path, data: Path, *extra: str) -> tuple[int, dict | None, str]:
    code, out, err = run(capsys, "eval", ckpt, "--data", data, "--json", *extra)
    return code, (json.loads(out) if code == 0 else None), err


# --------------------------------------------------------------------------------------------------
# Criteo text


# Longer than the parser's 24-byte window with a '-' where the window starts: an IndexError before.
LONG_DENSE_FIELDS = [
    "9" * 30 + "-" + "9" * 23,  # the reported one
    "-" * 60,
    "1" * 100 + "-" + "1" * 23,
]


@pytest.mark.parametrize("field", LONG_DENSE_FIELDS)
def test_long_dense_field_is_a_bad_line_not_a_traceback(world, tmp_path, capsys, field):
    ckpt, *_ = world
    lines = [text_line(i) for i in range(12)]
    lines[6] = with_field(lines[6], 1, field)
    data = write_text(tmp_path / "day.tsv", lines)
    code, _, err = eval_json(capsys, ckpt, data)
    assert_one_error_line(code, err, f"{data}:7: integer field 1 (column 2)")
    code, doc, err = eval_json(capsys, ckpt, data, "--on-bad-line", "skip")
    assert code == 0 and doc["n"] == 11, err


def test_too_many_digits_is_said_in_words(world, tmp_path, capsys):
    ckpt, *_ = world
    lines = [text_line(i) for i in range(4)]
    lines[1] = with_field(lines[1], 2, "-" + "1" * (MAX_DEC_DIGITS + 1))
    lines[3] = with_field(lines[3], 8, "a" * (MAX_HEX_DIGITS + 1))
    data = write_text(tmp_path / "day.tsv", lines)
    code, _, err = eval_json(capsys, ckpt, data)
    assert_one_error_line(
        code, err, f"{data}:2: integer field 2 (column 3) has more than 18 digits"
    )
    write_text(data, [lines[0], lines[3]])
    code, _, err = eval_json(capsys, ckpt, data)
    assert_one_error_line(
        code, err, f"{data}:2: categorical field 3 (column 9) has more than 16 hex digits"
    )


def _reference_parse(block: bytes, layout: CriteoLayout) -> list[tuple | None]:
    """What the vectorized parser must return per line: ``None`` for a bad line."""
    dec = re.compile(rb"-?[0-9]{1,%d}" % MAX_DEC_DIGITS)
    hexa = re.compile(rb"[0-9a-fA-F]{1,%d}" % MAX_HEX_DIGITS)
    out: list[tuple | None] = []
    for line in block.split(b"\n")[:-1]:
        fields = line.removesuffix(b"\r").split(b"\t")
        dense, sparse = fields[1 : 1 + layout.num_dense], fields[1 + layout.num_dense :]
        ok = (
            len(fields) == layout.num_columns
            and fields[0] in (b"0", b"1")
            and all(not f or dec.fullmatch(f) for f in dense)
            and all(not f or hexa.fullmatch(f) for f in sparse)
        )
        if not ok:
            out.append(None)
            continue
        out.append(
            (
                int(fields[0]),
                [int(f) if f else 0 for f in dense],
                [int(f, 16) if f else 0 for f in sparse],
            )
        )
    return out


HOSTILE_TOKENS = [
    b"", b"0", b"-", b"+", b"+3", b"--3", b"1e5", b"0x10", b" 1", b"1 ", b"\x00", b"1\x00", b"\r",
    b"\xff", b"12-3", b"-0", b"9" * 18, b"-" + b"9" * 18, b"9" * 19, b"-" + b"9" * 19,
    b"9" * 30 + b"-" + b"9" * 23, b"-" * 40, b"1" * 300, b"-" + b"1" * 300, b"f" * 16, b"f" * 17,
    b"g", b"DeadBeef", b"-9223372036854775808",
]  # fmt: skip


def test_vectorized_parser_agrees_with_a_reference_on_hostile_fields():
    layout = CriteoLayout(num_dense=3, num_sparse=2)
    rng = random.Random(7)

    def field() -> bytes:
        if rng.random() < 0.6:
            return rng.choice(HOSTILE_TOKENS)
        return bytes(rng.choice(b"0123456789-abcfxAF\r\x00 +") for _ in range(rng.randint(0, 40)))

    for _ in range(300):
        lines = []
        for _ in range(rng.randint(1, 12)):
            fields = [rng.choice([b"0", b"1"])]
            fields += [str(rng.randint(-(10**18) + 1, 10**18 - 1)).encode() for _ in range(3)]
            fields += [b"%x" % rng.randint(0, 2**64 - 1) for _ in range(2)]
            for _ in range(rng.randint(0, 2)):
                fields[rng.randrange(len(fields))] = field()
            if rng.random() < 0.1:
                fields = fields[: rng.randint(0, 5)]
            lines.append(b"\t".join(fields) + (b"\r" if rng.random() < 0.2 else b""))
        block = b"\n".join(lines) + b"\n"
        want = _reference_parse(block, layout)
        got = parse_block(block, layout)
        good = [w for w in want if w is not None]
        assert got.num_lines == len(want)
        assert got.bad_lines.tolist() == [i for i, w in enumerate(want) if w is None], block
        assert got.labels.tolist() == [g[0] for g in good]
        assert got.dense.tolist() == [g[1] for g in good], block
        assert got.sparse.tolist() == [g[2] for g in good], block


def test_over_long_line_is_dropped_unread_and_counted(world, tmp_path, capsys, monkeypatch):
    ckpt, *_ = world
    monkeypatch.setattr(criteo, "CHUNK_BYTES", 64)  # the long line spans many reads
    lines = [text_line(i) for i in range(10)]
    lines[4] = "1\t" * 5000
    data = write_text(tmp_path / "day.tsv", lines)
    limit = CriteoLayout(NUM_DENSE, NUM_SPARSE).max_line_bytes
    code, _, err = eval_json(capsys, ckpt, data)
    assert_one_error_line(code, err, f"{data}:5: line longer than {limit:,} bytes")
    code, doc, err = eval_json(capsys, ckpt, data, "--on-bad-line", "skip")
    assert code == 0 and doc["n"] == 9, err
    got = criteo.read_criteo(
        data,
        num_dense=NUM_DENSE,
        num_sparse=NUM_SPARSE,
        feature_names=[f"cat_{j}" for j in range(NUM_SPARSE)],
        num_embeddings=[20, 300, 2000, 5000],
        on_bad_line="skip",
    )
    assert got.skipped_lines == 1
    np.testing.assert_array_equal(got.dataset.labels, [i % 2 for i in range(10) if i != 4])
    lines[4] = "1\t" * 100  # within one read: the same message
    write_text(data, lines)
    code, _, err = eval_json(capsys, ckpt, data)
    assert_one_error_line(code, err, f"{data}:5: line longer than {limit:,} bytes")
    # ... also when the file ends inside it (no newline at all)
    data.write_text("\n".join(lines[:3]) + "\n" + "7" * 10_000)
    code, _, err = eval_json(capsys, ckpt, data)
    assert_one_error_line(code, err, f"{data}:4: line longer than")


def test_valid_line_of_maximal_length_is_read_and_one_byte_more_is_not(tmp_path, monkeypatch):
    monkeypatch.setattr(criteo, "CHUNK_BYTES", 16)
    layout = CriteoLayout(num_dense=2, num_sparse=1)
    line = "\t".join(["1", "-" + "9" * 18, "-" + "9" * 18, "f" * 16]) + "\r"
    assert len(line) == layout.max_line_bytes
    path = tmp_path / "max.tsv"
    path.write_bytes((line + "\n").encode() * 3 + (line + "0\n").encode())  # 1 byte too long
    kw = dict(num_dense=2, num_sparse=1, feature_names=["x"], num_embeddings=[10])
    got = criteo.read_criteo(path, on_bad_line="skip", dense_transform="none", **kw)
    assert len(got.dataset) == 3 and got.skipped_lines == 1
    np.testing.assert_array_equal(got.dataset.dense, np.full((3, 2), -(10**18 - 1), np.float32))
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:4: line longer than 59 bytes"):
        criteo.read_criteo(path, **kw)


def test_truncated_gzip_names_the_last_line_read_also_when_skipping(
    world, tmp_path, capsys, monkeypatch
):
    ckpt, *_ = world
    monkeypatch.setattr(criteo, "CHUNK_BYTES", 256)
    payload = ("\n".join(text_line(i) for i in range(3000)) + "\n").encode()
    packed = gzip.compress(payload)
    data = tmp_path / "day.gz"
    data.write_bytes(packed[: len(packed) // 2])
    for mode in ("error", "skip"):
        code, _, err = eval_json(capsys, ckpt, data, "--on-bad-line", mode)
        assert_one_error_line(code, err, f"{data}: cannot be read after line ")
        last = int(re.search(r"after line (\d+)", err).group(1))
        assert 0 < last < 3000


# --------------------------------------------------------------------------------------------------
# Project .npz


def _rewrite_npz(src: Path, dst: Path, **replace: np.ndarray) -> Path:
    with np.load(src, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}
    arrays.update(replace)
    with open(dst, "wb") as fh:
        np.savez(fh, **arrays)
    return dst


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_npz_non_finite_dense_names_key_and_sample(world, tmp_path, capsys, value):
    ckpt, _, valid, _ = world
    dense = load_npz(valid).dense.copy()
    dense[3, 1] = value
    bad = _rewrite_npz(valid, tmp_path / "bad.npz", dense=dense)
    code, _, err = run(capsys, "eval", ckpt, "--data", bad)
    assert_one_error_line(
        code, err, f"{bad}: key 'dense': value {value!r}", "sample 3, column 1 is not finite"
    )


@pytest.mark.parametrize("value", [2.0, 0.5, -1.0, np.nan])
def test_npz_label_outside_0_1_names_key_and_sample(world, tmp_path, capsys, value):
    ckpt, _, valid, _ = world
    labels = load_npz(valid).labels.copy()
    labels[5] = value
    bad = _rewrite_npz(valid, tmp_path / "bad.npz", labels=labels)
    code, _, err = run(capsys, "eval", ckpt, "--data", bad)
    assert_one_error_line(code, err, f"{bad}: key 'labels': value {value!r} at sample 5")


def test_npz_click_prob_outside_0_1_is_rejected(world, tmp_path):
    _, _, valid, _ = world
    ds = load_npz(valid)
    ds.click_prob = np.full(len(ds), 0.5)
    ds.click_prob[2] = 1.5
    save_npz(ds, tmp_path / "p.npz")
    with pytest.raises(DataError, match=r"key 'click_prob': value 1.5 at sample 2"):
        load_npz(tmp_path / "p.npz")


# --------------------------------------------------------------------------------------------------
# TorchRec npy days


def _write_day(directory: Path, ds: Dataset, **replace: np.ndarray) -> Path:
    """``ds`` as one npy day (the first id of every bag), with some parts replaced."""
    directory.mkdir(exist_ok=True)
    parts = {
        "dense": ds.dense,
        "sparse": np.stack([ds.values[f][ds.offsets[f][:-1]] for f in ds.feature_names], axis=1),
        "labels": ds.labels.astype(np.int32)[:, None],
    }
    parts.update(replace)
    for part, arr in parts.items():
        np.save(directory / f"day_0_{part}.npy", arr)
    return directory


@pytest.mark.parametrize(
    ("value", "dtype"), [(np.nan, np.float32), (-np.inf, np.float32), (1e300, np.float64)]
)
def test_npy_non_finite_dense_names_file_sample_and_column(world, tmp_path, capsys, value, dtype):
    ckpt, _, valid, _ = world
    ds = load_npz(valid)
    dense = ds.dense.astype(dtype)
    dense[7, 2] = value
    days = _write_day(tmp_path / "days", ds, dense=dense)
    code, _, err = run(capsys, "eval", ckpt, "--data", days)
    assert_one_error_line(
        code,
        err,
        f"{days / 'day_0_dense.npy'}: value {value!r} at sample 7, column 2",
        "not a finite float32",
    )


def test_npy_negative_id_is_an_error_not_a_wrapped_row(world, tmp_path, capsys):
    ckpt, _, valid, _ = world
    ds = load_npz(valid)
    days = _write_day(tmp_path / "days", ds)
    sparse = np.load(days / "day_0_sparse.npy")
    sparse[4, 2] = -7
    np.save(days / "day_0_sparse.npy", sparse)
    code, _, err = run(capsys, "eval", ckpt, "--data", days)
    assert_one_error_line(
        code,
        err,
        f"{days / 'day_0_sparse.npy'}: negative id -7 at sample 4, column 2 (feature 'cat_2')",
    )


def test_npy_label_outside_0_1_names_the_sample(world, tmp_path, capsys):
    ckpt, _, valid, _ = world
    ds = load_npz(valid)
    labels = ds.labels.astype(np.int64)[:, None]
    labels[9, 0] = 2
    days = _write_day(tmp_path / "days", ds, labels=labels)
    code, _, err = run(capsys, "eval", ckpt, "--data", days)
    assert_one_error_line(code, err, f"{days / 'day_0_labels.npy'}: value 2 at sample 9")


def test_npy_dense_width_names_the_dense_file(world, tmp_path, capsys):
    ckpt, _, valid, _ = world
    ds = load_npz(valid)
    days = _write_day(tmp_path / "days", ds, dense=ds.dense[:, :3])
    code, _, err = run(capsys, "eval", ckpt, "--data", days)
    assert_one_error_line(
        code, err, f"{days / 'day_0_dense.npy'}: 3 dense features, the model takes 5"
    )


# --------------------------------------------------------------------------------------------------
# Recipe numbers and CLI numbers

FINETUNE_HEAD = 'name = "x"\n[[tables]]\nmatch = ["*"]\nmethod = "qat"\nbits = 8\n[finetune]\n'


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("seed = 99999999999999999999", "seed must be <= 9223372036854775807 (int64 range)"),
        ("seed = 9223372036854775808", "seed must be <= 9223372036854775807"),
        ("steps = 99999999999999999999", "steps must be <= 1,000,000,000 (the longest"),
        ("batch_size = 99999999999999999999", "batch_size must be <= 9223372036854775807"),
        ("eval_every = 99999999999999999999", "eval_every must be <= 9223372036854775807"),
        ("eval_batch_size = 18446744073709551616", "eval_batch_size must be <="),
        ("checkpoint_every = 18446744073709551616", "checkpoint_every must be <="),
        ("lr_dense = 1e308", "lr_dense must be <= 3.4028234663852886e+38 (float32 range)"),
        ("lr_embedding = 3.5e38", "lr_embedding must be <= 3.4028234663852886e+38"),
    ],
)
def test_recipe_numbers_beyond_int64_or_float32_are_one_line(
    world, tmp_path, capsys, setting, message
):
    ckpt, train, *_ = world
    recipe = tmp_path / "r.toml"
    recipe.write_text(FINETUNE_HEAD + setting + "\n")
    code, _, err = run(capsys, "--recipe", recipe, ckpt, "--data", train, "--out", tmp_path / "o")
    assert_one_error_line(code, err, f"{recipe}: finetune: {message}")
    assert not (tmp_path / "o").exists()


def test_recipe_numbers_at_the_limits_are_accepted_one_past_is_not():
    recipe = parse_recipe(
        FINETUNE_HEAD + "seed = 9223372036854775807\nsteps = 1000000000\n"
        "lr_dense = 3.4028234663852886e38\n"
    )
    assert recipe.finetune.seed == 2**63 - 1 and recipe.finetune.steps == 10**9
    for setting in ("seed = 9223372036854775808", "seed = -1", "lr_dense = 3.41e38"):
        with pytest.raises(RecipeError, match=r"^<string>: finetune: (seed|lr_dense) must be"):
            parse_recipe(FINETUNE_HEAD + setting + "\n")


@pytest.mark.parametrize("size", ["0", "-5"])
def test_eval_batch_size_below_one_is_a_usage_error(world, capsys, size):
    ckpt, _, valid, _ = world
    code, _, err = run(capsys, "eval", ckpt, "--data", valid, f"--batch-size={size}")
    assert code == 2 and "--batch-size" in err and "Traceback" not in err


def test_steps_beyond_int64_is_a_usage_error(world, capsys):
    ckpt, train, *_ = world
    code, _, err = run(capsys, "-r", "int4_qat", ckpt, "--data", train, "--steps", str(2**63))
    assert code == 2 and "--steps" in err and "Traceback" not in err
