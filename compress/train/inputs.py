"""What a fine-tuning run depends on, so that ``--resume`` continues only the run it was saved from.

The training state records :func:`run_inputs`, one fingerprint per input that decides the steps of
a run:

==================  =========================================================================
``checkpoint``      the original model's weights as loaded (any format, dtypes upcast)
``model``           its tables, their features and order (the model config; shapes are in the
                    weights)
``data``            the training rows as read (after ``--on-bad-line``, ``--dense-transform``)
``valid``           the validation rows as read (the selection slice picks the kept step)
``seed``            the recipe's seed
``recipe``          the recipe (TOML as parsed) and the plan it resolved to for this model
==================  =========================================================================

Fingerprints are of content, not paths: the same files moved elsewhere resume, a file changed in
place does not. :func:`changed_input` names the first input whose fingerprint differs from the
saved record; ``--steps`` and other settings are compared apart (the saved ``config``).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from compress.data.dataset import Dataset
from compress.data.separation import content_fingerprint
from compress.data.stream import StreamedData
from compress.io.architecture import spec_to_model_config
from compress.io.fingerprint import sha256_json, sha256_state_dict
from compress.io.model_spec import DLRMSpec
from compress.plan import Plan
from compress.recipe.toml_out import recipe_to_toml

#: Each recorded input, in the order they are compared, with how a message names it.
INPUTS: dict[str, str] = {
    "checkpoint": "the checkpoint",
    "model": "the model config (tables, features, order)",
    "data": "the training data (--data)",
    "valid": "the validation data (--valid)",
    "seed": "the recipe's seed",
    "recipe": "the recipe or its plan",
}
#: The fingerprint of an input a run does not have (no ``--data``: distillation).
NONE = "none"


def run_inputs(
    model: nn.Module,
    spec: DLRMSpec,
    plan: Plan,
    train: Dataset | StreamedData | None,
    valid: Dataset | StreamedData | None,
    seed: int,
) -> dict[str, str]:
    """``{input: fingerprint}`` for every key of :data:`INPUTS` (see the module docstring)."""
    recipe = recipe_to_toml(plan.recipe) if plan.recipe is not None else None
    return {
        "checkpoint": sha256_state_dict(model.state_dict(), desc="checkpoint"),
        "model": sha256_json(spec_to_model_config(spec)),
        "data": content_fingerprint(train) if train is not None else NONE,
        "valid": content_fingerprint(valid) if valid is not None else NONE,
        "seed": str(seed),
        "recipe": sha256_json({"recipe": recipe, "plan": plan.to_json()}),
    }


def changed_input(saved: Mapping[str, str] | None, now: Mapping[str, str]) -> str | None:
    """Why a state recorded with ``saved`` inputs cannot continue a run on ``now`` (one phrase
    naming the input), or ``None`` when every input is the same."""
    if not isinstance(saved, Mapping):
        return (
            "it records no fingerprints of its inputs (saved by an older version), so a changed "
            "checkpoint, data or recipe could not be detected"
        )
    for key, label in INPUTS.items():
        before, after = saved.get(key), now.get(key)
        if before != after:
            return f"{label} changed since it was saved ({_show(key, before)} then, {_show(key, after)} now)"
    return None


def _show(key: str, value: str | None) -> str:
    if value is None:
        return "not recorded"
    if key == "seed" or value == NONE:
        return value
    return f"sha256 {value[:12]}"
