"""One copy of the tables on disk, read in place by the full ONNX graph (issue 12, point 2).

* The artifact directory holds every table once: ``model.onnx`` (format 3, at the directory's
  root) points its table initializers at ``tables/*.npy`` and ``shared/*.npy`` through ONNX
  external data; bytes on disk stay within the plan + 2% + 2 MB, and no other file holds a
  table's payload.
* Table payloads start on a page (byte 4096 of their ``.npy``), where the graph points.
* A plain ``onnxruntime.InferenceSession(path)`` loads the graph and matches PyTorch within 1e-5,
  and ONNX Runtime maps the table files rather than copying them.
* A graph whose external data was moved (offset into a header, past the end, a length that is not
  the tensor's, a file the manifest does not list for it, a path out of the directory) is refused
  by ``verify`` and the Predictor, manifest resealed or not.
* Format 2 directories (``onnx/model.onnx`` carrying its own copy) are still served.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import as_format_2_layout, make_dlrm, tiny_world

from compress import pipeline
from compress.data.npz import load_npz
from compress.errors import ArtifactError
from compress.io.fingerprint import sha256_file
from compress.io.npy_aligned import (
    PAYLOAD_ALIGNMENT,
    aligned_npy_header,
    open_npy_aligned,
    save_npy_aligned,
)
from exporters.artifacts.directory_checks import read_npy_header
from exporters.artifacts.manifest_integrity import dump_manifest, seal
from exporters.artifacts.manifest_schema import DIGEST_KEY, MANIFEST
from exporters.artifacts.verify import verify_artifacts
from exporters.export import export
from exporters.onnx.model import external_tensors
from exporters.onnx.parity import verify_parity
from exporters.onnx.writer import (
    ParitySet,
    reference_outputs,
    sample_multihot,
    sample_out_of_range,
)
from exporters.runtime.predictor import Predictor

ATOL = 1e-5
FINETUNE = "[finetune]\nsteps = 3\nbatch_size = 64\neval_every = 0\n"
#: Every way a table is stored: fp32, fp16, a shared int8 array, row-wise and table-wise codes.
MIXED = (
    """
name = "one_copy"
[[tables]]
match = ["t_cat_0"]
method = "keep"
[[tables]]
match = ["t_cat_1"]
method = "fp16"
[[tables]]
match = ["t_cat_2"]
method = "share"
compression = 10.0
block_size = 4
array_dtype = "int8"
[[tables]]
match = ["t_cat_3"]
method = "qat"
bits = 4
granularity = "row"
[mlp]
method = "qat"
bits = 4
"""
    + FINETUNE
)
#: Big row-wise and table-wise tables (about 6 MB), for counting bytes.
BIG = """
name = "big"
[[tables]]
match = ["t_cat_1"]
method = "ptq"
bits = 8
granularity = "table"
[[tables]]
match = ["*"]
method = "ptq"
bits = 4
granularity = "row"
"""
BIG_ROWS = (120_000, 50_000, 300, 7)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """(job, result, artifact dir, train .npz) of a fine-tuned model using every layout."""
    tmp = tmp_path_factory.mktemp("one_copy")
    ckpt, train, _, _ = tiny_world(tmp, "DLRM", n=800)
    (tmp / "recipe.toml").write_text(MIXED)
    job = pipeline.load(ckpt)
    result = pipeline.compress(job, pipeline.plan(job, tmp / "recipe.toml"), data=train)
    return job, result, export(result, tmp / "out").path, train


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """(job, result, artifact dir) of a model whose tables dominate its artifacts."""
    tmp = tmp_path_factory.mktemp("one_copy_big")
    job = pipeline.load(make_dlrm(seed=1, rows=BIG_ROWS, dim=64))
    (tmp / "recipe.toml").write_text(BIG)
    result = pipeline.compress(job, pipeline.plan(job, tmp / "recipe.toml"))
    return job, result, export(result, tmp / "out").path


@pytest.fixture
def copy_dir(mixed, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(mixed[2], out)
    return out


def _manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def _table_files(manifest: dict) -> list[str]:
    out = [f for t in manifest["tables"] for f in t["files"].values()]
    return out + [f for g in manifest["shared_arrays"] for f in g["files"].values()]


def _references(path: Path) -> dict[str, dict[str, str]]:
    """``{initializer: {location, offset, length}}`` of the external tensors of ``model.onnx``."""
    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    return {
        t.name: {e.key: e.value for e in t.external_data} for t in external_tensors(model.graph)
    }


# ---------------------------------------------------------------- bytes on disk


def test_the_directory_holds_no_second_copy_of_a_table(big) -> None:
    """Before: ``onnx/model.onnx.data`` (or the graph itself) held every table again, about as
    many bytes as the tables (here about 6 MB more than the plan)."""
    _, result, out = big
    manifest = _manifest(out)
    files = {p.relative_to(out).as_posix(): p.stat().st_size for p in out.rglob("*") if p.is_file()}
    tables = _table_files(manifest)
    payload = sum(t["bytes"] for t in manifest["tables"])
    assert payload == result.plan.embedding_bytes_after > 5_000_000  # a copy would show
    assert sum(files[f] for f in tables) <= payload + PAYLOAD_ALIGNMENT * len(tables)
    others = sum(n for f, n in files.items() if f not in tables)
    assert others < 1_000_000, {f: n for f, n in files.items() if f not in tables}
    assert sum(files.values()) <= result.plan.bytes_after * 1.02 + 2_000_000
    assert "model.onnx.data" not in files and "onnx/model.onnx" not in files
    # no file but its own holds a table's payload (checked on the largest table's first rows)
    largest = max(tables, key=files.get)
    probe = np.load(out / largest, mmap_mode="r")[:64].tobytes()
    holders = [f for f in files if probe in (out / f).read_bytes()]
    assert holders == [largest]


def test_every_table_file_is_read_in_place_by_the_graph(mixed, big) -> None:
    for out in (mixed[2], big[2]):
        manifest = _manifest(out)
        refs = _references(out)
        graph = manifest["onnx"]["graphs"]["model"]
        assert graph["file"] == "model.onnx"
        assert graph["external_data"] == sorted({r["location"] for r in refs.values()})
        scalar_scales = {  # one float (table-wise, int8 shared arrays): a constant in the graph
            t["files"]["scale"] for t in manifest["tables"] if t["layout"] == "tablewise"
        } | {g["files"]["scale"] for g in manifest["shared_arrays"] if "scale" in g["files"]}
        # and every MLP tensor but the quantized codes (kept at their width inside the graph)
        dense = {d["file"] for d in manifest["dense"] if "layout" not in d}
        assert dense and all(f.startswith("dense/") for f in dense)
        assert set(graph["external_data"]) == (set(_table_files(manifest)) - scalar_scales) | dense
        for ref in refs.values():
            size = (out / ref["location"]).stat().st_size
            # the whole payload, from the page where it starts
            assert int(ref["offset"]) == PAYLOAD_ALIGNMENT
            assert int(ref["offset"]) + int(ref["length"]) == size


def test_table_payloads_start_on_a_page(mixed) -> None:
    out = mixed[2]
    for rel in _table_files(_manifest(out)):
        dtype, shape, offset = read_npy_header(out / rel)
        assert offset == PAYLOAD_ALIGNMENT
        assert (out / rel).stat().st_size == offset + int(np.prod(shape)) * dtype.itemsize
        assert np.load(out / rel, mmap_mode="r").offset == PAYLOAD_ALIGNMENT
    for rel in ("onnx/parity/one_hot/dense.npy",):  # other arrays keep numpy's own header
        assert read_npy_header(out / rel)[2] < PAYLOAD_ALIGNMENT


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float16).reshape(3, 4),
        np.zeros((0, 8), np.uint8),
        np.asarray(3.5, np.float32),
        np.arange(6, dtype=np.float32).reshape(2, 3).T,  # not C-contiguous
        np.arange(7, dtype=np.int8),
    ],
)
def test_aligned_npy_files_read_as_any_npy(tmp_path, array) -> None:
    path = tmp_path / "a.npy"
    with open(path, "wb") as f:
        written = save_npy_aligned(f, array)
    assert path.stat().st_size == written == PAYLOAD_ALIGNMENT + array.nbytes
    back = np.load(path, allow_pickle=False)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    assert read_npy_header(path)[2] == PAYLOAD_ALIGNMENT
    assert aligned_npy_header(array.dtype, array.shape) == path.read_bytes()[:PAYLOAD_ALIGNMENT]


def test_an_aligned_npy_file_can_be_filled_in_place(tmp_path) -> None:
    path = tmp_path / "t.npy"
    rows = open_npy_aligned(path, np.uint8, (1000, 12))
    rows[:500] = 7
    rows[500:] = 9
    rows.flush()
    del rows
    back = np.load(path, mmap_mode="r")
    assert back.offset == PAYLOAD_ALIGNMENT and back[:500].min() == 7 and back[500:].max() == 9
    with pytest.raises(ValueError, match="Python objects"):
        aligned_npy_header(np.dtype(object), (3,))


def test_graphs_get_the_mode_of_every_other_file(mixed) -> None:
    """The graphs are written through temporary files beside them: not with a private mode."""
    out = mixed[2]
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in out.rglob("*.onnx")}
    assert set(modes) == {"model.onnx", "dense_arch.onnx", "over_arch.onnx"}
    assert set(modes.values()) == {(out / "tables" / "t_cat_0.npy").stat().st_mode & 0o777}
    assert not list(out.rglob(".*"))  # no temporary file left


def test_same_seed_reruns_are_byte_identical(big, tmp_path) -> None:
    _, result, out = big
    again = export(result, tmp_path / "again").path
    assert _manifest(again)["files"] == _manifest(out)["files"]


# ---------------------------------------------------------------- serving


def test_a_plain_session_matches_pytorch(mixed) -> None:
    """``InferenceSession(path)`` with no option reads the tables from their files and computes
    the PyTorch converted model's logits within 1e-5, out-of-range ids (row 0 of their own
    table) included; ``verify --parity`` passes."""
    job, result, out, _ = mixed
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = _manifest(out)["onnx"]["graphs"]["model"]["features"]
    names = {f: (io["values"], io["lengths"]) for f, io in inputs.items()}
    cases = [
        ParitySet(sample_multihot(job.spec, 300, seed=5)),
        sample_out_of_range(job.spec, 300, 6),
    ]
    for case in cases:
        expected = reference_outputs(result.model, case.data, job.spec)["logits"]
        got = session.run(["logits"], case.feeds(names))[0]
        assert np.abs(got - expected).max() <= ATOL
    report = verify_parity(out)
    assert (
        report["ok"]
        and report["max_abs_diff"] <= ATOL
        and set(report["sets"])
        == {
            "one_hot",
            "multi_hot",
            "out_of_range",
        }
    )


def test_the_predictor_serves_the_stored_tables(mixed) -> None:
    job, result, out, train = mixed
    sample = load_npz(train).slice(0, 500)
    got = Predictor(out, threads=1).predict(sample)
    expected = reference_outputs(result.model, sample, job.spec)["logits"].reshape(-1)
    assert np.abs(got - expected).max() <= ATOL


MAPPED = """
import json, sys
import numpy as np, onnxruntime as ort
def rss():
    f = {l.split(':')[0]: int(l.split()[1]) * 1024 for l in open('/proc/self/status')
         if l.startswith(('RssAnon', 'RssFile'))}
    return f['RssAnon'], f['RssFile']
root = sys.argv[1]
m = json.load(open(root + '/manifest.json'))
feeds = {'dense': np.zeros((4096, m['model']['dense_in_features']), np.float32)}
for f, io in m['onnx']['graphs']['model']['features'].items():
    n = [t['num_embeddings'] for t in m['tables'] if f in t['feature_names']][0]
    feeds[io['values']] = np.random.default_rng(0).integers(0, n, 4096)
    feeds[io['lengths']] = np.ones(4096, np.int64)
before = rss()
s = ort.InferenceSession(root + '/model.onnx', providers=['CPUExecutionProvider'])
opened = rss()
for _ in range(5):
    s.run(None, feeds)
print(json.dumps([before, opened, rss()]))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_onnx_runtime_maps_the_table_files(big) -> None:
    """ONNX Runtime maps the external table payloads (file-backed pages), it does not copy them
    into its own memory: opening the session adds far less anonymous memory than the tables'
    bytes (a copy would add them all), and serving brings their pages in as file-backed."""
    _, _, out = big
    payload = sum(t["bytes"] for t in _manifest(out)["tables"])
    got = subprocess.run(
        [sys.executable, "-c", MAPPED, str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    before, opened, served = json.loads(got.stdout.strip().splitlines()[-1])
    assert opened[0] - before[0] < payload / 2  # anonymous: the graph and MLPs, no table
    assert served[1] - before[1] > payload / 2  # the tables' pages, file-backed (shared)


# ---------------------------------------------------------------- tampering


def _rewrite_reference(path: Path, name: str, **change: str) -> None:
    """Change initializer ``name``'s external-data entries of ``model.onnx`` and reseal the
    manifest (what anyone who can write the directory can do)."""
    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.name == name)
    entries = {e.key: e.value for e in tensor.external_data} | change
    del tensor.external_data[:]
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    onnx.save(model, str(path / "model.onnx"))
    manifest = _manifest(path)
    manifest["files"]["model.onnx"] = {
        "sha256": sha256_file(path / "model.onnx"),
        "bytes": (path / "model.onnx").stat().st_size,
    }
    manifest.pop(DIGEST_KEY)
    (path / MANIFEST).write_text(dump_manifest(seal(manifest)))


TAMPERED = {
    "offset into the .npy header": (
        {"offset": "0"},
        "reads tables/t_cat_3.npy at bytes [0, ",
    ),
    "offset past the end": ({"offset": "999999999"}, "outside its payload"),
    "length of another size": ({"length": "8"}, "as 8 bytes; its type and shape make"),
    "no length": ({"length": "x"}, "two byte counts are required"),
    "a file not listed for the graph": (
        {"location": "onnx/parity/one_hot/dense.npy"},
        "reads external data from 'onnx/parity/one_hot/dense.npy'; the manifest lists",
    ),
    "a path out of the directory": (
        {"location": "../t_cat_3.npy"},
        "reads external data from '../t_cat_3.npy'",
    ),
    "an absolute path": ({"location": "/etc/passwd"}, "reads external data from '/etc/passwd'"),
    "another table's file": (
        {"location": "tables/t_cat_0.npy"},
        "initializer 'emb.t_cat_3.packed' reads tables/t_cat_0.npy",
    ),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_external_data_is_refused(copy_dir, case) -> None:
    """Before: the graph was held to one data file beside it, and ONNX Runtime was trusted with
    offsets and lengths (an offset into a header read header bytes as table rows)."""
    change, says = TAMPERED[case]
    _rewrite_reference(copy_dir, "emb.t_cat_3.packed", **change)
    problems = verify_artifacts(copy_dir)
    assert len(problems) == 1 and says in problems[0], problems
    with pytest.raises(ArtifactError, match="model.onnx"):
        Predictor(copy_dir, threads=1)


def test_a_graph_reading_an_unlisted_table_file_is_refused(copy_dir) -> None:
    """The manifest lists the files each graph reads: dropping one is caught."""
    manifest = _manifest(copy_dir)
    manifest["onnx"]["graphs"]["model"]["external_data"].remove("tables/t_cat_3.bias.npy")
    manifest.pop(DIGEST_KEY)
    (copy_dir / MANIFEST).write_text(dump_manifest(seal(manifest)))
    (problem,) = verify_artifacts(copy_dir)
    assert "reads external data from 'tables/t_cat_3.bias.npy'" in problem


def test_a_data_file_listed_twice_is_a_manifest_problem(copy_dir) -> None:
    manifest = _manifest(copy_dir)
    listed = manifest["onnx"]["graphs"]["model"]["external_data"]
    listed.append(listed[0])
    manifest.pop(DIGEST_KEY)
    (copy_dir / MANIFEST).write_text(dump_manifest(seal(manifest)))
    (problem,) = verify_artifacts(copy_dir)
    assert "onnx.graphs.model.external_data: lists a file twice" in problem


# ---------------------------------------------------------------- older formats


def test_a_format_2_directory_is_still_served(mixed, copy_dir) -> None:
    """Format 2: ``onnx/model.onnx`` with its own copy of the tables, ``external_data`` a path or
    null."""
    manifest = as_format_2_layout(copy_dir)
    assert manifest["format_version"] == 2
    assert manifest["onnx"]["graphs"]["model"]["file"] == "onnx/model.onnx"
    assert verify_artifacts(copy_dir) == []
    _, _, out, train = mixed
    assert Predictor(copy_dir, threads=1).evaluate(train) == Predictor(out, threads=1).evaluate(
        train
    )
    # a format 2 entry naming a list of files is not format 2
    manifest["onnx"]["graphs"]["model"]["external_data"] = ["tables/t_cat_3.npy"]
    manifest.pop(DIGEST_KEY)
    (copy_dir / MANIFEST).write_text(dump_manifest(seal(manifest)))
    (problem,) = verify_artifacts(copy_dir)
    assert "onnx.graphs.model.external_data: expected a relative path or null" in problem
