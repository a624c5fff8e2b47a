"""Typed reads of one table of a recipe's TOML: every failure is one :class:`RecipeError` line.

:class:`Keys` wraps one TOML table (the document, a ``[[tables]]`` rule, ``[mlp]``) with the file
it came from and its place (``tables[2]``); its getters check the type and range of a key and fail
with ``<file>: <where>: <what>``. Compression methods read their own rule keys through it
(:meth:`compress.methods.registry.TableMethod.parse`), so every recipe error reads the same.

    >>> keys = Keys({"bits": 3}, "r.toml", "tables[0]")
    >>> keys.choice("bits", (8, 4, 2), required=True)
    Traceback (most recent call last):
    compress.errors.RecipeError: r.toml: tables[0]: bits must be one of 8, 4, 2, got 3
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

from compress.errors import RecipeError


def fail(source: str, where: str, message: str) -> NoReturn:
    """Raise the one-line :class:`RecipeError` ``<source>: <where>: <message>``."""
    raise RecipeError(f"{source}: {where}: {message}" if where else f"{source}: {message}")


def is_real(v: Any) -> bool:
    """An int or float (``inf`` and integers beyond float range included), not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int or float (an integer beyond float range is not: it has no float value)."""
    if not is_real(v):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def is_integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class Kind:
    """A TOML value type: how messages name it, its test, and the Python value it becomes."""

    what: str
    test: Callable[[Any], bool]
    convert: Callable[[Any], Any] = lambda v: v


STRING = Kind("a string", lambda v: isinstance(v, str))
INTEGER = Kind("an integer", is_integer)
NUMBER = Kind("a finite number", is_number, float)
BOOLEAN = Kind("true or false", lambda v: isinstance(v, bool))


class Keys:
    """The keys of one TOML table ``raw`` at ``where`` (``""`` for the document) of ``source``."""

    def __init__(self, raw: dict, source: str, where: str) -> None:
        self.raw, self.source, self.where = raw, source, where

    def fail(self, message: str) -> NoReturn:
        fail(self.source, self.where, message)

    def has(self, key: str) -> bool:
        return key in self.raw

    def check_known(self, allowed: tuple[str, ...]) -> None:
        """Fail on the first key not in ``allowed``, suggesting the closest allowed one."""
        for key in self.raw:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = (
                    f"; did you mean {close[0]!r}?"
                    if close
                    else f" (allowed: {', '.join(allowed)})"
                )
                what = "unknown key" if self.where else "unknown top-level key"
                self.fail(f"{what} {key!r}{hint}")

    def refuse(self, key: str, message: str) -> None:
        """Fail with ``message`` when ``key`` is present."""
        if key in self.raw:
            self.fail(message)

    def get(
        self, key: str, kind: Kind, *, required: bool = False, minimum: int | None = None
    ) -> Any:
        """The value of ``key`` as ``kind`` (``None`` when absent and not ``required``); an
        integer below ``minimum`` and an empty required string fail."""
        if key not in self.raw:
            if required:
                self.fail(f"missing required key {key!r}")
            return None
        value = self.raw[key]
        if not kind.test(value):
            self.fail(f"{key} must be {kind.what}, got {show(value)}")
        if minimum is not None and value < minimum:
            self.fail(f"{key} must be >= {minimum}, got {value}")
        if required and value == "":
            self.fail(f"{key} must not be empty")
        return kind.convert(value)

    def choice(self, key: str, choices: tuple, *, required: bool = False) -> Any:
        """The value of ``key`` when it is one of ``choices`` (of their type), else a failure."""
        if key not in self.raw:
            if required:
                self.fail(f"missing required key {key!r} (one of {show_choices(choices)})")
            return None
        value = self.raw[key]
        same_type = isinstance(value, type(choices[0])) and not isinstance(value, bool)
        if not same_type or value not in choices:
            self.fail(f"{key} must be one of {show_choices(choices)}, got {show(value)}")
        return value


def show_choices(choices: Iterable) -> str:
    return ", ".join(show(c) for c in choices)


def show(value: Any) -> str:
    """A value as TOML would spell it, for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return toml_str(value)
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "a table"
    return str(value)


def kind_of(value: Any) -> str:
    """What a TOML value is, for messages (``a table``, ``an array``, ...)."""
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


_TOML_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def toml_str(s: str) -> str:
    """A TOML basic string (escapes quotes, backslashes and control characters)."""
    out = []
    for ch in s:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
