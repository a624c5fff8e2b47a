"""Which Parquet columns hold the label, the dense features and each sparse feature.

A :class:`ColumnMapping` says it (``--columns FILE``, a JSON object; ``columns=`` in Python)::

    {"label": "click",
     "dense": ["i1", "i2", "i3"],
     "sparse": {"cat_0": "c1", "cat_1": "c2"},
     "dense_transform": "log3",
     "ids": "rows"}

Every key is optional:

- ``label``: the label column (default ``"label"``): integers, booleans or floats, each 0 or 1.
- ``dense``: the dense columns in the model's order (default: every column that is neither the
  label nor a sparse feature's, in the file's order; there must be as many as the model takes):
  integers or floats.
- ``sparse``: model feature -> column; a feature not named reads the column of its own name. A
  column holds one id (an integer column) or a bag of ids (a list of integers, empty allowed).
- ``dense_transform``: the transform the stored dense values **already had** (``"log3"`` or
  ``"none"``), as an ``.npz`` records it: they are read as stored. Without it the stored values
  are raw counts and the dense transform of the run (``--dense-transform``, default ``log3``) is
  applied while reading, as for Criteo text.
- ``ids``: ``"rows"`` (default): ids are table rows, and one at or beyond its table's size is an
  error; ``"hash"``: ids are hashes and take ``id % num_embeddings`` (TorchRec's convention for
  Criteo, what npy days and Criteo text do).

Nulls, negative ids, labels other than 0/1 and NaN/inf dense values are errors naming the file,
the column and the row. :func:`resolve_columns` checks one file's schema against a mapping and a
model; it needs the schema only (pyarrow types), not the rows.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from compress.data.dense_transform import DENSE_TRANSFORMS
from compress.errors import DataError

if TYPE_CHECKING:
    import pyarrow as pa

IdMode = Literal["rows", "hash"]
ID_MODES: tuple[str, ...] = ("rows", "hash")
#: The keys a column mapping may have.
KEYS: tuple[str, ...] = ("label", "dense", "sparse", "dense_transform", "ids")


@dataclass(frozen=True)
class ColumnMapping:
    """Which columns hold what (see the module docstring); the defaults read TorchRec-style names
    (``label``, the features' own names, the other columns as dense)."""

    label: str = "label"
    dense: tuple[str, ...] | None = None
    sparse: Mapping[str, str] = field(default_factory=dict)
    dense_transform: str | None = None
    ids: IdMode = "rows"

    def __post_init__(self) -> None:
        where = "column mapping"
        _check_name(self.label, f"{where}: label")
        if self.dense is not None:
            if isinstance(self.dense, str) or not isinstance(self.dense, Sequence):
                raise DataError(f"{where}: dense must be a list of column names")
            object.__setattr__(self, "dense", tuple(self.dense))
            for name in self.dense:
                _check_name(name, f"{where}: dense")
        if not isinstance(self.sparse, Mapping):
            raise DataError(f"{where}: sparse must map feature names to column names")
        for feature, column in self.sparse.items():
            _check_name(feature, f"{where}: sparse")
            _check_name(column, f"{where}: sparse[{feature!r}]")
        object.__setattr__(self, "sparse", dict(self.sparse))
        if self.dense_transform is not None and self.dense_transform not in DENSE_TRANSFORMS:
            raise DataError(
                f"{where}: dense_transform must be one of {', '.join(DENSE_TRANSFORMS)} or "
                f"absent, got {self.dense_transform!r}"
            )
        if self.ids not in ID_MODES:
            raise DataError(f"{where}: ids must be one of {', '.join(ID_MODES)}, got {self.ids!r}")

    def to_json(self) -> dict:
        """The mapping as the JSON object :func:`read_columns` reads."""
        return {
            "label": self.label,
            "dense": None if self.dense is None else list(self.dense),
            "sparse": dict(self.sparse),
            "dense_transform": self.dense_transform,
            "ids": self.ids,
        }


def mapping_from(value: ColumnMapping | Mapping[str, Any] | str | Path | None) -> ColumnMapping:
    """A :class:`ColumnMapping` from one, a dict of its keys, or a JSON file's path (``None``: the
    defaults)."""
    if value is None:
        return ColumnMapping()
    if isinstance(value, ColumnMapping):
        return value
    if isinstance(value, Mapping):
        return _from_dict(value, "column mapping")
    if isinstance(value, str | Path):
        return read_columns(value)
    raise DataError(
        f"columns must be a ColumnMapping, a dict or a JSON file's path, got {type(value).__name__}"
    )


def read_columns(path: str | Path) -> ColumnMapping:
    """The mapping in a JSON file; :class:`DataError` naming the file (and the key) when it is
    unreadable, not a JSON object, or holds an unknown key or a bad value."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot read the column mapping ({e})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise DataError(f"{p}: the column mapping has key {e.args[0]!r} twice") from None
    except (ValueError, RecursionError) as e:
        raise DataError(f"{p}: the column mapping is not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{p}: the column mapping must be a JSON object")
    return _from_dict(obj, str(p))


class _DuplicateKey(Exception):
    """A JSON object of the mapping names ``args[0]`` twice (the last would win silently)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _from_dict(obj: Mapping[str, Any], where: str) -> ColumnMapping:
    unknown = [k for k in obj if k not in KEYS]
    if unknown:
        raise DataError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(KEYS)})")
    try:
        return ColumnMapping(
            label=obj.get("label", "label"),
            dense=obj.get("dense"),
            sparse={} if obj.get("sparse") is None else obj["sparse"],
            dense_transform=obj.get("dense_transform"),
            ids=obj.get("ids", "rows"),
        )
    except DataError as e:
        raise DataError(f"{where}: {str(e).removeprefix('column mapping: ')}") from None


def _check_name(name: object, what: str) -> None:
    if not isinstance(name, str) or not name:
        raise DataError(f"{what}: column and feature names must be non-empty strings, got {name!r}")


@dataclass(frozen=True)
class ResolvedColumns:
    """The columns one model reads from a file: ``label``, ``dense`` (model order), ``sparse``
    (one per model feature, model order) and ``multi_hot`` (whether that column holds lists)."""

    label: str
    dense: tuple[str, ...]
    sparse: tuple[str, ...]
    multi_hot: tuple[bool, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """Every column read, each once, label first."""
        seen: dict[str, None] = {self.label: None}
        for name in (*self.dense, *self.sparse):
            seen.setdefault(name, None)
        return tuple(seen)


def resolve_columns(
    mapping: ColumnMapping,
    schema: pa.Schema,
    feature_names: Sequence[str],
    num_dense: int,
    source: str | Path,
) -> ResolvedColumns:
    """The columns of ``mapping`` in a file of ``schema`` for a model with ``feature_names`` and
    ``num_dense`` dense features; :class:`DataError` naming ``source`` and the column when one is
    missing or of a type that cannot hold what it is mapped to."""
    import pyarrow as pa

    have = list(schema.names)
    unknown = [f for f in mapping.sparse if f not in feature_names]
    if unknown:
        raise DataError(
            f"column mapping: sparse names feature {unknown[0]!r}, which the model does not have "
            f"(its features: {_listing(feature_names)})"
        )
    sparse = tuple(mapping.sparse.get(f, f) for f in feature_names)
    if mapping.label in sparse:
        raise DataError(
            f"column mapping: column {mapping.label!r} is both the label and a sparse feature's"
        )
    _field(schema, mapping.label, "the label", source, have)
    for feature, name in zip(feature_names, sparse, strict=True):
        _field(schema, name, f"feature {feature!r}", source, have)
    if mapping.dense is None:
        used = {mapping.label, *sparse}
        dense = tuple(n for n in have if n not in used)
        if len(dense) != num_dense:
            raise DataError(
                f"{source}: {len(dense)} columns are left for dense features "
                f"({_listing(dense)}) but the model takes {num_dense}; name them with a column "
                'mapping (--columns, key "dense")'
            )
    else:
        dense = tuple(mapping.dense)
        if len(dense) != num_dense:
            raise DataError(
                f"column mapping: dense names {len(dense)} columns, the model takes {num_dense}"
            )
        twice = next((n for j, n in enumerate(dense) if n in dense[:j]), None)
        if twice is not None:
            raise DataError(f"column mapping: dense names column {twice!r} twice")
        both = next((n for n in dense if n in sparse), None)
        if both is not None:
            raise DataError(
                f"column mapping: column {both!r} is both a dense and a sparse feature's"
            )
        if mapping.label in dense:
            raise DataError(
                f"column mapping: column {mapping.label!r} is both the label and a dense feature"
            )
    label_type = schema.field(mapping.label).type
    if not (pa.types.is_integer(label_type) or pa.types.is_boolean(label_type)) and not (
        pa.types.is_floating(label_type)
    ):
        raise DataError(
            f"{source}: column {mapping.label!r} (the label) has type {label_type}, expected "
            "integers, booleans or floats of 0 and 1"
        )
    for j, name in enumerate(dense):
        _field(schema, name, f"dense feature {j}", source, have)
        t = schema.field(name).type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
            raise DataError(
                f"{source}: column {name!r} (dense feature {j}) has type {t}, expected integers "
                "or floats"
            )
    multi_hot = []
    for feature, name in zip(feature_names, sparse, strict=True):
        t = schema.field(name).type
        listed = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
        inner = t.value_type if listed else t
        if not pa.types.is_integer(inner):
            raise DataError(
                f"{source}: column {name!r} (feature {feature!r}) has type {t}, expected integer "
                "ids or lists of integer ids"
            )
        multi_hot.append(listed)
    return ResolvedColumns(mapping.label, dense, sparse, tuple(multi_hot))


def _field(schema: pa.Schema, name: str, role: str, source: str | Path, have: list[str]) -> None:
    if schema.get_field_index(name) < 0:
        problem = "appears twice" if name in have else "is missing"
        raise DataError(
            f"{source}: column {name!r} ({role}) {problem} (the file has: {_listing(have)})"
        )


def _listing(names: Sequence[str], most: int = 12) -> str:
    shown = ", ".join(names[:most])
    return shown + (f", ... ({len(names)} in all)" if len(names) > most else "") or "none"
