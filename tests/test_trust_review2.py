"""Second review of issue 10 (trust): each case here failed, or let a hostile input through, on the
code before its fix.

1. A DCP ``.metadata`` whose sizes its storage does not back (a 32 GB tensor over a 33 kB slice,
   several tensors over the same bytes, overlapping chunks, compressed slices) is refused before
   anything is allocated; a consistent checkpoint too large for memory is one line naming the
   tensor and the bytes it needs.
2. The ONNX graphs' declared inputs and outputs are held to the manifest's features: a re-sealed
   manifest that swaps two features (so the Predictor checks ids against the wrong table) is
   refused, naming the graph and the input.
3. A format 2 manifest relabelled format 1 is refused; ``verify`` refuses a genuine format 1
   directory unless ``--allow-format-1``; the Predictor warns and says how to re-export.
4. A recipe integer of thousands of digits and a deeply nested TOML value are one-line errors.
5. No project file names the notes outside the project; the real Criteo rows are found through
   ``$DQRM_CRITEO_ROWS``.
6. An fp16 checkpoint's kept tables stay fp16 on disk, the plan's bytes are the bytes written, and
   the baseline is labelled with the checkpoint's precision.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import (
    CRITEO_ROWS_ENV,
    CRITEO_SAMPLE,
    as_format_2_layout,
    criteo_sample_path,
    make_dlrm,
    tiny_world,
)
from torch.distributed.checkpoint.metadata import MetadataIndex

from compress import pipeline
from compress.cli.main import main
from compress.errors import ArtifactError, CheckpointError, RecipeError
from compress.io.checkpoint import load_tensors, open_checkpoint
from compress.recipe.parse import load_recipe, parse_recipe
from exporters.artifacts import write as artifacts
from exporters.artifacts.manifest_integrity import dump_manifest, seal
from exporters.artifacts.manifest_schema import DIGEST_KEY, MANIFEST
from exporters.artifacts.verify import inspect_artifacts
from exporters.onnx.writer import OnnxExportConfig, onnx_writer
from exporters.runtime.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]
TABLE = "sparse_arch.embedding_bag_collection.embedding_bags.{}.weight"


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--no-progress", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code: int, err: str, *fragments: str) -> None:
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


# --------------------------------------------------------------------------------------------
# 1. DCP sizes must be backed by the data files


@pytest.fixture
def dcp_dir(tmp_path) -> Path:
    dcp.save(make_dlrm().state_dict(), checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    return tmp_path / "dcp"


def _edit_metadata(ckpt: Path, edit) -> None:
    meta = ckpt / ".metadata"
    md = pickle.loads(meta.read_bytes())
    edit(md)
    meta.write_bytes(pickle.dumps(md))


def _storage_of(md, key: str):
    return next(info for index, info in md.storage_data.items() if index.fqn == key)


@pytest.mark.parametrize("size", [(10**9, 8), (2**40, 2**40)], ids=["32GB", "numel-wraps"])
def test_a_size_its_storage_does_not_back_is_refused_before_allocating(dcp_dir, capsys, size):
    """Before: the checkpoint opened, and reading it called torch.empty for 32 GB (a traceback,
    or all the memory); [2^40, 2^40] has a numel that wraps to 0 in int64."""

    def grow(md) -> None:
        item = md.state_dict_metadata[TABLE.format("t_cat_3")]
        item.size = torch.Size(size)
        item.chunks[0].sizes = torch.Size(size)

    _edit_metadata(dcp_dir, grow)
    with pytest.raises(CheckpointError, match=r"t_cat_3.*a chunk of .* needs [\d,]+ bytes"):
        open_checkpoint(dcp_dir)
    code, _, err = run(capsys, "plan", "--recipe", "int8_ptq", dcp_dir)
    one_error_line(code, err, str(dcp_dir / ".metadata"), "t_cat_3", "holds 33,")


def test_tensors_sharing_the_same_bytes_are_bounded_by_the_files(dcp_dir):
    """Each of four tables claims t_cat_3's slice (each slice is big enough for its chunk): the
    tensors need more bytes than all data files hold."""

    def alias(md) -> None:
        source = _storage_of(md, TABLE.format("t_cat_3"))
        for name in ("t_cat_0", "t_cat_1", "t_cat_2"):
            item = md.state_dict_metadata[TABLE.format(name)]
            item.size = item.chunks[0].sizes = torch.Size([1000, 8])
            md.storage_data[MetadataIndex(TABLE.format(name), torch.Size([0, 0]))] = source

    _edit_metadata(dcp_dir, alias)
    with pytest.raises(CheckpointError, match=r"tensors need [\d,]+ bytes, its data files hold"):
        open_checkpoint(dcp_dir)


def test_overlapping_chunks_are_refused(dcp_dir):
    """Two chunks of rows 0-499 and 250-749 hold as many elements as the table; rows 750-999 would
    be uninitialised memory."""
    key = TABLE.format("t_cat_3")

    def overlap(md) -> None:
        item = md.state_dict_metadata[key]
        first = item.chunks[0]
        first.sizes = torch.Size([500, 8])
        second = type(first)(offsets=torch.Size([250, 0]), sizes=torch.Size([500, 8]))
        item.chunks.append(second)
        md.storage_data[MetadataIndex(key, second.offsets)] = _storage_of(md, key)

    _edit_metadata(dcp_dir, overlap)
    with pytest.raises(CheckpointError, match=r"chunks at \(0, 0\) and \(250, 0\) overlap"):
        open_checkpoint(dcp_dir)


def test_compressed_storage_is_refused(dcp_dir):
    """A compressed slice could expand to any size; only plain FileSystemWriter data is read."""

    def compress(md) -> None:
        _storage_of(md, TABLE.format("t_cat_1")).transform_descriptors = ["stream.zstd/1"]

    _edit_metadata(dcp_dir, compress)
    with pytest.raises(CheckpointError, match=r"t_cat_1.*storage is transformed"):
        open_checkpoint(dcp_dir)


def test_a_consistent_checkpoint_too_large_for_memory_is_one_line(dcp_dir, monkeypatch):
    """The allocation of t_cat_3 is made to ask the real allocator for 2^62 bytes."""
    ckpt = open_checkpoint(dcp_dir)
    target = ckpt.tensors[TABLE.format("t_cat_3")].shape
    real_empty = torch.empty

    def empty(*args, **kwargs):
        if args and args[0] == target and kwargs.get("device") is None:
            return real_empty(2**62, dtype=torch.uint8)  # fails in the allocator
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    with pytest.raises(CheckpointError) as caught:
        load_tensors(ckpt)
    message = str(caught.value)
    assert "\n" not in message and str(dcp_dir) in message
    assert "t_cat_3" in message and "32,000 bytes needed" in message


# --------------------------------------------------------------------------------------------
# 2. ONNX graphs against the manifest's features; 3. format 1


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(artifact directory with ONNX graphs, valid .npz)."""
    tmp = tmp_path_factory.mktemp("review2")
    ckpt, _, valid, _ = tiny_world(tmp, "DLRM", n=2000)
    (tmp / "r.toml").write_text('name = "r"\n[[tables]]\nmatch = ["*"]\nmethod = "ptq"\nbits = 8\n')
    job = pipeline.load(ckpt)
    result = pipeline.compress(job, pipeline.plan(job, tmp / "r.toml"), valid=valid)
    writer = onnx_writer(result.model, OnnxExportConfig(parity_samples=16))
    return artifacts.save(result, tmp / "out", extra_writers=(writer,)).path, valid


@pytest.fixture
def copy_dir(world, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(world[0], out)
    return out


def _manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def _reseal(path: Path, manifest: dict) -> None:
    """What anyone who can write the directory can do: edit and recompute the digest."""
    manifest.pop(DIGEST_KEY, None)
    (path / MANIFEST).write_text(dump_manifest(seal(manifest)))


def _swap_features(m: dict, a: str, b: str) -> None:
    """Tables t_<a> and t_<b> trade features everywhere in the model's description."""

    def swap(names: list[str]) -> list[str]:
        return [b if n == a else a if n == b else n for n in names]

    for t in (*m["model"]["tables"], *m["tables"]):
        t["feature_names"] = swap(t["feature_names"])
    m["model"]["feature_names"] = swap(m["model"]["feature_names"])
    sparse = m["inputs"]["sparse"]
    sparse[a], sparse[b] = sparse[b], sparse[a]


def test_a_resealed_manifest_that_swaps_features_is_refused(world, copy_dir, capsys):
    """Before: verify said ok, and the Predictor checked cat_0's ids against the 5000-row table
    while the graph fed them to the 20-row one (id 4000 silently read row 0)."""
    m = _manifest(copy_dir)
    _swap_features(m, "cat_0", "cat_3")
    _reseal(copy_dir, m)
    code, _, err = run(capsys, "verify", copy_dir)
    one_error_line(code, err, "model.onnx", "graph 'model' input", "cat_3__values")
    with pytest.raises(ArtifactError, match="graph 'model' input"):
        Predictor(copy_dir, threads=1)
    code, _, err = run(capsys, "eval", copy_dir, "--data", world[1])
    one_error_line(code, err, "graph 'model' input")


def test_a_manifest_feeding_a_feature_to_another_input_is_refused(copy_dir, capsys):
    """Before: only the set of features was checked; the Predictor fed cat_0's ids to cat_1."""
    m = _manifest(copy_dir)
    feeds = m["onnx"]["graphs"]["model"]["features"]
    feeds["cat_0"], feeds["cat_1"] = feeds["cat_1"], feeds["cat_0"]
    _reseal(copy_dir, m)
    code, _, err = run(capsys, "verify", copy_dir)
    one_error_line(code, err, "feeds feature 'cat_0' to inputs ['cat_1__values'")


def test_a_dense_graph_of_another_width_is_refused(copy_dir, capsys):
    """The over-arch graph is held to the feature count too (sparse_embedding [batch, F, D])."""
    import onnx

    path = copy_dir / "over_arch.onnx"
    model = onnx.load(str(path), load_external_data=False)  # it reads dense/ in place
    model.graph.input[1].type.tensor_type.shape.dim[1].dim_value = 5
    onnx.save(model, str(path))
    m = _manifest(copy_dir)
    rel = "over_arch.onnx"
    m["files"][rel] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
    _reseal(copy_dir, m)
    code, _, err = run(capsys, "verify", copy_dir)
    one_error_line(code, err, "graph 'over_arch' input 1 is 'sparse_embedding' float[", "5,")


def _sha256(path: Path) -> str:
    from compress.io.fingerprint import sha256_file

    return sha256_file(path)


def _strip_to_format_1(path: Path) -> dict:
    """The directory as dqrm-compress 0.x wrote it: no digest, the transform a bare name, no
    parity reference data, no out-of-range note, no selection/report slices, the graph in
    ``onnx/`` with its own copy of the tables."""
    as_format_2_layout(path)
    m = _manifest(path)
    m.pop(DIGEST_KEY)
    m["format_version"] = 1
    m["inputs"]["dense"]["transform"] = "log3"
    for key in ("out_of_range_ids", "out_of_range_ids_note"):
        m["onnx"].pop(key)
    m["onnx"]["parity"].pop("reference_data")
    for key in ("select", "report"):
        m["source"]["data"].pop(key)
    m["files"] = {k: v for k, v in m["files"].items() if not k.startswith("onnx/parity/")}
    shutil.rmtree(path / "onnx" / "parity")
    (path / MANIFEST).write_text(dump_manifest(m))
    return m


@pytest.mark.parametrize("how", ["digest-kept", "digest-dropped"])
def test_a_format_2_manifest_relabelled_format_1_is_refused(copy_dir, capsys, how):
    """Before: relabelled with its digest recomputed it read with no warning at all; with the digest
    dropped it read with a warning, its parity data and transform record still there."""
    m = _manifest(copy_dir)
    m["format_version"] = 1
    m["inputs"]["dense"]["transform"] = "log3"
    if how == "digest-kept":
        _reseal(copy_dir, m)
        says = DIGEST_KEY
    else:
        m.pop(DIGEST_KEY)
        (copy_dir / MANIFEST).write_text(dump_manifest(m))
        says = "onnx.parity.reference_data"
    code, _, err = run(capsys, "verify", copy_dir)
    one_error_line(code, err, "format_version 1 manifest holds", says, "only format 2 writes")
    with pytest.raises(ArtifactError, match="only format 2 writes"):
        Predictor(copy_dir, threads=1)


def test_verify_refuses_format_1_unless_allowed(world, copy_dir, capsys, caplog):
    """Before: verify said ok (exit 0) to a directory whose manifest nothing protects."""
    _strip_to_format_1(copy_dir)
    code, out, err = run(capsys, "verify", copy_dir)
    one_error_line(code, err, "format_version 1", "--allow-format-1", "re-export")
    assert out == ""
    assert not inspect_artifacts(copy_dir).ok
    code, out, err = run(capsys, "verify", copy_dir, "--allow-format-1")
    assert code == 0 and out.startswith("ok: ") and err.startswith("warning: ")
    with caplog.at_level(logging.WARNING):
        predictor = Predictor(copy_dir, threads=1)
    assert "dqrm-compress --recipe" in caplog.text and "re-export" in caplog.text
    assert predictor.evaluate(world[1]) == Predictor(world[0], threads=1).evaluate(world[1])


# --------------------------------------------------------------------------------------------
# 4. Recipe integers and nesting


RECIPE_HEAD = 'name = "x"\n[[tables]]\nmatch = ["*"]\nmethod = "ptq"\nbits = 8\n[finetune]\n'


@pytest.mark.parametrize("base", ["decimal", "hex"])
def test_a_recipe_integer_of_thousands_of_digits_is_one_line(tmp_path, base):
    """Before: ValueError (Python's int/str digit limit) from tomllib or from printing the value."""
    value = "1" + "0" * 5000 if base == "decimal" else "0x1" + "0" * 5000
    path = tmp_path / "big.toml"
    path.write_text(RECIPE_HEAD + f"seed = {value}\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and "\n" not in message and len(message) < 300
    assert "seed" in message and "too large" in message


@pytest.mark.parametrize("opening", ["[", "{a = "], ids=["arrays", "inline-tables"])
def test_a_recipe_nested_100k_deep_is_one_line(tmp_path, opening):
    """Before: RecursionError from tomllib."""
    closing = "]" if opening == "[" else "}"
    path = tmp_path / "deep.toml"
    path.write_text(f'name = "x"\nv = {opening * 100_000}{closing * 100_000}\n')
    with pytest.raises(RecipeError, match=rf"^{path}: .*nesting too deep"):
        load_recipe(path)


def test_a_recipe_nested_past_the_limit_names_the_key():
    with pytest.raises(RecipeError, match=r"<s>: v\[0\].*nesting too deep"):
        parse_recipe('name = "x"\nv = ' + "[" * 40 + "]" * 40 + "\n", "<s>")


# --------------------------------------------------------------------------------------------
# 5. Nothing outside the project is named; the Criteo rows come from an environment variable


#: What would name the notes beside the project (spelled in pieces so this file does not).
OUTSIDE = ("../" + "shared", "REFERENCE" + ".md", '"shared" / ' + '"data"', "shared" + "/data")
SKIPPED_DIRS = {".git", ".venv", "demo", "__pycache__", ".pytest_cache", ".ruff_cache", ".cache"}


def _project_text_files():
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
        for name in filenames:
            path = Path(dirpath) / name
            if path.stat().st_size > 2_000_000:
                continue
            try:
                yield path, path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue


def test_no_project_file_names_the_notes_outside_it():
    """Before: the Criteo tests built their data path from it, and the fbgemm shim cited it."""
    found = sorted(
        f"{path.relative_to(ROOT)}: {needle}"
        for path, text in _project_text_files()
        for needle in OUTSIDE
        if needle in text
    )
    assert found == []


def test_the_criteo_rows_come_from_the_environment_variable(tmp_path, monkeypatch):
    rows = tmp_path / "rows"
    rows.mkdir()
    (rows / CRITEO_SAMPLE).write_text("0\t1\n")
    monkeypatch.setenv(CRITEO_ROWS_ENV, str(rows))
    assert criteo_sample_path() == rows / CRITEO_SAMPLE
    monkeypatch.setenv(CRITEO_ROWS_ENV, str(tmp_path))  # named, but without the rows: an error
    with pytest.raises(pytest.fail.Exception, match=CRITEO_ROWS_ENV):
        criteo_sample_path()


# --------------------------------------------------------------------------------------------
# 6. fp16 checkpoints


FP16_RECIPE = (
    'name = "keep_two"\n[[tables]]\nmatch = ["t_cat_0", "t_cat_1"]\nmethod = "keep"\n'
    '[[tables]]\nmatch = ["*"]\nmethod = "ptq"\nbits = 8\n'
)


def _half_world(tmp_path: Path, dtype: torch.dtype) -> tuple[Path, Path, torch.nn.Module]:
    ckpt, _, valid, model = tiny_world(tmp_path, n=1000)
    half = tmp_path / "half.pt"
    torch.save({k: v.to(dtype) for k, v in model.state_dict().items()}, half)
    (tmp_path / "r.toml").write_text(FP16_RECIPE)
    return half, valid, model


def test_an_fp16_checkpoint_keeps_fp16_tables_and_its_plan_is_what_is_written(tmp_path, capsys):
    """Before: kept tables were written as fp32 (640 bytes for a planned 320), the dense weights at
    twice the planned bytes, and the baseline was called FP32."""
    half, valid, model = _half_world(tmp_path, torch.float16)
    code, out, _ = run(
        capsys, "--recipe", tmp_path / "r.toml", half, "--valid", valid, "--out", tmp_path / "o"
    )
    assert code == 0
    assert "baseline (FP16)" in out and "FP32" not in out
    m = _manifest(tmp_path / "o")
    for t in m["tables"]:
        assert t["bytes"] == t["bytes_planned"], t["name"]
    assert m["bytes"]["tables"] + m["bytes"]["dense"] == m["plan"]["bytes_after"]
    state = model.state_dict()
    for name in ("t_cat_0", "t_cat_1"):
        stored = np.load(tmp_path / "o" / "tables" / f"{name}.npy")
        assert stored.dtype == np.float16
        assert np.array_equal(stored, state[TABLE.format(name)].half().numpy())
    code, out, _ = run(
        capsys, "--recipe", tmp_path / "r.toml", half, "--out", tmp_path / "j", "--json"
    )
    assert code == 0 and json.loads(out)["baseline_precision"] == "FP16"


def test_a_bf16_checkpoint_plans_the_fp32_bytes_it_writes(tmp_path):
    """bf16 has no artifact layout: kept tables are written as their exact fp32 values, and the
    plan says so (before: it planned bf16 bytes, half of what was written)."""
    half, _, _ = _half_world(tmp_path, torch.bfloat16)
    job = pipeline.load(half)
    plan = pipeline.plan(job, tmp_path / "r.toml")
    written = artifacts.save(pipeline.compress(job, plan), tmp_path / "o")
    tables = {t["name"]: t for t in written.manifest["tables"]}
    assert tables["t_cat_0"]["layout"] == "fp32"
    for t in tables.values():
        assert t["bytes"] == t["bytes_planned"], t["name"]
    bytes_written = written.manifest["bytes"]["tables"] + written.manifest["bytes"]["dense"]
    assert bytes_written == plan.bytes_after
