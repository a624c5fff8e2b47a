"""Where a sample array first holds a bad value, in words (``"value nan at sample 3, column 1 is
not finite"``): the one-line messages of the readers that check values (:mod:`compress.data.npz`,
:mod:`compress.data.criteo_npy`)."""

from __future__ import annotations

import numpy as np


def find_nonfinite(arr: np.ndarray) -> str | None:
    """Where ``arr`` (float) first holds NaN or +-inf, in words (``"value nan at sample 3, column 1
    is not finite"``), or None when every value is finite."""
    return describe_first(arr, ~np.isfinite(arr), "is not finite")


def find_nonbinary(arr: np.ndarray, start: int = 0) -> str | None:
    """Where ``arr`` first holds a label other than 0 or 1 (NaN included), in words, or None
    (``start``: the sample number of ``arr[0]``, for a part of a file)."""
    return describe_first(arr, (arr != 0) & (arr != 1), "is not a label (0 or 1)", start)


def describe_first(arr: np.ndarray, bad: np.ndarray, what: str, start: int = 0) -> str | None:
    """``"value <v> at sample i[, column j] <what>"`` for the first True of ``bad`` (``v`` read
    from ``arr``; ``i`` counted from ``start``, the sample number of ``arr[0]``), or None when
    ``bad`` holds no True."""
    if not bad.any():
        return None
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    where = (index[0] + start, *index[1:])
    return f"value {arr[index].item()!r} at {describe_position(where)} {what}"


def describe_position(index: tuple[int, ...]) -> str:
    """``(3,)`` -> ``"sample 3"``, ``(3, 1)`` -> ``"sample 3, column 1"`` (0-based, as numpy)."""
    if len(index) == 1:
        return f"sample {index[0]}"
    if len(index) == 2:
        return f"sample {index[0]}, column {index[1]}"
    return f"index {index}"
