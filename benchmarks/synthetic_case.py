"""Synthetic quality cases shared by the quality benchmarks: generated click data
(:mod:`compress.data.synthetic`), a TorchRec ``DLRM`` trained one epoch on it in FP32, and the
files the main job reads, kept in a directory (``benchmarks/.cache/<name>``):

    dlrm.pt     the trained model's state dict      train.npz / valid.npz   the last 20% held out
    case.json   sizes, Bayes AUC of the valid rows, training time, the generator config

Used by ``bench_ranges_quality.py`` (Criteo Kaggle tables capped at 200k rows) and
``bench_quality.py`` (:func:`compress.data.synthetic.criteo_like_config`, the largest table 1M
rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress.data.dataset import Dataset
from compress.data.npz import load_npz, save_npz
from compress.data.synthetic import SyntheticConfig, bayes_auc, generate
from compress.demo import DEMO_TRAINING
from compress.io.model import build_model
from compress.io.model_spec import DLRMSpec, TableSpec
from compress.train.loop import fit
from compress.train.validation import HOLDOUT_FRACTION, split_validation

DIM = 16
#: How far ONNX Runtime's AUC on a job's artifacts may be from the AUC the job reported.
SERVED_AUC_TOLERANCE = 1e-5
#: Resamples of the paired bootstrap every quality table draws its intervals from.
RESAMPLES = 100
#: How the FP32 model is trained: as the demo's (one epoch of Adagrad, no selection).
FP32_TRAINING = DEMO_TRAINING
CASE_FILE = "case.json"


def case_spec(config: SyntheticConfig) -> DLRMSpec:
    """The model of a case: one dim-16 table ``t_cat_<i>`` per feature, bottom MLP 13-128-64-16,
    top 128-64-1, TorchRec's dot interaction."""
    tables = tuple(
        TableSpec(name=f"t_cat_{i}", num_embeddings=r, embedding_dim=DIM, feature_names=(f,))
        for i, (r, f) in enumerate(zip(config.table_sizes, config.feature_names, strict=True))
    )
    return DLRMSpec(
        "DLRM",
        tables,
        dense_in_features=config.num_dense,
        dense_arch_layer_sizes=(128, 64, DIM),
        over_arch_layer_sizes=(128, 64, 1),
    )


def config_json(config: SyntheticConfig) -> dict:
    """``config`` as JSON-ready values (tuples as lists), as ``case.json`` records it."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def build_case(root: Path, config: SyntheticConfig) -> dict:
    """Generate the data, train the FP32 model one epoch on the first 80%, write checkpoint,
    data and ``case.json`` into ``root``; the ``case.json`` object."""
    t0 = time.perf_counter()
    data = generate(config)
    train, valid = data.split_tail(HOLDOUT_FRACTION)
    del data
    spec = case_spec(config)
    torch.manual_seed(0)
    model = build_model(spec)
    sparse_tables(model)
    result = fit(model, train, None, spec.feature_names, FP32_TRAINING)
    root.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), root / "dlrm.pt")
    save_npz(train, root / "train.npz")
    save_npz(valid, root / "valid.npz")
    report = {
        "samples": config.num_samples,
        "train": len(train),
        "valid": len(valid),
        "bayes_auc_valid": bayes_auc(valid),
        "train_seconds": result.seconds,
        "build_seconds": time.perf_counter() - t0,
        "table_sizes": list(config.table_sizes),
        "config": config_json(config),
    }
    (root / CASE_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def sparse_tables(model: nn.Module) -> None:
    """Make the model's ``nn.EmbeddingBag`` tables produce sparse gradients (TorchRec's
    ``EmbeddingBagCollection`` makes dense ones): Adagrad then updates only the rows a batch
    reads, the same values several times faster on million-row tables. The state dict is
    unchanged."""
    for m in model.modules():
        if isinstance(m, nn.EmbeddingBag):
            m.sparse = True


def ensure_case(root: Path, config: SyntheticConfig, rebuild: bool = False) -> dict:
    """The ``case.json`` of the case in ``root``, built first when missing (or ``rebuild``).
    ``SystemExit`` when the kept case was built from another config (a case that predates the
    recorded config is trusted by its table sizes and sample count)."""
    path = root / CASE_FILE
    if rebuild or not path.is_file():
        print(f"building the case in {root} (generate, train FP32 one epoch) ...", flush=True)
        return build_case(root, config)
    case = json.loads(path.read_text())
    recorded = case.get("config")
    same = (
        recorded == config_json(config)
        if recorded is not None
        else case["table_sizes"] == list(config.table_sizes)
        and case["samples"] == config.num_samples
    )
    if not same:
        raise SystemExit(
            f"{path}: the kept case was built from another config; pass --rebuild to build "
            "this one (or remove the directory)"
        )
    return case


@dataclass
class CaseData:
    """A case's files read back: training rows (``None`` when not read), validation rows and
    their report slice (the rows every metric of the main job is on)."""

    checkpoint: Path
    train_path: Path
    valid_path: Path
    train: Dataset | None
    valid: Dataset
    report: Dataset


def load_case(root: Path, with_train: bool = True) -> CaseData:
    """Read a built case (``with_train=False`` leaves the training rows unread, for callers that
    only score)."""
    valid = load_npz(root / "valid.npz")
    train = load_npz(root / "train.npz") if with_train else None
    report = split_validation(valid, str(root / "valid.npz")).report
    return CaseData(root / "dlrm.pt", root / "train.npz", root / "valid.npz", train, valid, report)


def add_case_arguments(ap: argparse.ArgumentParser) -> None:
    """The options every benchmark on a quality case takes: ``--steps``, ``--samples``, ``--keep``,
    ``--root``, ``--json``."""
    ap.add_argument("--steps", type=int, help="cap fine-tuning at N steps (the CLI's --steps)")
    ap.add_argument("--samples", type=int, default=1_500_000, help="samples of the case")
    ap.add_argument("--keep", action="store_true", help="store the rows beside the case")
    ap.add_argument("--root", type=Path, help="another built case directory (default: the preset)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")


@dataclass
class CaseRun:
    """A benchmark's run on a quality case: the case (built if missing), a scratch directory, and
    where its rows are stored (beside the case with ``--keep``, else in the scratch directory),
    one folder per case and ``--steps``."""

    case: CaseData
    scratch: tempfile.TemporaryDirectory
    store: Path


def open_case_run(args: argparse.Namespace, results: str, prefix: str) -> CaseRun:
    """Build or load the case of ``args`` (:func:`add_case_arguments`); rows go under ``results``."""
    from benchmarks.common import cache_dir
    from compress.data.synthetic import criteo_like_config

    root = args.root or cache_dir() / "quality"
    if args.root is None:
        ensure_case(root, criteo_like_config(args.samples))
    case = load_case(root, with_train=False)
    case_id = hashlib.sha256((root / "case.json").read_bytes()).hexdigest()[:12]
    steps_tag = "" if args.steps is None else f"-steps{args.steps}"
    scratch = tempfile.TemporaryDirectory(dir=root, prefix=prefix)
    store = (root / results if args.keep else Path(scratch.name)) / (case_id + steps_tag)
    store.mkdir(parents=True, exist_ok=True)
    return CaseRun(case, scratch, store)


def case_command(
    case: CaseData, selector: list[str], out: Path, steps: int | None, *extra: str
) -> list[str]:
    """The main job on ``case`` as users run it: ``dqrm-compress SELECTOR CKPT --data --valid --out
    --json EXTRA [--steps N]`` (``selector``: ``["--recipe", R]`` or ``["--budget", B]``)."""
    from benchmarks.common import cli

    return [
        *cli(),
        "--no-progress",
        *selector,
        str(case.checkpoint),
        "--data",
        str(case.train_path),
        "--valid",
        str(case.valid_path),
        "--out",
        str(out),
        "--json",
        *extra,
        *([] if steps is None else ["--steps", str(steps)]),
    ]


def fp32_logits(case: CaseData) -> np.ndarray:
    """The case's FP32 checkpoint's logits on the report slice (the model is let go)."""
    from compress import pipeline
    from compress.train.evaluate import predict_logits

    job = pipeline.load(case.checkpoint)
    model, names = job.module, job.spec.feature_names
    return predict_logits(lambda b: model(b.dense, b.sparse), case.report, names)


def run_case_job(name: str, command: list[str]) -> tuple[dict, int, float]:
    """Run a main-job ``command`` (``--json``) in a fresh process: its JSON summary, peak RSS
    and wall seconds; ``SystemExit`` with the end of its stderr when it fails."""
    from benchmarks.common import run_job

    code, stdout, stderr, peak, wall = run_job(command)
    if code != 0:
        tail = "\n".join(stderr.strip().splitlines()[-5:])
        raise SystemExit(f"{name}: exit {code}:\n{tail}")
    return json.loads(stdout), peak, wall


def served_logits(
    out: Path, case: CaseData, reported_auc: float
) -> tuple[np.ndarray, float, str | None]:
    """The artifacts at ``out`` scored by ONNX Runtime on the report slice: logits, AUC, and why
    that AUC is not the job's ``reported_auc`` (``None`` when within
    :data:`SERVED_AUC_TOLERANCE`)."""
    from compress.train.metrics import auc
    from exporters import Predictor

    logits = Predictor(out).predict(case.report)
    served = auc(logits, case.report.labels)
    if abs(served - reported_auc) <= SERVED_AUC_TOLERANCE:
        return logits, served, None
    why = f"ONNX Runtime scores AUC {served:.6f} on the artifacts, the job reported {reported_auc:.6f}"
    return logits, served, why
