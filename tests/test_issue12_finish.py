"""Issue 12, finishing points: one copy of the MLP weights on disk, and a ``verify`` without onnx.

* The three graphs of an artifact directory (``model.onnx``, ``dense_arch.onnx``,
  ``over_arch.onnx``, all at its root) read the float MLP weights, biases and scales in place from
  ``dense/*.npy`` through ONNX external data (payload page-aligned like the tables'), instead of
  each carrying a copy: no file but its own holds a weight's bytes. A plain
  ``InferenceSession(path)`` of each graph matches PyTorch within 1e-5, ``verify --parity`` and
  the Predictor pass, and a split graph pointed outside the directory is refused.
* Directories with the earlier layout (split graphs under ``onnx/`` carrying their own weights)
  are still verified and served: readers take graph paths from the manifest.
* ``verify`` reads the graphs with :mod:`exporters.onnx.proto_reader` (no ``onnx``, no
  ``onnxruntime``, no torch imported); the reader gives what ``onnx`` gives on every graph the
  exporter writes, on protobuf's corner cases (merged messages, oneofs, closed enums, packed and
  unpacked dims, groups) and on hundreds of corrupted copies of a graph.
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
from helpers import make_dlrm, tiny_world
from onnx import TensorProto, helper

from compress import pipeline
from compress.errors import ArtifactError
from compress.io.fingerprint import sha256_file
from compress.io.npy_aligned import PAYLOAD_ALIGNMENT
from exporters.artifacts.directory_checks import read_npy_header
from exporters.artifacts.manifest_integrity import dump_manifest, seal
from exporters.artifacts.manifest_schema import DIGEST_KEY, MANIFEST
from exporters.artifacts.verify import verify_artifacts
from exporters.export import export
from exporters.onnx.model import model_external_tensors
from exporters.onnx.parity import parity_report, verify_parity
from exporters.onnx.proto_reader import ProtoError, read_model_bytes, read_model_file
from exporters.runtime.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5
GRAPHS = ("model", "dense_arch", "over_arch")

#: FP32 MLPs (the ROBE recipes keep them) next to INT8 ones: both kinds of layer are read in place.
RECIPES = {
    "fp32_mlp": """
name = "fp32_mlp"
[[tables]]
match = ["*"]
method = "ptq"
bits = 4
granularity = "row"
""",
    "int8_mlp": """
name = "int8_mlp"
[[tables]]
match = ["*"]
method = "ptq"
bits = 8
granularity = "row"
[mlp]
method = "ptq"
bits = 8
""",
}


@pytest.fixture(scope="module", params=["DLRM", "DLRM_DCN", "DLRM_Projection"])
def exported(request, tmp_path_factory):
    """(result, artifact dir, train .npz) of each DLRM class with FP32 MLPs."""
    tmp = tmp_path_factory.mktemp(f"mlp_once_{request.param}")
    ckpt, train, _, _ = tiny_world(tmp, request.param, n=600)
    (tmp / "recipe.toml").write_text(RECIPES["fp32_mlp"])
    job = pipeline.load(ckpt)
    result = pipeline.compress(job, pipeline.plan(job, tmp / "recipe.toml"))
    return result, export(result, tmp / "out").path, train


@pytest.fixture(scope="module")
def int8_mlp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlp_once_int8")
    job = pipeline.load(make_dlrm(seed=2))
    (tmp / "recipe.toml").write_text(RECIPES["int8_mlp"])
    result = pipeline.compress(job, pipeline.plan(job, tmp / "recipe.toml"))
    return result, export(result, tmp / "out").path


def _manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def _graph_files(manifest: dict) -> dict[str, str]:
    return {name: manifest["onnx"]["graphs"][name]["file"] for name in GRAPHS}


def _float_dense(manifest: dict) -> list[dict]:
    """The ``dense`` entries stored as they are (all but quantized codes)."""
    return [d for d in manifest["dense"] if "layout" not in d]


# ---------------------------------------------------------------- one copy on disk


def test_the_graphs_sit_at_the_root_and_read_every_float_mlp_tensor_in_place(exported) -> None:
    """Before: ``onnx/dense_arch.onnx`` and ``onnx/over_arch.onnx`` each carried the MLP weights,
    and ``model.onnx`` a third copy (the ROBE 10000x Terabyte artifacts: 16.2 MB on disk for
    9.3 MB planned)."""
    _, out, _ = exported
    manifest = _manifest(out)
    assert _graph_files(manifest) == {g: f"{g}.onnx" for g in GRAPHS}
    dense = {d["file"] for d in _float_dense(manifest)}
    weights = {d["file"] for d in _float_dense(manifest) if d["key"].endswith(".weight")}
    assert weights and weights <= dense
    listed = {g: set(manifest["onnx"]["graphs"][g]["external_data"]) for g in GRAPHS}
    assert listed["model"] >= dense  # the full graph reads every one of them (and the tables)
    assert listed["dense_arch"] | listed["over_arch"] == dense  # the split graphs share them
    assert listed["dense_arch"] and listed["over_arch"]
    assert all(f.startswith("dense/dense_arch.") for f in listed["dense_arch"])
    for rel in dense:  # payloads on a page, where the graphs point
        assert read_npy_header(out / rel)[2] == PAYLOAD_ALIGNMENT
    for g in GRAPHS:  # every tensor read in place is the whole payload of its file
        model = onnx.load(str(out / f"{g}.onnx"), load_external_data=False)
        for t in model_external_tensors(model):
            info = {e.key: e.value for e in t.external_data}
            if info["location"].startswith("dense/"):
                size = (out / info["location"]).stat().st_size
                assert int(info["offset"]) == PAYLOAD_ALIGNMENT
                assert int(info["offset"]) + int(info["length"]) == size


def test_no_file_but_its_own_holds_a_weights_bytes(exported) -> None:
    _, out, _ = exported
    manifest = _manifest(out)
    files = [p for p in out.rglob("*") if p.is_file()]
    for entry in _float_dense(manifest):
        if not entry["key"].endswith(".weight"):
            continue
        probe = np.load(out / entry["file"]).tobytes()[:256]
        holders = [p.relative_to(out).as_posix() for p in files if probe in p.read_bytes()]
        assert holders == [entry["file"]], entry["key"]
    graphs = sum((out / f).stat().st_size for f in _graph_files(manifest).values())
    weights = sum(d["bytes"] for d in _float_dense(manifest))
    assert graphs < 60_000 and weights > 1_000  # the graphs: nodes and small constants only


def test_quantized_layers_read_their_scales_and_biases_in_place(int8_mlp) -> None:
    _, out = int8_mlp
    manifest = _manifest(out)
    scales = {d["file"] for d in manifest["dense"] if d["key"].endswith((".scales", ".bias"))}
    assert scales and scales <= set(manifest["onnx"]["graphs"]["model"]["external_data"])
    assert verify_artifacts(out) == []


def test_every_graph_in_a_plain_session_matches_pytorch(exported) -> None:
    result, out, _ = exported
    from exporters.onnx.writer import reference_outputs, sample_multihot

    data = sample_multihot(result.spec, 64, seed=5)
    ref = reference_outputs(result.model, data, result.spec)
    sessions = {
        g: ort.InferenceSession(str(out / f"{g}.onnx"), providers=["CPUExecutionProvider"])
        for g in GRAPHS
    }
    got = sessions["dense_arch"].run(None, {"dense": data.dense})[0]
    np.testing.assert_allclose(got, ref["dense_embedding"], atol=ATOL, rtol=0)
    feeds = {k: ref[k] for k in ("dense_embedding", "sparse_embedding")}
    got = sessions["over_arch"].run(None, feeds)[0]
    np.testing.assert_allclose(got, ref["over_logits"], atol=ATOL, rtol=0)
    report = verify_parity(out)
    assert report["ok"] and report["max_abs_diff"] <= ATOL
    assert verify_artifacts(out) == []


def test_the_predictor_serves_the_directory(exported) -> None:
    _, out, train = exported
    metrics = Predictor(out, threads=1).evaluate(train)
    assert 0.0 <= metrics["auc"] <= 1.0 and metrics["n"] > 0


def test_the_split_graphs_logits_equal_a_stored_transposed_weights(exported) -> None:
    """The ``Transpose`` of the stored ``[out, in]`` weight is folded by ONNX Runtime into the
    weight the graphs used to carry: the same logits, bit for bit."""
    _, out, _ = exported
    model = onnx.load(str(out / "dense_arch.onnx"))  # weights read back into the graph
    old = _with_transposed_weights(model)
    rng = np.random.default_rng(0)
    dense = rng.standard_normal((256, model.graph.input[0].type.tensor_type.shape.dim[1].dim_value))
    feeds = {"dense": dense.astype(np.float32)}
    new_out = ort.InferenceSession(str(out / "dense_arch.onnx")).run(None, feeds)[0]
    old_out = ort.InferenceSession(old.SerializeToString()).run(None, feeds)[0]
    assert np.array_equal(new_out, old_out)


def _with_transposed_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` as the exporter wrote it before: each ``Transpose`` of a weight initializer
    replaced by the transposed weight itself."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    for node in model.graph.node:
        if node.op_type == "Transpose" and node.input[0] in inits:
            weight = numpy_helper.to_array(inits[node.input[0]])
            out.graph.initializer.append(
                numpy_helper.from_array(np.ascontiguousarray(weight.T), node.output[0])
            )
            continue
        out.graph.node.append(node)
    return out


# ---------------------------------------------------------------- tampering, older layouts


def _reseal(path: Path, manifest: dict) -> None:
    manifest.pop(DIGEST_KEY, None)
    (path / MANIFEST).write_text(dump_manifest(seal(manifest)))


def _refresh(path: Path, manifest: dict, rel: str) -> None:
    manifest["files"][rel] = {
        "sha256": sha256_file(path / rel),
        "bytes": (path / rel).stat().st_size,
    }


@pytest.fixture
def copy_dir(exported, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(exported[1], out)
    return out


@pytest.mark.parametrize(
    "location,says",
    [
        ("../dense/x.npy", "reads external data from '../dense/x.npy'"),
        ("dense/../../outside.npy", "reads external data from 'dense/../../outside.npy'"),
        ("/etc/passwd", "reads external data from '/etc/passwd'"),
        ("onnx/parity/one_hot/dense.npy", "the manifest lists"),
    ],
)
def test_a_split_graph_reading_outside_its_listed_files_is_refused(copy_dir, location, says):
    """A weight of ``over_arch.onnx`` pointed out of the artifact directory (or at a file the
    manifest does not list for it), manifest resealed: ``verify`` and the Predictor refuse it."""
    path = copy_dir / "over_arch.onnx"
    model = onnx.load(str(path), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL)
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save(model, str(path))
    manifest = _manifest(copy_dir)
    _refresh(copy_dir, manifest, "over_arch.onnx")
    _reseal(copy_dir, manifest)
    problems = verify_artifacts(copy_dir)
    assert len(problems) == 1 and says in problems[0] and str(path) in problems[0], problems
    with pytest.raises(ArtifactError, match="over_arch.onnx"):
        Predictor(copy_dir, threads=1)


def test_the_earlier_layout_with_split_graphs_under_onnx_is_still_read(exported, copy_dir):
    """Format 3 as first written: ``onnx/dense_arch.onnx`` and ``onnx/over_arch.onnx`` carrying
    their own weights, ``dense/`` files with numpy's own header."""
    _, _, train = exported
    manifest = _manifest(copy_dir)
    for name in ("dense_arch", "over_arch"):
        entry = manifest["onnx"]["graphs"][name]
        model = onnx.load(str(copy_dir / entry["file"]))  # weights back inside the graph
        (copy_dir / entry["file"]).unlink()
        del manifest["files"][entry["file"]]
        entry["file"], entry["external_data"] = f"onnx/{name}.onnx", []
        onnx.save(model, str(copy_dir / entry["file"]))
        _refresh(copy_dir, manifest, entry["file"])
    _reseal(copy_dir, manifest)
    assert verify_artifacts(copy_dir) == []
    assert verify_parity(copy_dir)["ok"]
    assert Predictor(copy_dir, threads=1).evaluate(train)["n"] > 0


# ---------------------------------------------------------------- verify without onnx


def test_verify_imports_neither_onnx_nor_onnxruntime_nor_torch(exported) -> None:
    """Before: ``verify`` imported onnx (about half a second, ml_dtypes) and, through the graph
    spec, onnxruntime."""
    _, out, _ = exported
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "compress", "verify", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("ok: "), proc.stderr[-2000:]
    imported = _imported(proc.stderr)
    assert "numpy" in imported and "exporters" in imported  # the probe sees imports
    assert not imported & {"onnx", "onnxruntime", "torch", "torchrec", "ml_dtypes", "google"}


def _text(value: str | bytes) -> str:
    """protobuf gives a string field that is not UTF-8 as bytes; the reader as the same bytes
    decoded with ``surrogateescape`` (either way it names no file the manifest lists)."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


PREDICT = """
import sys
import numpy as np
from exporters import Predictor
p = Predictor(sys.argv[1], threads=1)
n = 3
dense = np.zeros((n, p.spec.dense_in_features), np.float32)
values = {f: np.zeros(n, np.int64) for f in p.feature_names}
lengths = {f: np.ones(n, np.int64) for f in p.feature_names}
print(p.predict_tensors(dense, values, lengths).shape)
"""


def test_the_predictor_imports_onnxruntime_but_not_onnx(exported) -> None:
    """Before: opening the directory read its graphs with onnx (and ml_dtypes)."""
    _, out, _ = exported
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", PREDICT, str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = _imported(proc.stderr)
    assert "onnxruntime" in imported
    assert not imported & {"onnx", "ml_dtypes", "torch", "torchrec"}


def _imported(stderr: str) -> set[str]:
    """Top-level packages a ``python -X importtime`` run imported (from its stderr)."""
    return {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def _onnx_view(data: bytes) -> tuple:
    """What the reader must give, read with onnx: declared inputs and outputs, external tensors."""
    model = onnx.ModelProto.FromString(data)

    def decl(v: onnx.ValueInfoProto) -> tuple:
        t = v.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else _text(d.dim_param) for d in t.shape.dim
        )
        return _text(v.name), t.elem_type, dims

    tensors = tuple(
        (
            _text(t.name),
            t.data_type,
            tuple(t.dims),
            {_text(e.key): _text(e.value) for e in t.external_data},
        )
        for t in model_external_tensors(model)
    )
    return (
        tuple(decl(v) for v in model.graph.input),
        tuple(decl(v) for v in model.graph.output),
        tensors,
    )


def _reader_view(data: bytes) -> tuple:
    m = read_model_bytes(data)
    return (
        tuple((v.name, v.elem_type, v.dims) for v in m.inputs),
        tuple((v.name, v.elem_type, v.dims) for v in m.outputs),
        tuple((t.name, t.data_type, t.dims, t.info) for t in m.external_tensors),
    )


def test_the_reader_reads_every_exported_graph_as_onnx_does(exported, int8_mlp) -> None:
    for out in (exported[1], int8_mlp[1]):
        for rel in _graph_files(_manifest(out)).values():
            data = (out / rel).read_bytes()
            view = _reader_view(data)
            assert view == _onnx_view(data)
            assert view[2] and view[0]  # it did see external tensors and inputs
        assert read_model_file(out / "model.onnx").inputs[0].dims == ("batch", 5)


def _external(name: str, location: str, dims=(2, 3), data_type=TensorProto.FLOAT) -> TensorProto:
    t = TensorProto(name=name, data_type=data_type, dims=list(dims))
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    t.external_data.add(key="offset", value="4096")
    return t


def _corner_model() -> onnx.ModelProto:
    """External tensors everywhere ORT looks: initializer, sparse initializer, a Constant's
    ``value`` and ``sparse_value``, an If's branch, a model-local function; non-tensor and
    symbolic graph inputs."""
    inner = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=_external("in_if", "if.bin"))],
        "branch",
        [],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 3])],
    )
    sparse_value = helper.make_sparse_tensor(
        _external("sv_values", "sv.bin", dims=(2,)), _external("sv_idx", "si.bin", (2,), 7), [4]
    )
    nodes = [
        helper.make_node("Constant", [], ["k"], value=_external("const", "const.bin")),
        helper.make_node("Constant", [], ["s"], sparse_value=sparse_value),
        helper.make_node("If", ["cond"], ["y"], then_branch=inner, else_branch=inner),
        helper.make_node("F", ["x"], ["z"], domain="local"),
    ]
    graph = helper.make_graph(
        nodes,
        "corner",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, None]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_value_info(
                "seq", helper.make_sequence_type_proto(helper.make_tensor_type_proto(7, None))
            ),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [_external("init", "tables/t.npy"), helper.make_tensor("inline", 1, [1], [1.0])],
        sparse_initializer=[
            helper.make_sparse_tensor(
                _external("sp_values", "sp.bin", (2,)), _external("sp_idx", "sp.bin", (2,), 7), [9]
            )
        ],
    )
    function = helper.make_function(
        "local",
        "F",
        ["x"],
        ["z"],
        [helper.make_node("Constant", [], ["z"], value=_external("in_fn", "fn.bin"))],
        [helper.make_opsetid("", 21)],
    )
    return helper.make_model(graph, functions=[function])


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = b""
    while True:
        byte, value = value & 0x7F, value >> 7
        out += bytes([byte | (0x80 if value else 0)])
        if not value:
            return out


def test_the_reader_finds_external_tensors_wherever_onnx_runtime_reads_them() -> None:
    data = _corner_model().SerializeToString()
    view = _reader_view(data)
    assert view == _onnx_view(data)
    names = [t[0] for t in view[2]]
    assert sorted(names) == sorted(
        ["init", "sp_values", "sp_idx", "const", "sv_values", "sv_idx", "in_if", "in_if", "in_fn"]
    )
    assert view[0][0] == ("x", TensorProto.FLOAT, ("batch", 3, ""))
    assert view[0][2] == ("seq", 0, ())  # not a tensor type


def test_the_reader_follows_protobufs_merge_oneof_and_enum_rules() -> None:
    """Crafted encodings ONNX Runtime's protobuf parser reads in one way only."""
    base = _corner_model()
    data = base.SerializeToString()
    graph = base.graph.SerializeToString()
    cases = []
    # the graph field twice: the two are merged (initializers of both)
    extra = onnx.GraphProto(initializer=[_external("second", "two.bin")]).SerializeToString()
    cases.append(data + _field(7, extra))
    # data_location EXTERNAL then DEFAULT: inline; then a value proto2 does not define: ignored
    t = _external("loc", "x.bin").SerializeToString()
    inline_again = t + bytes([14 << 3, 0])
    undefined = t + bytes([14 << 3, 5])
    for tensor in (inline_again, undefined):
        cases.append(data + _field(7, _field(5, tensor)))
    # a key given twice: the last wins; dims not packed
    t = _external("twice", "a.bin", dims=(3,))
    t.external_data.add(key="location", value="b.bin")
    unpacked = t.SerializeToString().replace(bytes([10, 1, 3]), bytes([8, 3]))
    cases.append(data + _field(7, _field(5, unpacked)))
    # a tensor-typed input later given a sequence type (the oneof's last member wins), and a
    # dim set as a value then as a name
    seq = onnx.TypeProto(sequence_type=onnx.TypeProto.Sequence()).SerializeToString()
    vi = helper.make_tensor_value_info("v", TensorProto.FLOAT, [4]).SerializeToString()
    cases.append(data + _field(7, _field(11, vi + _field(2, seq))))
    dim = onnx.TensorShapeProto.Dimension(dim_value=4).SerializeToString() + _field(2, b"n")
    shape = _field(1, dim)
    vi2 = helper.make_tensor_value_info("w", TensorProto.FLOAT, None).SerializeToString()
    cases.append(data + _field(7, _field(12, vi2 + _field(2, _field(1, _field(2, shape))))))
    # an unknown group field (obsolete encoding) is skipped
    group = _varint((30 << 3) | 3) + bytes([8, 1]) + _varint((30 << 3) | 4)
    cases.append(group + data)
    assert graph  # (the graph's own bytes stayed valid)
    for case in cases:
        assert _reader_view(case) == _onnx_view(case)
    seen = _reader_view(cases[0])[2]
    assert "second" in [t[0] for t in seen]
    assert "loc" not in [t[0] for t in _reader_view(cases[1])[2]]
    assert "loc" in [t[0] for t in _reader_view(cases[2])[2]]


@pytest.mark.parametrize(
    "data",
    [
        b"\x3a\x05\x0a\x03ab",  # a graph field longer than the file
        b"\x3a\x02\xff\xff",  # a truncated varint inside the graph
        b"\x3e\x00",  # wire type 6
        b"\x00\x01",  # field number 0
        bytes([(9 << 3) | 3, 8, 1]),  # a group never closed
        bytes([(9 << 3) | 4]),  # an end-group tag alone
    ],
)
def test_the_reader_refuses_what_protobuf_refuses(data: bytes) -> None:
    with pytest.raises(Exception):  # noqa: B017,PT011 - onnx raises a protobuf DecodeError
        onnx.ModelProto.FromString(data)
    with pytest.raises(ProtoError):
        read_model_bytes(data)


def test_the_reader_agrees_with_onnx_on_corrupted_graphs(int8_mlp) -> None:
    """400 copies of ``model.onnx`` with a few bytes changed: wherever onnx still parses the file,
    the reader gives the same declarations and external tensors, never an error (a longer run
    with insertions and deletions too, 4,500 copies of three graphs: the same)."""
    data = (int8_mlp[1] / "model.onnx").read_bytes()
    rng = np.random.default_rng(7)
    parsed = 0
    for _ in range(400):
        mutated = bytearray(data)
        for pos in rng.integers(0, len(data), rng.integers(1, 4)):
            mutated[pos] = rng.integers(0, 256)
        try:
            expected = _onnx_view(bytes(mutated))
        except Exception:  # noqa: BLE001 - protobuf's DecodeError, onnx's own errors
            continue
        parsed += 1
        assert _reader_view(bytes(mutated)) == expected
    assert parsed > 40


def test_verify_reports_an_unreadable_graph_in_one_line(copy_dir) -> None:
    path = copy_dir / "dense_arch.onnx"
    path.write_bytes(b"\x3a\x05\x0a\x03ab")
    manifest = _manifest(copy_dir)
    _refresh(copy_dir, manifest, "dense_arch.onnx")
    _reseal(copy_dir, manifest)
    (problem,) = verify_artifacts(copy_dir)
    assert problem.startswith(f"{path}: not a readable ONNX model (")


def test_the_full_graph_serves_the_weights_in_dense(copy_dir) -> None:
    """The graphs read the very files the manifest lists: change an over-arch weight (and reseal)
    and the served logits change with it, so nothing else holds a copy. Before, ``model.onnx``
    carried its own copy and the stored logits were still reproduced."""
    manifest = _manifest(copy_dir)
    assert verify_parity(copy_dir)["max_abs_diff"] <= ATOL
    entry = next(
        d
        for d in _float_dense(manifest)
        if d["key"].startswith("over_arch") and "weight" in d["key"]
    )
    weights = np.load(copy_dir / entry["file"], mmap_mode="r+")
    weights += np.float32(0.5)
    weights.flush()
    del weights
    _refresh(copy_dir, manifest, entry["file"])
    _reseal(copy_dir, manifest)
    assert verify_artifacts(copy_dir) == []
    report = parity_report(copy_dir)
    assert not report["ok"] and report["max_abs_diff"] > 1e-3
