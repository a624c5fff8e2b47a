"""Every checkpoint form TorchRec users have loads, rebuilds strictly, and gives identical outputs."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import make_dlrm, random_inputs
from torchrec.models.dlrm import DLRMTrain

from compress.errors import CheckpointError, ModelConfigError
from compress.io.checkpoint import open_checkpoint
from compress.io.model import load_model, read_spec

MODEL_CLASSES = ["DLRM", "DLRM_DCN", "DLRM_Projection"]


def _assert_same_outputs(original, loaded):
    original.eval()
    dense, kjt = random_inputs(original)
    with torch.no_grad():
        assert torch.equal(original(dense, kjt), loaded.module(dense, kjt))


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_plain_state_dict_rebuilds_exactly(tmp_path, model_class):
    model = make_dlrm(model_class)
    path = tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model(path)
    assert loaded.spec.model_class == model_class
    assert [t.name for t in loaded.spec.tables] == ["t_cat_0", "t_cat_1", "t_cat_2", "t_cat_3"]
    assert loaded.spec.feature_names == ("cat_0", "cat_1", "cat_2", "cat_3")
    assert [t.num_embeddings for t in loaded.spec.tables] == [7, 50, 300, 1000]
    assert loaded.spec.dense_in_features == 5
    assert loaded.spec.dense_arch_layer_sizes == (16, 8)
    assert loaded.spec.over_arch_layer_sizes == (12, 1)
    _assert_same_outputs(model, loaded)


def test_interaction_parameters_inferred(tmp_path):
    torch.save(make_dlrm("DLRM_DCN").state_dict(), tmp_path / "dcn.pt")
    torch.save(make_dlrm("DLRM_Projection").state_dict(), tmp_path / "proj.pt")
    _, dcn = read_spec(tmp_path / "dcn.pt")
    _, proj = read_spec(tmp_path / "proj.pt")
    assert (dcn.dcn_num_layers, dcn.dcn_low_rank_dim) == (2, 4)
    assert proj.interaction_branch1_layer_sizes == (16, 16)
    assert proj.interaction_branch2_layer_sizes == (24, 24)


def test_dlrm_train_wrapper_and_container_dict(tmp_path):
    model = make_dlrm("DLRM_DCN")
    torch.save(DLRMTrain(model).state_dict(), tmp_path / "train.pt")
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "wrapped.pt")
    a = load_model(tmp_path / "train.pt")
    b = load_model(tmp_path / "wrapped.pt")
    assert a.spec.key_prefix == "model."
    assert a.checkpoint.format == "file" and b.checkpoint.format == "file:state_dict"
    _assert_same_outputs(model, a)
    _assert_same_outputs(model, b)


def test_distributed_checkpoint_directory(tmp_path):
    model = make_dlrm("DLRM", rows=(5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15))
    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    ckpt = open_checkpoint(tmp_path / "dcp")
    assert ckpt.format == "dcp" and ckpt.is_lazy  # shapes only, nothing read yet
    loaded = load_model(tmp_path / "dcp")
    # the saved order (t_cat_2 before t_cat_10), as the model declared them
    assert [t.name for t in loaded.spec.tables] == [f"t_cat_{i}" for i in range(11)]
    _assert_same_outputs(model, loaded)


def test_file_checkpoint_is_memory_mapped(tmp_path):
    torch.save(make_dlrm().state_dict(), tmp_path / "c.pt")
    ckpt = open_checkpoint(tmp_path / "c.pt")
    assert ckpt.tensors  # keep the mapping alive while checking
    maps = Path("/proc/self/maps").read_text()
    assert str(tmp_path / "c.pt") in maps


def test_feature_names_from_model_config(tmp_path):
    model = make_dlrm(shared_feature=True)
    torch.save(model.state_dict(), tmp_path / "c.pt")
    with pytest.raises(ModelConfigError, match="feature_names"):
        read_spec(tmp_path / "c.pt")
    cfg = tmp_path / "model.json"
    tables = [{"name": f"t_cat_{i}", "feature_names": [f"cat_{i}"]} for i in range(3)]
    tables.append({"name": "t_cat_3", "feature_names": ["cat_a", "cat_b"], "num_embeddings": 1000})
    cfg.write_text(__import__("json").dumps({"tables": tables}))
    loaded = load_model(tmp_path / "c.pt", cfg)
    assert loaded.spec.feature_names == ("cat_0", "cat_1", "cat_2", "cat_a", "cat_b")
    _assert_same_outputs(model, loaded)


def test_model_config_shape_mismatch(tmp_path):
    torch.save(make_dlrm().state_dict(), tmp_path / "c.pt")
    cfg = tmp_path / "model.json"
    cfg.write_text(
        '{"tables": [{"name": "t_cat_0"}, {"name": "t_cat_1", "num_embeddings": 51},'
        ' {"name": "t_cat_2"}, {"name": "t_cat_3"}]}'
    )
    with pytest.raises(ModelConfigError, match=r"t_cat_1: num_embeddings 51 but .* has 50"):
        read_spec(tmp_path / "c.pt", cfg)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weights": torch.zeros(2), "payload": _Evil(marker)}, path)
    with pytest.raises(CheckpointError, match="refused"):
        open_checkpoint(path)
    assert not marker.exists()
    legacy = tmp_path / "evil.pkl"
    legacy.write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(CheckpointError):
        open_checkpoint(legacy)
    assert not marker.exists()


def test_malicious_dcp_metadata_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    d = tmp_path / "dcp"
    d.mkdir()
    (d / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(CheckpointError, match=r"\.metadata: refused"):
        open_checkpoint(d)
    assert not marker.exists()


def test_bad_inputs_name_the_file(tmp_path):
    torch.save(make_dlrm().state_dict(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "emptydir").mkdir()
    torch.save({"linear.weight": torch.zeros(3, 3)}, tmp_path / "notdlrm.pt")
    cases = {
        "trunc.pt": "truncated or corrupt",
        "empty.pt": "empty",
        "emptydir": "directory is empty",
        "notdlrm.pt": "not a TorchRec DLRM",
        "missing.pt": "no such file",
    }
    for name, msg in cases.items():
        with pytest.raises(CheckpointError, match=msg) as info:
            load_model(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)
