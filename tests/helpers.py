"""Shared builders for tests: small TorchRec DLRMs built with TorchRec's own classes."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRM_Projection
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from compress.data.npz import save_npz
from compress.io.model_spec import DLRMSpec, TableSpec

ROWS = (7, 50, 300, 1000)
DIM = 8
DENSE = 5


def make_ebc(rows=ROWS, dim=DIM, shared_feature: bool = False) -> EmbeddingBagCollection:
    configs = [
        EmbeddingBagConfig(
            name=f"t_cat_{i}", embedding_dim=dim, num_embeddings=r, feature_names=[f"cat_{i}"]
        )
        for i, r in enumerate(rows)
    ]
    if shared_feature:  # the last table serves two features
        configs[-1] = EmbeddingBagConfig(
            name=configs[-1].name,
            embedding_dim=dim,
            num_embeddings=rows[-1],
            feature_names=["cat_a", "cat_b"],
        )
    return EmbeddingBagCollection(tables=configs)


def make_dlrm(
    model_class: str = "DLRM", seed: int = 0, rows=ROWS, dim=DIM, shared_feature: bool = False
):
    torch.manual_seed(seed)
    ebc = make_ebc(rows, dim, shared_feature)
    common = dict(
        embedding_bag_collection=ebc,
        dense_in_features=DENSE,
        dense_arch_layer_sizes=[16, dim],
        over_arch_layer_sizes=[12, 1],
    )
    if model_class == "DLRM":
        return DLRM(**common)
    if model_class == "DLRM_DCN":
        return DLRM_DCN(**common, dcn_num_layers=2, dcn_low_rank_dim=4)
    if model_class == "DLRM_Projection":
        return DLRM_Projection(
            **common,
            interaction_branch1_layer_sizes=[16, 2 * dim],
            interaction_branch2_layer_sizes=[24, 3 * dim],
        )
    raise ValueError(model_class)


def random_inputs(model, batch: int = 32, max_bag: int = 3, seed: int = 1):
    """Dense features and a KJT with multi-hot bags (lengths 0..max_bag) for every feature of ``model``."""
    g = torch.Generator().manual_seed(seed)
    ebc = model.sparse_arch.embedding_bag_collection
    keys, lengths, values = [], [], []
    for cfg in ebc.embedding_bag_configs():
        for f in cfg.feature_names:
            ln = torch.randint(0, max_bag + 1, (batch,), generator=g)
            keys.append(f)
            lengths.append(ln)
            values.append(torch.randint(0, cfg.num_embeddings, (int(ln.sum()),), generator=g))
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.cat(values), lengths=torch.cat(lengths)
    )
    dense = torch.randn(batch, DENSE, generator=g)
    return dense, kjt


def tiny_world(tmp_path, model_class: str = "DLRM", n: int = 6000, seed: int = 0):
    """A small synthetic dataset (train/valid .npz) and an untrained TorchRec model checkpoint
    whose tables fit it. Returns (checkpoint path, train path, valid path, model)."""
    from compress.data.synthetic import SyntheticConfig, generate

    rows = (20, 300, 2000, 5000)
    cfg = SyntheticConfig(
        table_sizes=rows, num_samples=n, bag_sizes=(1, 2, 1, 1), num_dense=DENSE, seed=seed
    )
    data = generate(cfg)
    train, valid = data.split_tail(0.25)
    model = make_dlrm(model_class, seed=seed, rows=rows, dim=DIM)
    ckpt = tmp_path / "model.pt"
    torch.save(model.state_dict(), ckpt)
    save_npz(train, tmp_path / "train.npz")
    save_npz(valid, tmp_path / "valid.npz")
    return ckpt, tmp_path / "train.npz", tmp_path / "valid.npz", model


def data_spec(rows: Mapping[str, int], dense: int) -> DLRMSpec:
    """A small ``DLRM`` spec for reading data: one dim-4 table ``t_<f>`` of ``rows[f]`` rows per
    sparse feature ``f`` (in that order) and ``dense`` dense features."""
    tables = tuple(
        TableSpec(name=f"t_{f}", num_embeddings=n, embedding_dim=4, feature_names=(f,))
        for f, n in rows.items()
    )
    return DLRMSpec(
        model_class="DLRM",
        tables=tables,
        dense_in_features=dense,
        dense_arch_layer_sizes=(8, 4),
        over_arch_layer_sizes=(4, 1),
    )


def require_c_compiler() -> None:
    """Skip the calling test where no C compiler is found: the compiled kernels
    (:mod:`compress.quant.native`) cannot be built, and QAT runs the PyTorch path, which the README
    supports. Where a compiler exists the kernels must build (a broken kernel fails, not skips)."""
    from compress.quant import native

    if native.find_compiler() is None:
        pytest.skip(
            "no C compiler found ($CC, default cc, on PATH): the compiled fake-quant kernels "
            "cannot be built here; QAT uses the PyTorch path"
        )


#: Environment variable naming a directory that holds real Criteo rows (``criteo_sample.tsv``).
CRITEO_ROWS_ENV = "DQRM_CRITEO_ROWS"
CRITEO_SAMPLE = "criteo_sample.tsv"


def criteo_sample_path() -> Path:
    """The real Criteo sample rows: ``$DQRM_CRITEO_ROWS/criteo_sample.tsv``, else the first
    ``<dir>/data/criteo_sample.tsv`` among the directories beside this checkout. Skips the calling
    test when neither exists; fails when the variable names a directory without the file."""
    named = os.environ.get(CRITEO_ROWS_ENV)
    if named:
        path = Path(named) / CRITEO_SAMPLE
        if not path.is_file():
            pytest.fail(f"${CRITEO_ROWS_ENV}={named}: no {CRITEO_SAMPLE} there")
        return path
    checkout = Path(__file__).resolve().parents[1]
    for beside in sorted(p for p in checkout.parent.iterdir() if p != checkout):
        path = beside / "data" / CRITEO_SAMPLE
        if path.is_file():
            return path
    pytest.skip(
        f"real Criteo rows not found: set {CRITEO_ROWS_ENV} to a directory holding "
        f"{CRITEO_SAMPLE} (none in a data/ folder beside the checkout either)"
    )


#: Mixed PTQ: one INT8 table-wise table, the rest INT4 row-wise, INT8 MLPs.
MIXED_PTQ_RECIPE = """
name = "rows_int4"
[[tables]]
match = ["t_cat_0"]
method = "ptq"
bits = 8
granularity = "table"
[[tables]]
match = ["*"]
method = "ptq"
bits = 4
[mlp]
method = "ptq"
bits = 8
"""

#: INT4 row-wise QAT long enough (150 steps, state every 10) to interrupt mid-run.
SLOW_QAT_RECIPE = """
name = "slow"
[[tables]]
match = ["*"]
method = "qat"
bits = 4
granularity = "row"
[finetune]
steps = 150
batch_size = 256
eval_every = 50
checkpoint_every = 10
"""


def cli_command(*args) -> list[str]:
    """``python -m compress --no-progress ARGS...`` as a subprocess argv."""
    return [sys.executable, "-m", "compress", "--no-progress", *map(str, args)]


def as_format_2_layout(path: Path) -> dict:
    """Rewrite the artifact directory ``path`` (this version's format) as dqrm-compress format 2
    laid it out, and return its manifest: the graphs ``onnx/<name>.onnx`` carrying their own
    copy of the tables and weights (inline here: they are small), each graph entry's ``external_data`` a path
    or null, ``format_version`` 2, the manifest resealed. The table files keep their padded
    headers (valid ``.npy`` files to any reader)."""
    import json

    import onnx

    from compress.io.fingerprint import sha256_file
    from exporters.artifacts.manifest_integrity import dump_manifest, seal

    manifest = json.loads((path / "manifest.json").read_text())
    for name, entry in manifest["onnx"]["graphs"].items():
        model = onnx.load(str(path / entry["file"]))  # tables and weights read back into it
        (path / entry["file"]).unlink()
        manifest["files"].pop(entry["file"])
        entry["file"] = f"onnx/{name}.onnx"
        onnx.save_model(model, str(path / entry["file"]))
        entry["external_data"] = None
        manifest["files"][entry["file"]] = {
            "sha256": sha256_file(path / entry["file"]),
            "bytes": (path / entry["file"]).stat().st_size,
        }
    manifest["files"] = dict(sorted(manifest["files"].items()))
    manifest["format_version"] = 2
    (path / "manifest.json").write_text(dump_manifest(seal(manifest)))
    return manifest


def interruptible() -> None:
    """``preexec_fn`` of a child a test sends SIGINT: SIGINT back to its default, since a shell
    starts background jobs (a CI script run with ``&``) with SIGINT ignored, which the child would
    inherit, and Python then never raises ``KeyboardInterrupt``."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def export_small(tmp: Path, recipe_text: str | None = None):
    """``tiny_world``'s DLRM in ``tmp`` compressed with ``recipe_text`` (default
    ``MIXED_PTQ_RECIPE``, selection on the valid rows) and written with its ONNX graphs to
    ``tmp/out``. Returns (job, result, artifact dir, valid .npz)."""
    from compress import pipeline
    from exporters.artifacts import write as artifacts
    from exporters.onnx.writer import onnx_writer

    ckpt, _, valid, _ = tiny_world(tmp, "DLRM")
    (tmp / "recipe.toml").write_text(recipe_text or MIXED_PTQ_RECIPE)
    job = pipeline.load(ckpt)
    result = pipeline.compress(job, pipeline.plan(job, tmp / "recipe.toml"), valid=valid)
    written = artifacts.save(result, tmp / "out", extra_writers=(onnx_writer(result.model),))
    return job, result, written.path, valid
