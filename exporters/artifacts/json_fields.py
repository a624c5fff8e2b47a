"""Typed reading of JSON objects that records every problem with its JSON path.

The manifest parser (:mod:`exporters.artifacts.manifest_parse`) reads each section through a
:class:`JsonObject`: ``get(key, kind)`` returns the value when it is of that :class:`Kind`, else
``None`` with a line ``<file>: <JSON path>: <what>`` added to the shared :class:`Problems`, so one
pass lists every problem of a file instead of stopping at the first.

Example::

    problems = Problems("manifest.json")
    top = JsonObject(problems, {"tables": [{"name": ""}]}, "")
    for t in top.each("tables"):
        t.get("name", NAME)
    problems.lines  # ["manifest.json: tables[0].name: expected a non-empty string, got ''"]
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Kind:
    """What a value must be: ``what`` in words, ``test`` the check, and optionally ``explain``,
    a more precise problem line for some values that fail (``None``: the generic one)."""

    what: str
    test: Callable[[Any], bool]
    explain: Callable[[Any], str | None] | None = None


def is_int(v: Any) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(v, int) and not isinstance(v, bool)


INT = Kind("an integer", is_int)
POS_INT = Kind("a positive integer", lambda v: is_int(v) and v > 0)
NONNEG_INT = Kind("a non-negative integer", lambda v: is_int(v) and v >= 0)
STR = Kind("a string", lambda v: isinstance(v, str))
NAME = Kind("a non-empty string", lambda v: isinstance(v, str) and v != "")
OBJ = Kind("an object", lambda v: isinstance(v, dict))
LIST = Kind("a list", lambda v: isinstance(v, list))
BOOL = Kind("true or false", lambda v: isinstance(v, bool))
SHA256 = Kind("a sha256 hex digest", lambda v: isinstance(v, str) and bool(SHA256_HEX.fullmatch(v)))
NONNEG_NUMBER = Kind(
    "a non-negative number",
    lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf,
)


def show(v: Any, limit: int = 60) -> str:
    """``v`` as a problem line quotes it: ``repr`` for strings, booleans and ``None``, JSON
    otherwise, cut to ``limit`` characters."""
    text = repr(v) if isinstance(v, (str, bool)) or v is None else json.dumps(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Problems:
    """Problem lines of one file, each ``<where>: <JSON path>: <what>``."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.lines: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.lines.append(
            f"{self.where}: {path}: {message}" if path else f"{self.where}: {message}"
        )


class JsonObject:
    """Reads the keys of one JSON object at ``path``; ``ok`` turns False with any problem."""

    def __init__(self, problems: Problems, value: Any, path: str) -> None:
        self.problems, self.path, self.ok = problems, path, True
        if isinstance(value, dict):
            self.value: dict = value
        else:
            self.fail("", f"expected an object, got {show(value)}")
            self.value = {}

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, message: str) -> None:
        self.ok = False
        self.problems.add(self.at(key) if key else self.path, message)

    def get(self, key: str, kind: Kind, *, optional: bool = False, nullable: bool = False) -> Any:
        """The value of ``key`` if it is of ``kind`` (or null when ``nullable``), else ``None``
        with a problem recorded (a missing ``optional`` key is ``None`` without one)."""
        if key not in self.value:
            if not optional:
                self.fail(key, "missing")
            return None
        v = self.value[key]
        if v is None and nullable:
            return None
        if not kind.test(v):
            detail = kind.explain(v) if kind.explain is not None else None
            self.fail(
                key,
                detail or f"expected {kind.what}{' or null' if nullable else ''}, got {show(v)}",
            )
            return None
        return v

    def list_of(
        self, key: str, kind: Kind, *, nullable: bool = False, optional: bool = False
    ) -> tuple | None:
        """A list of ``kind`` values as a tuple, or ``None`` (problem recorded)."""
        items = self.get(key, LIST, nullable=nullable, optional=optional)
        if items is None:
            return None
        good = True
        for i, v in enumerate(items):
            if not kind.test(v):
                self.fail(f"{key}[{i}]", f"expected {kind.what}, got {show(v)}")
                good = False
        return tuple(items) if good else None

    def one_of(self, key: str, allowed: tuple, *, nullable: bool = False) -> Any:
        """The value of ``key`` when it is one of ``allowed`` (a string or integer), else
        ``None`` with a problem recorded."""
        if key not in self.value:
            self.fail(key, "missing")
            return None
        v = self.value[key]
        if v is None and nullable:
            return None
        if not isinstance(v, (str, int)) or isinstance(v, bool) or v not in allowed:
            self.fail(key, f"expected one of {', '.join(map(repr, allowed))}, got {show(v)}")
            return None
        return v

    def child(self, key: str, *, optional: bool = False) -> JsonObject:
        """The object under ``key`` (an empty one, problem recorded, when it is not an object;
        an empty one without a problem when an ``optional`` key is missing)."""
        return JsonObject(self.problems, self.get(key, OBJ, optional=optional) or {}, self.at(key))

    def each(self, key: str, *, optional: bool = False) -> Iterator[JsonObject]:
        """A :class:`JsonObject` for every item of the list under ``key`` (path ``key[i]``); once
        the caller has read an item, its problems count against this object (``ok``)."""
        for i, raw in enumerate(self.get(key, LIST, optional=optional) or ()):
            item = JsonObject(self.problems, raw, f"{self.at(key)}[{i}]")
            yield item
            self.ok &= item.ok
