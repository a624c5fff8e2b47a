"""Dense preprocessing: the transform that turned raw dense counts into a model's inputs.

A DLRM never sees raw Criteo counts: its dense inputs were transformed before training, and serving
raw data must apply exactly the same transform. The transforms this tool knows, by name:

=========  ==========================  ==========================================================
name       formula (``x``: the count,   used for
           missing fields are ``0``)
=========  ==========================  ==========================================================
``log3``   ``log(max(x, -2) + 3)``     Criteo raw text (the default), and TorchRec's preprocessed
                                       npy days (``log(x - min + 2)`` with Criteo's ``min = -1``)
``none``   ``x``                       raw text read with ``--dense-transform none``; generated
                                       data (its dense features are model inputs already)
=========  ==========================  ==========================================================

A :class:`~compress.data.dataset.Dataset` records the name it was read with (``None``: not known, as for
an in-memory dataset or an ``.npz`` written before the record existed), the ``.npz`` format stores
it, and the artifact manifest records the one the model was fine-tuned and evaluated on.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from compress.errors import DataError

DenseTransform = Literal["log3", "none"]
DENSE_TRANSFORMS: tuple[str, ...] = ("log3", "none")
#: The formula of each transform, as the manifest records it.
FORMULAS: dict[str, str] = {"log3": "log(max(x, -2) + 3)", "none": "x"}
#: What raw text is read with when neither the user nor a manifest names a transform.
DEFAULT_TEXT_TRANSFORM: DenseTransform = "log3"


def check_transform(name: object, where: str) -> DenseTransform:
    """``name`` if it is a known transform, else :class:`DataError` naming ``where``."""
    if name not in DENSE_TRANSFORMS:
        raise DataError(
            f"{where}: unknown dense transform {name!r} (known: {', '.join(DENSE_TRANSFORMS)})"
        )
    return name  # type: ignore[return-value]


def agreed_transform(records: Iterable[tuple[str | None, str]]) -> str | None:
    """The one transform of several datasets ``(name or None, source)``; ``None`` when none of them
    records one. Two different known transforms are a :class:`DataError` naming both sources: a
    model cannot have been fine-tuned on one preprocessing and evaluated on another."""
    seen: tuple[str, str] | None = None
    for name, source in records:
        if name is None:
            continue
        if seen is not None and seen[0] != name:
            raise DataError(
                f"{source}: dense features are {name!r}-transformed but {seen[1]} holds "
                f"{seen[0]!r}-transformed ones; use data with one dense preprocessing"
            )
        seen = seen or (name, source)
    return seen[0] if seen is not None else None
