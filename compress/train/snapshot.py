"""The weights of a model being fine-tuned, as a training state keeps them (saved, kept-best, resumed).

For a model whose weights are all in memory a snapshot is its ``state_dict()`` (a deep copy where
the caller keeps it while training goes on), and restoring it is ``load_state_dict``: what the
loop always did.

A master weight that is a copy-on-write map of the checkpoint (:mod:`compress.io.cow_map`) is
instead kept as **the rows that differ from the checkpoint** (``ids``, ``values``): after 50
steps of distillation of the Criteo Terabyte shape that is about 0.4 GB instead of 12.58 GB, and
taking it reads only the pages fine-tuning wrote (and the file beside them), mapping none of the
table. Restoring drops the map's written pages (back to the checkpoint's bytes) and writes the
rows. A state saved so is restored only onto the same tables mapped from a checkpoint with the
same bytes: ``--resume`` checks the checkpoint's fingerprint (:mod:`compress.train.inputs`), and
the table's shape and dtype are checked here.

A snapshot with such rows is ``{SNAPSHOT_KEY: 1, "state": {key: tensor}, "rows": {key: {"ids",
"values"}}}`` (plain tensors and dicts: ``torch.load(weights_only=True)`` reads it).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from compress.io.cow_map import changed_rows, cow_map_of, reset_rows

#: Marks a snapshot holding changed rows (a plain state dict has no such key).
SNAPSHOT_KEY = "__dqrm_rows_snapshot__"


def take(model: nn.Module, keep: bool) -> dict[str, Any]:
    """The snapshot of ``model``'s weights now. ``keep``: the caller holds it while training goes
    on (tensors in memory are copied, as ``copy.deepcopy(model.state_dict())``); otherwise they
    may be the model's own (saved to a file at once)."""
    state = model.state_dict()
    rows: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        cow = cow_map_of(value)
        changed = changed_rows(cow, value) if cow is not None else None
        if changed is not None:
            rows[key] = {"ids": changed[0], "values": changed[1]}
    if not rows:
        return copy.deepcopy(state) if keep else state
    rest = {k: v for k, v in state.items() if k not in rows}
    return {SNAPSHOT_KEY: 1, "state": copy.deepcopy(rest) if keep else rest, "rows": rows}


def has_rows(snapshot: Mapping[str, Any]) -> bool:
    """Whether ``snapshot`` keeps some weights as changed rows (else it is a plain state dict)."""
    return isinstance(snapshot, Mapping) and snapshot.get(SNAPSHOT_KEY) == 1


def restore(model: nn.Module, snapshot: Mapping[str, Any]) -> None:
    """Load ``snapshot`` (:func:`take`, or a plain state dict) into ``model``.

    Raises what ``load_state_dict`` raises (``RuntimeError``) for keys or shapes that do not fit,
    and ``ValueError`` when a weight saved as changed rows is not a copy-on-write table of
    ``model`` (a state saved from a memory-mapped checkpoint, resumed on another kind of model).
    """
    if not has_rows(snapshot):
        model.load_state_dict(snapshot)
        return
    rows = snapshot["rows"]
    current = model.state_dict()
    targets = {}
    for key, saved in rows.items():
        target = current.get(key)
        cow = cow_map_of(target) if target is not None else None
        if cow is None:
            raise ValueError(
                f"{key}: saved as the rows that differ from the checkpoint, but this model's "
                "weight is not a copy-on-write table of a memory-mapped checkpoint"
            )
        ids, values = saved["ids"], saved["values"]
        if (
            ids.dim() != 1
            or values.shape[1:] != target.shape[1:]
            or values.shape[0] != ids.shape[0]
            or values.dtype != target.dtype
        ):
            raise ValueError(f"{key}: saved rows do not fit a {tuple(target.shape)} table")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= target.shape[0]):
            raise ValueError(f"{key}: saved row ids outside a {target.shape[0]}-row table")
        targets[key] = (cow, target, ids, values)
    result = model.load_state_dict(snapshot["state"], strict=False)
    if result.unexpected_keys or set(result.missing_keys) != set(rows):
        missing = sorted(set(result.missing_keys) - set(rows))
        raise RuntimeError(
            f"state does not fit the model: missing keys {missing}, unexpected keys "
            f"{sorted(result.unexpected_keys)}"
        )
    for cow, target, ids, values in targets.values():
        reset_rows(cow, target, ids, values)
