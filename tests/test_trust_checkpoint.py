"""Checkpoints are read right or refused: the DCP metadata unpickler runs nothing, the table order of
a distributed checkpoint is recovered or asked for, and bad weights or keys are one-line errors."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import DIM, make_dlrm, random_inputs
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from compress.cli.main import main
from compress.errors import CheckpointError, ModelConfigError
from compress.io import dcp as dcp_module
from compress.io import model as model_module
from compress.io.checkpoint import load_tensors, open_checkpoint
from compress.io.model import load_model, read_spec
from compress.io.table_stream import chunking

META_MODULE = "torch.distributed.checkpoint.metadata"
TABLE = "sparse_arch.embedding_bag_collection.embedding_bags.{}.weight"


# --------------------------------------------------------------------------------------------
# helpers


def _global_call(module: str, name: str, *args) -> bytes:
    """A protocol-4 pickle that resolves ``module``/``name`` (STACK_GLOBAL) and calls it on
    ``args``: what a crafted DCP ``.metadata`` holds."""
    out = io.BytesIO()
    out.write(pickle.PROTO + b"\x04")
    for text in (module, name):
        raw = text.encode()
        out.write(pickle.SHORT_BINUNICODE + bytes([len(raw)]) + raw)
    out.write(pickle.STACK_GLOBAL)
    out.write(pickle.dumps(args, protocol=2)[2:-1])  # the args tuple, without PROTO and STOP
    out.write(pickle.REDUCE + pickle.STOP)
    return out.getvalue()


def _dcp_dir_with(tmp_path: Path, payload: bytes) -> Path:
    d = tmp_path / "dcp"
    d.mkdir()
    (d / ".metadata").write_bytes(payload)
    return d


def _run_cli(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()  # drop what the test itself printed (DCP's warnings when saving)
    rc = main(args)
    return rc, capsys.readouterr().err


def _assert_one_line_refusal(rc: int, err: str, where: Path) -> None:
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(where) in lines[0] and "refused" in lines[0]
    assert "Traceback" not in err


def _zeta_alpha_mid(seed: int = 0) -> DLRM:
    """Tables declared in an order that is neither sorted nor natural."""
    torch.manual_seed(seed)
    configs = [
        EmbeddingBagConfig(name=f"t_{n}", embedding_dim=DIM, num_embeddings=r, feature_names=[n])
        for n, r in (("zeta", 11), ("alpha", 23), ("mid", 37))
    ]
    return DLRM(
        embedding_bag_collection=EmbeddingBagCollection(tables=configs),
        dense_in_features=5,
        dense_arch_layer_sizes=[16, DIM],
        over_arch_layer_sizes=[12, 1],
    )


def _same_logits(original: torch.nn.Module, loaded: torch.nn.Module) -> bool:
    original.eval()
    dense, kjt = random_inputs(original)
    with torch.no_grad():
        return torch.equal(original(dense, kjt), loaded(dense, kjt))


def _as_if_rank1_wrote(ckpt_dir: Path, table: str) -> None:
    """Rewrite a one-rank DCP directory as a two-rank save leaves it when rank 1 wrote ``table``:
    its data in ``__1_0.distcp`` and its metadata entry after everything rank 0 wrote."""
    meta = ckpt_dir / ".metadata"
    md = pickle.loads(meta.read_bytes())
    key = TABLE.format(table)
    shutil.copy(ckpt_dir / "__0_0.distcp", ckpt_dir / "__1_0.distcp")
    for index, info in md.storage_data.items():
        if index.fqn == key:
            info.relative_path = "__1_0.distcp"
    md.state_dict_metadata[key] = md.state_dict_metadata.pop(key)
    meta.write_bytes(pickle.dumps(md))


# --------------------------------------------------------------------------------------------
# 1. The .metadata unpickler admits DCP metadata and nothing else


@pytest.fixture
def evil_library(tmp_path):
    """A shared library whose constructor creates a marker file, or None without a C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    marker = tmp_path / "library_ran"
    if cc is None:
        return None, marker
    src = tmp_path / "evil.c"
    src.write_text(
        "#include <stdio.h>\n"
        "__attribute__((constructor)) static void run(void) {\n"
        f'  FILE *f = fopen("{marker}", "w"); if (f) fclose(f);\n'
        "}\n"
    )
    lib = tmp_path / "libevil.so"
    built = subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(src)], capture_output=True)
    return (lib if built.returncode == 0 else None), marker


def test_shared_library_exploit_is_refused_before_loading(tmp_path, evil_library, capsys):
    lib, marker = evil_library
    target = lib if lib is not None else tmp_path / "missing.so"
    payload = _global_call(META_MODULE, "torch.ctypes.CDLL", str(target))
    if lib is not None:  # the payload is live: an ordinary unpickler loads the library
        pickle.loads(payload)
        assert marker.exists()
        marker.unlink()
    d = _dcp_dir_with(tmp_path, payload)
    rc, err = _run_cli(["inspect", str(d)], capsys)
    _assert_one_line_refusal(rc, err, d)
    assert "torch.ctypes.CDLL" in err
    assert not marker.exists()


def test_file_truncation_exploit_is_refused(tmp_path, capsys):
    scratch = tmp_path / "scratch.txt"
    scratch.write_text("precious")
    pickle.loads(_global_call(META_MODULE, "torch.storage.io.FileIO", str(scratch), "w"))
    assert scratch.read_text() == ""  # the payload is live
    target = tmp_path / "target.txt"
    target.write_text("precious")
    d = _dcp_dir_with(
        tmp_path, _global_call(META_MODULE, "torch.storage.io.FileIO", str(target), "w")
    )
    rc, err = _run_cli(["inspect", str(d)], capsys)
    _assert_one_line_refusal(rc, err, d)
    assert target.read_text() == "precious"


def _allowed_modules() -> list[str]:
    return sorted({m for m, _ in dcp_module._ALLOWED_GLOBALS})


@pytest.mark.parametrize(
    "module,name",
    [
        ("os", "system"),
        ("posix", "system"),
        ("builtins", "eval"),
        ("builtins", "exec"),
        ("builtins", "getattr"),
        ("subprocess", "Popen"),
        ("torch", "load"),
        ("importlib", "import_module"),
        ("torch", "serialization.os.system"),
    ],
)
def test_code_running_names_are_refused(tmp_path, capsys, monkeypatch, module, name):
    marker = tmp_path / "ran"
    # every callee, had it been called, would leave the marker
    (tmp_path / "marker_module.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = {
        "eval": (f"open({str(marker)!r}, 'w').close()",),
        "exec": (f"open({str(marker)!r}, 'w').close()",),
        "Popen": (["touch", str(marker)],),
        "import_module": ("marker_module",),
        "getattr": ("text", "upper"),
        "load": (str(marker),),
    }.get(name, (f"touch {marker}",))
    d = _dcp_dir_with(tmp_path, _global_call(module, name, *args))
    rc, err = _run_cli(["inspect", str(d)], capsys)
    _assert_one_line_refusal(rc, err, d)
    assert not marker.exists()
    assert "marker_module" not in sys.modules


def _dotted_file_io(module: str) -> str | None:
    """A dotted name that reaches ``io.FileIO`` through ``module``'s globals, if there is one."""
    import importlib

    try:
        root = importlib.import_module(module)
    except ImportError:
        return None
    for name in ("io.FileIO", "torch.storage.io.FileIO", "storage.io.FileIO"):
        obj = root
        try:
            for part in name.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return name if obj is io.FileIO else None
    return None


@pytest.mark.parametrize("module", _allowed_modules())
def test_dotted_names_through_allowed_modules_are_refused(tmp_path, capsys, module):
    target = tmp_path / "target.txt"
    target.write_text("precious")
    name = _dotted_file_io(module) or "os.system"
    args = (str(target), "w") if name != "os.system" else (f"truncate -s 0 {target}",)
    d = _dcp_dir_with(tmp_path, _global_call(module, name, *args))
    rc, err = _run_cli(["inspect", str(d)], capsys)
    _assert_one_line_refusal(rc, err, d)
    assert target.read_text() == "precious"


def test_build_on_a_class_is_refused(tmp_path):
    # GLOBAL Metadata; BUILD (None, {"poisoned": 1}) would set an attribute on the class itself
    state = pickle.dumps((None, {"poisoned": 1}), protocol=4)[2:-1]
    payload = (
        pickle.PROTO
        + b"\x04"
        + pickle.GLOBAL
        + f"{META_MODULE}\nMetadata\n".encode()
        + state
        + pickle.BUILD
        + pickle.STOP
    )
    d = _dcp_dir_with(tmp_path, payload)
    with pytest.raises(CheckpointError, match="refused"):
        open_checkpoint(d)
    assert not hasattr(Metadata, "poisoned")


def test_hostile_strings_stay_on_one_line(tmp_path, capsys):
    d = _dcp_dir_with(tmp_path, _global_call("os\nerror: fake", "system", "true"))
    rc, err = _run_cli(["inspect", str(d)], capsys)
    _assert_one_line_refusal(rc, err, d)


@pytest.mark.parametrize("model_class", ["DLRM", "DLRM_DCN", "DLRM_Projection"])
@pytest.mark.parametrize("form", ["plain", "train", "bf16", "container"])
def test_real_dcp_checkpoints_still_load(tmp_path, model_class, form):
    from torchrec.models.dlrm import DLRMTrain

    model = make_dlrm(model_class)
    state = {
        "plain": model.state_dict(),
        "train": DLRMTrain(model).state_dict(),
        "bf16": {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()},
        "container": {"model": model.state_dict(), "epoch": 3, "note": "x"},
    }[form]
    dcp.save(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    ckpt = open_checkpoint(tmp_path / "dcp")
    assert ckpt.format == ("dcp:model" if form == "container" else "dcp")
    loaded = load_model(tmp_path / "dcp")
    if form == "bf16":
        model.load_state_dict({k: v.float() for k, v in state.items()})
    assert _same_logits(model, loaded.module)


def test_metadata_pointing_outside_the_directory_is_refused(tmp_path):
    dcp.save(make_dlrm().state_dict(), checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    meta = tmp_path / "dcp" / ".metadata"
    md = pickle.loads(meta.read_bytes())
    next(iter(md.storage_data.values())).relative_path = "../../etc/passwd"
    meta.write_bytes(pickle.dumps(md))
    with pytest.raises(CheckpointError, match="not a plain file name"):
        open_checkpoint(tmp_path / "dcp")


def test_metadata_with_missing_chunks_is_refused(tmp_path):
    dcp.save(make_dlrm().state_dict(), checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    meta = tmp_path / "dcp" / ".metadata"
    md = pickle.loads(meta.read_bytes())
    md.state_dict_metadata[TABLE.format("t_cat_1")].chunks.clear()
    meta.write_bytes(pickle.dumps(md))
    with pytest.raises(CheckpointError, match=r"t_cat_1.*chunks hold 0 elements"):
        open_checkpoint(tmp_path / "dcp")


def test_corrupt_dcp_data_is_one_line(tmp_path, capsys):
    dcp.save(make_dlrm().state_dict(), checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    data = tmp_path / "dcp" / "__0_0.distcp"
    data.write_bytes(b"\0" * data.stat().st_size)  # same size, garbage
    rc, err = _run_cli(
        ["eval", str(tmp_path / "dcp"), "--data", str(tmp_path / "none.npz")], capsys
    )
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot read distributed checkpoint data" in err and str(tmp_path / "dcp") in err
    (tmp_path / "dcp" / ".metadata").write_bytes((tmp_path / "dcp" / ".metadata").read_bytes()[:50])
    with pytest.raises(CheckpointError, match="corrupt DCP metadata"):
        open_checkpoint(tmp_path / "dcp")


def test_memory_error_is_a_bug_not_bad_input(tmp_path, monkeypatch):
    dcp.save(make_dlrm().state_dict(), checkpoint_id=str(tmp_path / "dcp"), no_dist=True)

    def no_memory(*args, **kwargs):
        raise MemoryError

    with monkeypatch.context() as m:
        m.setattr(dcp_module._RestrictedUnpickler, "load", no_memory)
        with pytest.raises(MemoryError):
            open_checkpoint(tmp_path / "dcp")
    ckpt = open_checkpoint(tmp_path / "dcp")
    monkeypatch.setattr(FileSystemReader, "read_data", no_memory)
    with pytest.raises(MemoryError):  # DCP wraps it in a CheckpointException; it is unwrapped
        load_tensors(ckpt)


def test_unreadable_dcp_data_file_is_bad_input(tmp_path, monkeypatch):
    dcp.save(make_dlrm().state_dict(), checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    ckpt = open_checkpoint(tmp_path / "dcp")

    def io_error(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(FileSystemReader, "read_data", io_error)
    with pytest.raises(CheckpointError, match="Permission denied"):
        load_tensors(ckpt)


# --------------------------------------------------------------------------------------------
# 4. Table order of a DCP directory


def test_dcp_keeps_the_declared_table_order(tmp_path):
    model = _zeta_alpha_mid()
    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    loaded = load_model(tmp_path / "dcp")
    assert [t.name for t in loaded.spec.tables] == ["t_zeta", "t_alpha", "t_mid"]
    assert _same_logits(model, loaded.module)


def test_multi_rank_dcp_without_config_is_refused_then_read_with_one(tmp_path, capsys):
    model = _zeta_alpha_mid()
    d = tmp_path / "dcp"
    dcp.save(model.state_dict(), checkpoint_id=str(d), no_dist=True)
    _as_if_rank1_wrote(d, "t_alpha")
    assert [t.name for t in read_spec(d, lenient=True)[1].tables] == ["t_zeta", "t_mid", "t_alpha"]

    rc, err = _run_cli(["eval", str(d), "--data", str(tmp_path / "x.npz")], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "--write-config" in err and "does not record the order" in err
    assert f"looked for {d / 'model_config.json'}, {tmp_path / 'model_config.json'}" in err

    written = tmp_path / "template.json"
    rc, err = _run_cli(["inspect", str(d), "--write-config", str(written)], capsys)
    assert rc == 0 and "edit it before use" in err
    config = json.loads(written.read_text())
    assert [t["name"] for t in config["tables"]] == ["t_zeta", "t_mid", "t_alpha"]
    rc, err = _run_cli(["inspect", str(d), "--write-config", str(written)], capsys)
    assert rc == 2 and "already exists" in err

    config["tables"] = [config["tables"][i] for i in (0, 2, 1)]  # the declared order
    (tmp_path / "model_config.json").write_text(json.dumps(config))  # beside the directory
    assert _same_logits(model, load_model(d).module)
    shutil.move(tmp_path / "model_config.json", d / "model_config.json")  # inside it
    assert _same_logits(model, load_model(d).module)


_TWO_RANK_SAVE = r"""
import sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
rank, root = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=2)
dcp.save(torch.load(f"{root}/state.pt"), checkpoint_id=f"{root}/dcp")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_real_two_rank_dcp_order_is_not_trusted(tmp_path):
    """Two gloo ranks save the same (replicated) state dict; DCP spreads the items over both ranks,
    so its metadata lists rank 1's tables last. The reader must not take that order."""
    model = _zeta_alpha_mid()
    torch.save(model.state_dict(), tmp_path / "state.pt")
    procs = [
        subprocess.Popen([sys.executable, "-c", _TWO_RANK_SAVE, str(r), str(tmp_path)])
        for r in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    ckpt = open_checkpoint(tmp_path / "dcp")
    assert ckpt.unordered_keys  # rank 1 wrote some items
    if not any(k.startswith("sparse_arch.") for k in ckpt.unordered_keys):
        pytest.skip("DCP put every table on rank 0 this time; nothing to check")
    with pytest.raises(ModelConfigError, match="does not record the order"):
        load_model(tmp_path / "dcp")
    config = {"tables": [{"name": n} for n in ("t_zeta", "t_alpha", "t_mid")]}
    (tmp_path / "dcp" / "model_config.json").write_text(json.dumps(config))
    assert _same_logits(model, load_model(tmp_path / "dcp").module)


def test_single_table_dcp_needs_no_order(tmp_path):
    model = make_dlrm(rows=(30,))
    d = tmp_path / "dcp"
    dcp.save(model.state_dict(), checkpoint_id=str(d), no_dist=True)
    _as_if_rank1_wrote(d, "t_cat_0")
    assert _same_logits(model, load_model(d).module)


def test_write_config_from_a_file_checkpoint_round_trips(tmp_path, capsys):
    model = make_dlrm(shared_feature=True)
    torch.save(model.state_dict(), tmp_path / "c.pt")
    out = tmp_path / "cfg.json"
    rc, err = _run_cli(["inspect", str(tmp_path / "c.pt"), "--write-config", str(out)], capsys)
    assert rc == 0 and "some tables serve several features" in err  # the template needs editing
    config = json.loads(out.read_text())
    config["tables"][-1]["feature_names"] = ["cat_a", "cat_b"]
    out.write_text(json.dumps(config))
    assert _same_logits(model, load_model(tmp_path / "c.pt", out).module)


# --------------------------------------------------------------------------------------------
# 4. Weights: dtypes, NaN/inf, keys


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("form", ["file", "dcp"])
def test_half_precision_checkpoints_are_read(tmp_path, capsys, dtype, form):
    model = make_dlrm("DLRM_DCN")
    half = {k: v.to(dtype) for k, v in model.state_dict().items()}
    path = tmp_path / ("c.pt" if form == "file" else "dcp")
    if form == "file":
        torch.save(half, path)
    else:
        dcp.save(half, checkpoint_id=str(path), no_dist=True)
    loaded = load_model(path)
    assert loaded.spec.tables[0].dtype == str(dtype).removeprefix("torch.")  # sizes as stored
    model.load_state_dict({k: v.float() for k, v in half.items()})
    assert _same_logits(model, loaded.module)
    rc, err = _run_cli(["plan", "--recipe", "int4_ptq", str(path)], capsys)
    assert rc == 0, err


def test_other_dtypes_are_refused_naming_the_table(tmp_path, capsys):
    state = make_dlrm().state_dict()
    state[TABLE.format("t_cat_2")] = state[TABLE.format("t_cat_2")].double()
    torch.save(state, tmp_path / "c.pt")
    rc, err = _run_cli(["inspect", str(tmp_path / "c.pt")], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "table t_cat_2 has dtype float64" in err


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_name_the_table_and_row(tmp_path, capsys, bad):
    state = make_dlrm().state_dict()
    state[TABLE.format("t_cat_2")][123, 5] = bad
    torch.save(state, tmp_path / "c.pt")
    rc, err = _run_cli(["eval", str(tmp_path / "c.pt"), "--data", str(tmp_path / "x.npz")], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "table t_cat_2 has a NaN or inf weight (row 123)" in err


def test_non_finite_dense_weight_names_the_key(tmp_path):
    model = make_dlrm()
    state = {k: v.half() for k, v in model.state_dict().items()}
    state["over_arch.model.1.bias"][0] = float("inf")
    dcp.save(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    with pytest.raises(CheckpointError, match=r"over_arch\.model\.1\.bias has a NaN or inf"):
        load_model(tmp_path / "dcp")


def test_finite_scan_is_chunked_and_keeps_float32_maps():
    with chunking(8):  # 64 values a chunk
        _check_finite_scan()


def _check_finite_scan():
    t = torch.zeros(100, 8)
    assert model_module.float32_checked(t, "table t", "src") is t  # no copy of float32
    t[77, 7] = float("nan")  # in a later chunk, last column
    with pytest.raises(CheckpointError, match=r"table t has a NaN or inf weight \(row 77\)"):
        model_module.float32_checked(t, "table t", "src")
    big = torch.full((100, 8), 3e38)  # finite, but a chunk's sum overflows to inf
    assert model_module.float32_checked(big, "table big", "src") is big
    h = torch.arange(800, dtype=torch.float16).reshape(100, 8)
    out = model_module.float32_checked(h, "table h", "src")
    assert out.dtype == torch.float32 and torch.equal(out, h.float())


def test_missing_and_extra_keys_are_named(tmp_path, capsys):
    state = make_dlrm().state_dict()
    del state["over_arch.model.1.bias"]
    state[TABLE.format("t_cat_0").replace(".weight", ".momentum")] = torch.zeros(7, DIM)
    state["model_version"] = torch.zeros(1)
    torch.save(state, tmp_path / "c.pt")
    rc, err = _run_cli(["eval", str(tmp_path / "c.pt"), "--data", str(tmp_path / "x.npz")], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "missing 1 key(s): over_arch.model.1.bias" in err
    assert (
        "extra 2 key(s): sparse_arch.embedding_bag_collection.embedding_bags.t_cat_0.momentum, "
        "model_version" in err
    )


def test_wrong_bias_shape_is_named(tmp_path):
    state = make_dlrm().state_dict()
    state["dense_arch.model._mlp.0._linear.bias"] = torch.zeros(15)
    torch.save(state, tmp_path / "c.pt")
    with pytest.raises(
        CheckpointError, match=r"dense_arch\.model\._mlp\.0\._linear\.bias has shape \(15,\)"
    ):
        load_model(tmp_path / "c.pt")


def test_a_huge_length_field_in_the_metadata_is_corrupt_not_a_memory_error(tmp_path, capsys):
    """BINBYTES8 claiming 2^62 bytes in a 9-byte file: read as what the file holds, never
    allocated (a file read of that length raised MemoryError)."""
    d = _dcp_dir_with(tmp_path, b"\x8e" + (2**62).to_bytes(8, "little") + b".")
    rc, err = _run_cli(["inspect", str(d)], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert ".metadata" in err and "Traceback" not in err


def test_a_data_file_symlinked_out_of_the_directory_is_refused(tmp_path):
    dcp.save(make_dlrm().state_dict(), checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    data = next((tmp_path / "dcp").glob("*.distcp"))
    elsewhere = tmp_path / "elsewhere.distcp"
    shutil.move(data, elsewhere)
    data.symlink_to(elsewhere)
    with pytest.raises(CheckpointError, match="symbolic link"):
        load_model(tmp_path / "dcp")
