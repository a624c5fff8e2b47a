"""Parity inputs that reach every path of a lookup: ids a graph table treats apart.

The export's parity check samples ids uniformly (:mod:`exporters.onnx.writer`), which rarely
reaches a lookup path that serves a few rows apart: a shared table's hot rows
(:mod:`compress.methods.robe.hot_graph`; a few thousand of a million rows, yet most of the
traffic). A graph table may list such ids (``special_ids()``: ids inside the table, int64);
:func:`with_special_ids` then draws about half of that feature's ids in the one-hot and multi-hot
sets from them, so the check compares both paths. Tables that list none leave the sets as they are.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from compress.data.dataset import Dataset
from exporters.onnx.spec import DLRMGraphSpec

#: Share of a listed feature's parity ids drawn from its table's special ids.
SPECIAL_SHARE = 0.5


def special_ids(gspec: DLRMGraphSpec) -> dict[str, np.ndarray]:
    """``{feature: ids}`` for the features whose table lists special ids."""
    out = {}
    for f in gspec.features:
        listed = getattr(gspec.table_of(f).kind, "special_ids", None)
        ids = np.asarray(listed(), dtype=np.int64) if listed is not None else np.zeros(0)
        if ids.size:
            out[f] = ids
    return out


def mix_special_ids(data: Dataset, special: dict[str, np.ndarray], seed: int) -> Dataset:
    """``data`` with about :data:`SPECIAL_SHARE` of each listed feature's ids drawn from
    ``special`` (seeded: the same sets for the same seed)."""
    rng = np.random.default_rng([seed, 0x484F54])
    values = dict(data.values)
    for f, ids in special.items():
        old = np.asarray(values[f], dtype=np.int64)
        pick = rng.random(old.shape[0]) < SPECIAL_SHARE
        new = old.copy()
        new[pick] = ids[rng.integers(0, ids.shape[0], int(pick.sum()))]
        values[f] = new
    return replace(data, values=values)


def with_special_ids(sets: dict[str, Any], gspec: DLRMGraphSpec, seed: int) -> dict[str, Any]:
    """The parity sets (``ParitySet``: ``data``, ``graph_ids``) with special ids mixed into the
    sets that feed the graphs ``data``'s own ids (``graph_ids`` is ``None``)."""
    special = special_ids(gspec)
    if not special:
        return sets
    return {
        name: replace(s, data=mix_special_ids(s.data, special, seed)) if s.graph_ids is None else s
        for name, s in sets.items()
    }
