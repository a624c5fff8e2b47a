"""Attacker's review of the session's new inputs: a re-sealed artifact whose hot ids are not
strictly increasing rows of their group is refused by ``load_artifacts`` (so by the Predictor,
whose binary-search graph reads the ids file in place), not served with wrong rows."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import tiny_world

from compress import pipeline
from compress.errors import ArtifactError
from compress.io.fingerprint import sha256_file
from compress.methods.robe import hot_graph
from exporters.artifacts.manifest_integrity import DIGEST_KEY, dump_manifest, seal
from exporters.artifacts.read import load_artifacts
from exporters.export import export

RECIPE = """
name = "robe_hot"
[[tables]]
match = ["t_cat_2", "t_cat_3"]
method = "share"
compression = 10.0
block_size = 4
hot_rows = 64
hot_dtype = "int8"
[finetune]
steps = 1
batch_size = 256
eval_every = 1
"""
HOT_IDS = "shared/share0.hot_ids.npy"
GROUP_ROWS = 7000  # t_cat_2 + t_cat_3 of tiny_world


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A group with 64 hot rows, its graph searching the stored ids (no dense remap)."""
    tmp = tmp_path_factory.mktemp("hot")
    ckpt, train, valid, _ = tiny_world(tmp)
    (tmp / "r.toml").write_text(RECIPE)
    job = pipeline.load(ckpt)
    result = pipeline.compress(
        job, pipeline.plan(job, tmp / "r.toml"), data=train, valid=valid, steps=1
    )
    mp = pytest.MonkeyPatch()
    mp.setattr(hot_graph, "DENSE_REMAP_MAX_ROWS", 0)
    try:
        export(result, tmp / "out")
    finally:
        mp.undo()
    return tmp / "out"


def _tamper(src, dst, edit) -> None:
    """Copy ``src``, rewrite the hot ids' payload in place (header and offset kept, as the graph's
    external data expects) and re-seal the manifest with the file's new sha256."""
    shutil.copytree(src, dst)
    ids = np.load(dst / HOT_IDS, mmap_mode="r+")
    ids[:] = edit(np.array(ids))
    ids.flush()
    del ids
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["files"][HOT_IDS] = {
        "sha256": sha256_file(dst / HOT_IDS),
        "bytes": (dst / HOT_IDS).stat().st_size,
    }
    manifest.pop(DIGEST_KEY, None)
    (dst / "manifest.json").write_text(dump_manifest(seal(manifest)))


def _dup(ids):
    ids[1] = ids[0]
    return ids


def _beyond(ids):
    ids[-1] = GROUP_ROWS + 5  # past the group, still a valid int32
    return ids


@pytest.mark.parametrize(
    "edit", [lambda ids: ids[::-1].copy(), _dup, _beyond], ids=["unsorted", "dup", "beyond"]
)
def test_resealed_bad_hot_ids_are_refused(exported, tmp_path, edit):
    from exporters import Predictor

    assert load_artifacts(exported) is not None  # the untampered export loads
    bad = tmp_path / "bad"
    _tamper(exported, bad, edit)
    want = rf"share0.hot_ids.npy: shared array 'share0': hot ids must be strictly increasing global rows in \[0, {GROUP_ROWS}\)"
    with pytest.raises(ArtifactError, match=want):
        load_artifacts(bad, verify=False)
    with pytest.raises(ArtifactError, match=want):
        Predictor(bad)


# ------------------------------------------------------------------ --columns FILE.json


def _mapping_error(tmp_path, text: str) -> str:
    from compress.data.parquet_columns import read_columns
    from compress.errors import DataError

    path = tmp_path / "cols.json"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        read_columns(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


def test_a_key_written_twice_in_the_column_mapping_is_refused(tmp_path):
    # json.loads keeps the last value: the first dense_transform would be dropped silently
    text = '{"dense_transform": "none", "ids": "rows", "dense_transform": "log3"}'
    assert "key 'dense_transform' twice" in _mapping_error(tmp_path, text)
    nested = '{"sparse": {"cat_0": "c1", "cat_0": "c2"}}'
    assert "key 'cat_0' twice" in _mapping_error(tmp_path, nested)


@pytest.mark.parametrize("value", ["[]", "0", '""', "false"])
def test_a_sparse_value_that_is_not_an_object_is_refused(tmp_path, value):
    # these were read as "no sparse mapping" (the defaults) before
    text = f'{{"sparse": {value}}}'
    assert "sparse must map feature names to column names" in _mapping_error(tmp_path, text)


def test_a_column_named_twice_in_the_mapping_is_named(tmp_path):
    import pyarrow as pa

    from compress.data.parquet_columns import ColumnMapping, resolve_columns
    from compress.errors import DataError

    schema = pa.schema(
        [("label", pa.int64()), ("d0", pa.float64()), ("d1", pa.float64()), ("a", pa.int64())]
    )
    with pytest.raises(DataError, match="dense names column 'd0' twice"):
        resolve_columns(ColumnMapping(dense=("d0", "d0")), schema, ["a"], 2, "f.parquet")
    with pytest.raises(DataError, match="column 'a' is both a dense and a sparse feature's"):
        resolve_columns(ColumnMapping(dense=("d0", "a")), schema, ["a"], 2, "f.parquet")
    resolved = resolve_columns(ColumnMapping(dense=("d0", "d1")), schema, ["a"], 2, "f.parquet")
    assert resolved.dense == ("d0", "d1") and resolved.sparse == ("a",)


def test_a_killed_worker_keeps_restarts_even_when_a_peer_then_fails_as_bad_input():
    from compress.train.distributed.launch import final_failure

    assert final_failure([2])  # bad input: a restart cannot change it
    assert final_failure([130, 130])  # Ctrl-C
    assert not final_failure([-9, 2])  # rank 1 SIGKILLed, rank 0 refused its truncated message
    assert not final_failure([-9])
    assert not final_failure([1])
