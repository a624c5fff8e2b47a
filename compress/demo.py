"""The built-in demo: a small TorchRec DLRM trained in FP32 on synthetic data with a planted signal.

``build_demo(dir)`` generates 1,500,000 samples (:func:`compress.data.synthetic.demo_synthetic_config`:
7 tables of 20 to 100,000 rows, one multi-hot feature, 13 dense features), keeps the last 20% for
validation, trains a ``torchrec.models.dlrm.DLRM`` (dim 16, bottom 13-64-16, top 64-32-1) for one
epoch, and writes, atomically:

- ``dlrm.pt``: ``torch.save(model.state_dict())``, a real TorchRec checkpoint;
- ``model_config.json``: table order and feature names (what ``--model-config`` takes);
- ``train.npz``, ``valid.npz``: the data in the project's ``.npz`` format;
- ``demo.json``: Bayes AUC of each split (the best reachable score), the trained model's AUC and
  the training time.

``build_demo(dir, num_samples=N)`` builds the same demo shrunk for a smoke run (the tests use it):
N samples, every table cut to at most N rows.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from compress.data.npz import save_npz
from compress.data.synthetic import SyntheticConfig, bayes_auc, demo_synthetic_config, generate
from compress.io.architecture import spec_to_model_config
from compress.io.atomic_file import temp_dir_beside
from compress.io.model import build_model
from compress.io.model_spec import DLRMSpec, TableSpec
from compress.train.config import TrainConfig
from compress.train.evaluate import evaluate_model
from compress.train.loop import fit
from compress.train.validation import HOLDOUT_FRACTION

DEMO_DIM = 16
DEMO_TRAINING = TrainConfig(
    epochs=1.0,
    batch_size=2048,
    optimizer="adagrad",
    lr_embedding=0.05,
    lr_dense=0.05,
    eval_every=0,
    keep_best=False,
    seed=0,
)


@dataclass(frozen=True)
class DemoPaths:
    root: Path

    @property
    def checkpoint(self) -> Path:
        return self.root / "dlrm.pt"

    @property
    def model_config(self) -> Path:
        return self.root / "model_config.json"

    @property
    def train(self) -> Path:
        return self.root / "train.npz"

    @property
    def valid(self) -> Path:
        return self.root / "valid.npz"

    @property
    def report(self) -> Path:
        return self.root / "demo.json"

    def complete(self) -> bool:
        return all(
            p.is_file()
            for p in (self.checkpoint, self.model_config, self.train, self.valid, self.report)
        )


def demo_paths(root: str | Path) -> DemoPaths:
    return DemoPaths(Path(root))


def demo_spec(table_sizes: tuple[int, ...]) -> DLRMSpec:
    tables = tuple(
        TableSpec(
            name=f"t_cat_{i}", num_embeddings=r, embedding_dim=DEMO_DIM, feature_names=(f"cat_{i}",)
        )
        for i, r in enumerate(table_sizes)
    )
    return DLRMSpec(
        "DLRM",
        tables,
        dense_in_features=13,
        dense_arch_layer_sizes=(64, DEMO_DIM),
        over_arch_layer_sizes=(64, 32, 1),
    )


def demo_config(seed: int = 0, num_samples: int | None = None) -> SyntheticConfig:
    """The demo's data: :func:`~compress.data.synthetic.demo_synthetic_config`, or with ``num_samples``
    a shrunken one of that many samples whose tables have at most that many rows."""
    config = demo_synthetic_config(seed)
    if num_samples is None:
        return config
    sizes = tuple(min(rows, num_samples) for rows in config.table_sizes)
    return replace(config, num_samples=num_samples, table_sizes=sizes)


def build_demo(root: str | Path, seed: int = 0, num_samples: int | None = None) -> dict:
    """Generate, train and write the demo into ``root`` (replacing it); returns the report.
    ``num_samples`` shrinks it (:func:`demo_config`)."""
    root = Path(root)
    config = demo_config(seed, num_samples)
    data = generate(config)
    train, valid = data.split_tail(HOLDOUT_FRACTION)  # the tail the main job holds out of --data
    spec = demo_spec(config.table_sizes)
    torch.manual_seed(seed)
    model = build_model(spec)
    result = fit(model, train, None, spec.feature_names, DEMO_TRAINING)
    metrics = evaluate_model(model, valid, spec.feature_names)
    report = {
        "valid_auc": metrics["auc"],
        "valid_logloss": metrics["logloss"],
        "valid_accuracy": metrics["accuracy"],
        "bayes_auc": bayes_auc(valid),
        "bayes_auc_train": bayes_auc(train),
        "train_samples": len(train),
        "valid_samples": len(valid),
        "train_seconds": result.seconds,
        "table_sizes": list(config.table_sizes),
        "seed": seed,
    }
    with temp_dir_beside(root) as tmp:
        paths = demo_paths(tmp)
        torch.save(model.state_dict(), paths.checkpoint)
        paths.model_config.write_text(json.dumps(spec_to_model_config(spec), indent=2) + "\n")
        save_npz(train, paths.train)
        save_npz(valid, paths.valid)
        paths.report.write_text(json.dumps(report, indent=2) + "\n")
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    return report
