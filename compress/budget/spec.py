"""What a size budget says: ``3MB``, ``2.5 MiB``, ``3000000`` (bytes) or ``100x`` (the model's bytes
divided by 100). Plain integer arithmetic, no torch.

Units (case-insensitive): ``B``; decimal ``KB`` ``MB`` ``GB`` ``TB`` (powers of 1000, as disk and
download sizes are quoted); binary ``KiB`` ``MiB`` ``GiB`` ``TiB`` (powers of 1024, what
``inspect`` and ``plan`` print). A plain number is bytes. A fraction of a byte is rounded down,
so the budget is never more than what was written. ``Nx`` is the model's bytes (``plan``'s
``bytes_before``: every table and MLP as the checkpoint stores them) divided by ``N`` and rounded
down; ``N`` must be more than 1.

    >>> parse_budget("3MB").resolve(10**9)
    3000000
    >>> parse_budget("100x").resolve(95_000_123)
    950001
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

from compress.errors import SettingError

#: Bytes per unit, by the unit's lower-case spelling.
UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
RATIO_SUFFIX = "x"
#: The longest budget text read (longer is a typo, and a number beyond any model).
MAX_TEXT = 40
_BUDGET_RE = re.compile(r"(?P<number>[0-9][0-9_]*(?:\.[0-9]+)?|\.[0-9]+)\s*(?P<unit>[A-Za-z]*)")
_SPELLED = "B, KB, MB, GB, TB (powers of 1000), KiB, MiB, GiB, TiB (powers of 1024)"


class BudgetError(SettingError):
    """A budget that cannot be read, or that no choice of methods fits."""


@dataclass(frozen=True)
class Budget:
    """A budget as written (``text``) and what it means: ``nbytes`` bytes, or the model's bytes
    divided by ``ratio`` (exactly one is set)."""

    text: str
    nbytes: int | None = None
    ratio: Fraction | None = None

    def resolve(self, model_bytes: int) -> int:
        """The budget in bytes for a model of ``model_bytes`` bytes."""
        if self.nbytes is not None:
            return self.nbytes
        assert self.ratio is not None
        return math.floor(Fraction(model_bytes) / self.ratio)

    @property
    def name(self) -> str:
        """``budget_<text>``: a recipe name (and the default output directory's suffix)."""
        return "budget_" + self.text

    def describe(self, model_bytes: int) -> str:
        """``3MB (3,000,000 bytes)`` or ``100x (950,001 bytes: 1/100 of 95,000,123)``."""
        n = self.resolve(model_bytes)
        if self.ratio is not None:
            return f"{self.text} ({n:,} bytes: 1/{_show(self.ratio)} of {model_bytes:,})"
        return f"{self.text} ({n:,} bytes)"


def _show(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{float(value):g}"


def parse_budget(value: str | int, where: str = "--budget") -> Budget:
    """The :class:`Budget` that ``value`` writes (a string as in the module docstring, or an
    integer number of bytes); :class:`BudgetError` naming ``where`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BudgetError(
            f'{where}: a budget is a string such as "3MB" or "100x", or an integer number of '
            f"bytes; got {type(value).__name__}"
        )
    if isinstance(value, int):
        if value < 1:
            raise BudgetError(f"{where}: a budget must be at least 1 byte, got {value}")
        return Budget(text=str(value), nbytes=value)
    text = value.strip()
    if len(text) > MAX_TEXT:
        raise BudgetError(f"{where}: budget {text[:MAX_TEXT]!r}... is too long")
    m = _BUDGET_RE.fullmatch(text)
    if m is None:
        raise BudgetError(
            f"{where}: cannot read budget {text!r}: write a number of bytes with an optional unit "
            f"({_SPELLED}), e.g. 3MB, or a ratio to the model's size, e.g. 100x"
        )
    number = Fraction(m["number"].replace("_", ""))
    unit = m["unit"].lower()
    compact = re.sub(r"\s+", "", text)
    if unit == RATIO_SUFFIX:
        if number <= 1:
            raise BudgetError(
                f"{where}: budget {text!r}: the ratio must be more than 1 (the model's own size "
                "leaves nothing to compress)"
            )
        return Budget(text=compact, ratio=number)
    if unit not in UNITS:
        raise BudgetError(
            f"{where}: budget {text!r}: unknown unit {m['unit']!r} (use {_SPELLED}, or x)"
        )
    nbytes = math.floor(number * UNITS[unit])
    if nbytes < 1:
        raise BudgetError(f"{where}: budget {text!r} is less than 1 byte")
    return Budget(text=compact, nbytes=nbytes)
