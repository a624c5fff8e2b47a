"""Checkpoint-reading findings of the third attacker review.

1. A dict key that is a tuple nested 200,000 deep, in a DCP ``.metadata`` pickle or a ``.pt``
   file's ``data.pkl``, crashed Python (segfault) while unpickling: refused before unpickling.
2. A ``.pt`` tensor saved as ``randn(1, 8).expand(2e8, 8)`` (18 KB on disk) claimed a 5.96 GiB
   table and then allocated it: tensors whose strides overlap or whose storage is too short are
   refused by key, before anything is allocated.
3. A DCP ``.metadata`` whose ``storage_meta`` is an int passed ``inspect`` and, when loaded,
   printed two DCP-logged tracebacks before the one-line error: every metadata field is
   type-checked, and DCP's own tracebacks are not logged when the user gets one line instead.
"""

from __future__ import annotations

import io
import logging
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import make_dlrm

from compress.cli.main import main
from compress.errors import CheckpointError
from compress.io.checkpoint import load_tensors, open_checkpoint
from compress.io.model import load_model
from compress.io.pickle_depth import MAX_PICKLE_DEPTH

ROOT = Path(__file__).resolve().parents[1]
TABLE = "sparse_arch.embedding_bag_collection.embedding_bags.{}.weight"
PLACEHOLDER = "PLACEHOLDER"
CLI = "import sys; from compress.cli.main import main; sys.exit(main(sys.argv[1:]))"


def run(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["--no-progress", *map(str, argv)])
    return code, capsys.readouterr().err


def one_error_line(code: int, err: str, *fragments: str) -> None:
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, err


def deep_tuple(depth: int) -> bytes:
    """Opcodes building ``((((),),),)`` nested ``depth`` deep."""
    return pickle.EMPTY_TUPLE + pickle.TUPLE1 * depth


def deep_key_pt(path: Path, depth: int) -> Path:
    """A torch.save zip of a DLRM state dict plus an entry keyed by a ``depth``-deep tuple."""
    state = make_dlrm().state_dict()
    state[PLACEHOLDER] = torch.zeros(2)
    buf = io.BytesIO()
    torch.save(state, buf)
    op = pickle.BINUNICODE + len(PLACEHOLDER).to_bytes(4, "little") + PLACEHOLDER.encode()
    with (
        zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zin,
        zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout,
    ):
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("data.pkl"):
                assert data.count(op) == 1
                data = data.replace(op, deep_tuple(depth))
            zout.writestr(info.filename, data)
    return path


@pytest.fixture
def dcp_dir(tmp_path) -> Path:
    dcp.save(make_dlrm().state_dict(), checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    return tmp_path / "dcp"


def rewrite_metadata(dcp_dir: Path, edit) -> None:
    meta = dcp_dir / ".metadata"
    md = pickle.loads(meta.read_bytes())
    edit(md)
    meta.write_bytes(pickle.dumps(md, protocol=4))


# --------------------------------------------------------------------------------------------
# 1. deeply nested pickles


def test_pt_with_deeply_nested_key_is_refused_before_unpickling(tmp_path, capsys):
    path = deep_key_pt(tmp_path / "deep.pt", 5 * MAX_PICKLE_DEPTH)
    with pytest.raises(CheckpointError, match=r"data\.pkl\).*nests objects more than 1000"):
        open_checkpoint(path)
    code, err = run(capsys, "inspect", path)
    one_error_line(code, err, str(path), "refused")


def test_dcp_metadata_with_deeply_nested_key_is_refused(dcp_dir, capsys):
    meta = dcp_dir / ".metadata"
    md = pickle.loads(meta.read_bytes())
    md.state_dict_metadata[PLACEHOLDER] = md.state_dict_metadata[TABLE.format("t_cat_0")]
    raw = pickle.dumps(md, protocol=4)
    op = pickle.SHORT_BINUNICODE + bytes([len(PLACEHOLDER)]) + PLACEHOLDER.encode()
    assert raw.count(op) == 1
    meta.write_bytes(raw.replace(op, deep_tuple(5 * MAX_PICKLE_DEPTH)))
    code, err = run(capsys, "inspect", dcp_dir)
    one_error_line(code, err, ".metadata: refused", "nests objects more than 1000")


def test_real_checkpoints_pass_the_depth_scan(tmp_path, dcp_dir):
    pt = tmp_path / "ok.pt"
    torch.save({"model": make_dlrm().state_dict(), "epoch": (1, (2, (3,)))}, pt)
    assert open_checkpoint(pt).format == "file:model"
    assert open_checkpoint(dcp_dir).format == "dcp"


def test_crash_depth_pt_exits_2_in_a_fresh_process(tmp_path):
    """The reviewer's 200,000-deep key: exit 2 with one line, not a segfault (-11/139)."""
    path = deep_key_pt(tmp_path / "deep.pt", 200_000)
    proc = subprocess.run(
        [sys.executable, "-c", CLI, "--no-progress", "inspect", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-500:])
    one_error_line(proc.returncode, proc.stderr, "nests objects more than 1000")


# --------------------------------------------------------------------------------------------
# 2. tensors not backed by their storage


def test_stride_zero_table_is_refused_by_key(tmp_path, capsys):
    state = make_dlrm().state_dict()
    key = TABLE.format("t_cat_3")
    state[key] = torch.randn(1, 8).expand(200_000_000, 8)
    path = tmp_path / "stride0.pt"
    torch.save(state, path)
    assert path.stat().st_size < 100_000
    with pytest.raises(CheckpointError, match=rf"{key} \(200000000, 8\) has strides \(0, 1\)"):
        open_checkpoint(path)
    code, err = run(capsys, "inspect", path)
    one_error_line(code, err, key, "overlap")


def test_tables_sharing_one_storage_are_refused(tmp_path):
    state = make_dlrm().state_dict()
    a, b = TABLE.format("t_cat_0"), TABLE.format("t_cat_1")
    assert state[b].shape[0] > state[a].shape[0]
    state[a] = state[b][: state[a].shape[0]]  # a view of another table: its rows stored once
    path = tmp_path / "alias.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="tensors share storage"):
        open_checkpoint(path)


def test_transposed_but_backed_table_is_read(tmp_path):
    state = make_dlrm().state_dict()
    key = TABLE.format("t_cat_2")
    state[key] = state[key].t().contiguous().t()  # same values, column-major strides
    assert not state[key].is_contiguous()
    path = tmp_path / "transposed.pt"
    torch.save(state, path)
    loaded = load_model(path)
    torch.testing.assert_close(loaded.module.state_dict()[key], state[key])


# --------------------------------------------------------------------------------------------
# 3. metadata field types; DCP's tracebacks


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("storage_meta", 5, "storage_meta is a int"),
        ("storage_meta", "x", "storage_meta is a str"),
        ("version", [1], "version is a list"),
    ],
)
def test_mistyped_metadata_fields_are_refused_by_inspect(dcp_dir, capsys, field, value, fragment):
    rewrite_metadata(dcp_dir, lambda md: setattr(md, field, value))
    code, err = run(capsys, "inspect", dcp_dir)
    one_error_line(code, err, ".metadata: not valid DCP metadata", fragment)


def test_sparse_layout_in_metadata_is_refused(dcp_dir):
    def edit(md):
        md.state_dict_metadata[TABLE.format("t_cat_0")].properties.layout = torch.sparse_coo

    rewrite_metadata(dcp_dir, edit)
    with pytest.raises(CheckpointError, match="is not strided"):
        open_checkpoint(dcp_dir)


def test_dcp_load_failure_logs_no_traceback(dcp_dir, caplog):
    ckpt = open_checkpoint(dcp_dir)
    ckpt.dcp_metadata.storage_meta = 5  # what DCP's reader fails on after the checks
    with caplog.at_level(logging.WARNING), pytest.raises(CheckpointError, match="load_id"):
        load_tensors(ckpt)
    assert not [r for r in caplog.records if r.exc_info], caplog.text
