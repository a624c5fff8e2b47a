"""The fine-tuning control (``--control``): the same fine-tuning applied to the uncompressed model.

A recipe that fine-tunes gives its compressed model extra training that the checkpoint never had,
so "compressed vs baseline" mixes two effects: what compression lost and what the extra training
gained (on an already trained model it often gains a little, and it can overfit). The control
separates them: it fine-tunes the checkpoint itself, every table and the MLP kept (a recipe that
only fine-tunes, :attr:`compress.recipe.schema.Recipe.only_finetunes`), with the run's own
``[finetune]`` settings as the run used them (``--steps`` included): the same steps, optimizer,
learning rates, loss (``target``), seed, training data and selection slice, so the same batches in
the same order. It keeps its best step as the run does and is scored on the same report slice:
``metrics["control"]``, and "compressed - control" is the cost of compression alone.

A recipe that does not fine-tune has no fine-tuning to repeat: its control is the checkpoint
itself (``metrics["baseline"]``, said in a note). A control needs training data (without
``--data`` the run distils from the checkpoint, which would distil the checkpoint from itself) and
one process (a data-parallel run's workers would all have to run it too). It keeps no training
state: a resumed run (``--resume``) runs its control again from the start, to the same result.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from compress.data.dataset import Dataset
from compress.data.stream import StreamedData
from compress.errors import SettingError
from compress.io.model import LoadedModel
from compress.methods.apply_plan import prepare_model
from compress.plan import Plan, make_plan
from compress.recipe.schema import MLPSettings, Recipe
from compress.train.config import TrainConfig
from compress.train.device import on_device
from compress.train.evaluate import evaluate_model
from compress.train.loop import TrainResult, fit

#: ``entry["run"]`` of the fine-tuning evaluations a control run passes to ``log``.
CONTROL_RUN = "control"
#: The note of a run whose recipe does not fine-tune.
NO_FINETUNE_NOTE = (
    "--control: the recipe does not fine-tune, so its control is the checkpoint itself "
    "(metrics.control = metrics.baseline)"
)


@dataclass
class ControlRun:
    """A finished control: its score on the report slice (``None`` without one) and its
    fine-tuning (evaluations on the selection slice in ``train.history``)."""

    metrics: dict | None
    train: TrainResult
    seconds: float

    def report_json(self) -> dict:
        """What ``report_data.json`` keeps of it (no timings: the artifacts are reproducible)."""
        return {
            "steps": self.train.steps,
            "best_step": self.train.best_step,
            "history": [
                {k: v for k, v in e.items() if k not in ("samples_per_second", "run")}
                for e in self.train.history
            ],
            "metrics": self.metrics,
        }


def control_recipe(recipe: Recipe, finetune: TrainConfig) -> Recipe:
    """The recipe of ``recipe``'s control: no rule (every table kept), the MLP kept, and the
    fine-tuning settings ``finetune`` (the run's, after ``--steps``)."""
    return Recipe(
        name=f"{recipe.name}.control",
        description=f"control of {recipe.name}: the same fine-tuning, nothing compressed",
        rules=(),
        mlp=MLPSettings(),
        finetune=finetune,
        source=recipe.source,
    )


def check_control(plan: Plan, train: Dataset | StreamedData | None, world_size: int | None) -> None:
    """:class:`SettingError` when a control cannot be run for ``plan`` (checked before any work):
    without training data for a recipe that fine-tunes, or in a data-parallel run."""
    if world_size is not None and world_size > 1:
        raise SettingError(
            f"--control runs in one process: it cannot be combined with {world_size} workers "
            "(--nproc or torchrun)"
        )
    if plan.needs_finetune and train is None:
        raise SettingError(
            f"--control needs --data: recipe {plan.recipe_name!r} would fine-tune by distillation "
            "from the checkpoint, and a control would distil the checkpoint from itself"
        )


def run_control(
    job: LoadedModel,
    recipe: Recipe,
    config: TrainConfig,
    train: Dataset | StreamedData,
    select: Dataset | StreamedData | None,
    report: Dataset | StreamedData | None,
    *,
    device: torch.device,
    loss: dict | None = None,
    log: Callable[[dict], None] | None = None,
) -> ControlRun:
    """Fine-tune a copy of ``job``'s model with every table and the MLP kept, under ``config``
    (``recipe``'s fine-tuning as the run used it), on ``train`` (choosing the kept step on
    ``select``), and score it on ``report``. ``loss``: the keyword arguments the run's own
    :func:`fit` got (a teacher's loss). ``log`` receives each evaluation with ``"run":
    "control"`` added. ``job.module`` is left untouched."""
    t0 = time.perf_counter()
    plan = make_plan(control_recipe(recipe, config), job.spec)
    model, _ = prepare_model(job.module, job.spec, plan)
    model = on_device(model, device)
    tagged = None if log is None else (lambda entry: log({**entry, "run": CONTROL_RUN}))
    result = fit(model, train, select, job.spec.feature_names, config, log=tagged, **(loss or {}))
    model = on_device(model, torch.device("cpu")).eval()
    metrics = None if report is None else evaluate_model(model, report, job.spec.feature_names)
    return ControlRun(metrics=metrics, train=result, seconds=time.perf_counter() - t0)
