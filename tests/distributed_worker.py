"""One worker of a data-parallel fine-tuning run, started by the distributed tests as a script.

    python tests/distributed_worker.py JOB.json

``JOB.json`` names a checkpoint, a recipe, the training and selection data, the steps, and where
to write; ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` come from the environment as a
launcher sets them (without them the run is a single process). The worker prepares the model as
the pipeline does, fine-tunes it with :func:`compress.train.loop.fit` and saves its fine-tuned
weights (``model-<rank>.pt``) and its result (``result-<rank>.json``), so a test can compare the
ranks with each other and with a single process.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from compress import pipeline
from compress.data.npz import load_npz
from compress.methods.apply_plan import prepare_model
from compress.train.distributed import context
from compress.train.distributed.data_parallel import DataParallel
from compress.train.loop import fit


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    out = Path(job["out"])
    loaded = pipeline.load(job["checkpoint"])
    the_plan = pipeline.plan(loaded, job["recipe"])
    config = replace(the_plan.recipe.finetune, **job.get("finetune", {}))
    model, _ = prepare_model(loaded.module, loaded.spec, the_plan, None)
    names = loaded.spec.feature_names
    train = load_npz(job["train"])
    select = load_npz(job["valid"]) if job.get("valid") else None
    ctx = context.start("cpu") if context.launched() else None
    workers = DataParallel(ctx, config) if ctx is not None else None
    rank = ctx.rank if ctx is not None else 0
    result = fit(
        model,
        train,
        select,
        names,
        config,
        state_path=job.get("state"),
        resume=bool(job.get("resume")),
        stop_after=job.get("stop_after"),
        distributed=workers,
    )
    torch.save(model.state_dict(), out / f"model-{rank}.pt")
    summary = asdict(result)
    (out / f"result-{rank}.json").write_text(json.dumps(summary, default=str))
    context.stop()


if __name__ == "__main__":
    main(sys.argv[1])
