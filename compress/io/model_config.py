"""Model configs: a DLRM's architecture as a JSON file, read beside a checkpoint or instead of one.

With a checkpoint, a config names each table's features, fixes the table order and states shapes
that the checkpoint must have (:func:`compress.io.architecture.infer_spec` checks them); every key
but a table's ``name`` is optional. Without a checkpoint (``plan --model-config``), the config is
the whole model and :func:`spec_from_model_config` needs every shape::

    {"model_class": "DLRM_DCN",
     "dense_in_features": 13,
     "dense_arch_layer_sizes": [512, 256, 128],
     "over_arch_layer_sizes": [1024, 1024, 512, 256, 1],
     "dcn_num_layers": 3, "dcn_low_rank_dim": 512,
     "tables": [{"name": "t_cat_0", "feature_names": ["cat_0"],
                 "num_embeddings": 40000000, "embedding_dim": 128}, ...]}

Keys every class has are :data:`MODEL_KEYS` (plus the free-text :data:`META_KEYS`) and, per
table, :data:`TABLE_KEYS`; the keys of a class's interaction are its strategy's
:attr:`~compress.io.dlrm_classes.base.DLRMClass.config_keys` (``DLRM``: none; ``DLRM_DCN``:
``dcn_num_layers``, ``dcn_low_rank_dim``; ``DLRM_Projection``:
``interaction_branch1_layer_sizes``, ``interaction_branch2_layer_sizes``), allowed only when
``model_class`` names that class. Keys are named as TorchRec's ``torchrec.models.dlrm``
constructors name their arguments. A table without ``feature_names`` (or with an empty list)
serves one feature named after it with a leading ``t_`` removed (:func:`default_feature_name`).

Built-in configs (:func:`builtin_model_names`) are the ``recipes/models/*.json`` files shipped with
the package; ``--model-config NAME`` names one as ``--recipe NAME`` names a built-in recipe
(:func:`resolve_model_config`). A model planned from a config alone is FP32 (tables and dense
layers), as TorchRec builds it.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

from compress.errors import ModelConfigError
from compress.io.dlrm_classes import known_classes, strategy_for
from compress.io.dlrm_classes.base import COUNT, SIZES, ConfigKey
from compress.io.model_spec import DLRMSpec, TableSpec, feature_input_problem
from compress.io.user_files import read_user_text

#: Model-config keys every class has, with their kind (``model_class`` is a class name).
MODEL_KEYS: dict[str, str] = {
    "model_class": "class",
    "dense_in_features": COUNT,
    "dense_arch_layer_sizes": SIZES,
    "over_arch_layer_sizes": SIZES,
    "tables": "tables",
}
#: Free-text keys that describe a config and change nothing (``format``: what ``inspect``
#: reports a checkpoint's format as).
META_KEYS = ("description", "reference", "format")
#: Keys of one entry of ``tables``, with their kind.
TABLE_KEYS: dict[str, str] = {
    "name": "name",
    "feature_names": "names",
    "num_embeddings": COUNT,
    "embedding_dim": COUNT,
}
#: The keys a config read without a checkpoint must hold (then the class's ``config_keys``).
REQUIRED_KEYS = (
    "model_class",
    "dense_in_features",
    "dense_arch_layer_sizes",
    "over_arch_layer_sizes",
)
REQUIRED_TABLE_KEYS = ("num_embeddings", "embedding_dim")

#: The package and folder of the built-in model configs.
BUILTIN_PACKAGE, BUILTIN_FOLDER = "recipes", "models"
SUFFIX = ".json"
_INT64_MAX = 2**63 - 1
_KIND_TEXT = {
    COUNT: "a positive integer",
    SIZES: "a non-empty list of positive integers",
    "name": "a non-empty string without '.'",
    "names": "a list of non-empty strings",
    "text": "a string",
}


# --------------------------------------------------------------------------------------------
# Built-in configs


def builtin_models_dir() -> Path:
    """The folder of the built-in model configs (``recipes/models``)."""
    return Path(str(resources.files(BUILTIN_PACKAGE))) / BUILTIN_FOLDER


def builtin_model_names() -> list[str]:
    """Names of the built-in model configs (the ``recipes/models/*.json`` files), sorted."""
    folder = builtin_models_dir()
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(SUFFIX)] for p in folder.iterdir() if p.name.endswith(SUFFIX))


def builtin_models() -> list[tuple[str, str]]:
    """``(name, description)`` of every built-in model config, sorted by name."""
    return [
        (name, load_model_config(builtin_models_dir() / f"{name}{SUFFIX}").get("description", ""))
        for name in builtin_model_names()
    ]


def resolve_model_config(name_or_path: str | Path) -> Path:
    """The file ``name_or_path`` names: an existing file, else a built-in config's name (a bare
    name without a ``.json`` suffix or path separator), else the path as given (reading it then
    says that it does not exist). An unknown bare name is a :class:`ModelConfigError` listing the
    built-ins."""
    path = Path(name_or_path)
    if path.exists():
        return path
    text = str(name_or_path)
    if text.endswith(SUFFIX) or "/" in text or "\\" in text or not text:
        return path
    names = builtin_model_names()
    if text in names:
        return builtin_models_dir() / f"{text}{SUFFIX}"
    raise ModelConfigError(
        f"{text}: no such model config file, nor a built-in model config "
        f"({', '.join(names) or 'none'})"
    )


# --------------------------------------------------------------------------------------------
# Reading


def load_model_config(name_or_path: str | Path) -> dict:
    """Read and check a model-config JSON file, or a built-in config by name
    (:func:`resolve_model_config`): known keys only (a typo gets a suggestion), values of the
    right kind, table and feature names unique. Shapes stay optional here; a config read without
    a checkpoint needs them all (:func:`spec_from_model_config`). The file's path is kept under
    ``"_source"`` for messages."""
    path = resolve_model_config(name_or_path)
    where = str(path)
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise ModelConfigError(f"{where}: expected a JSON object")
    model_class = cfg.get("model_class")
    if "model_class" in cfg and model_class not in known_classes():
        raise ModelConfigError(f"{where}: model_class must be one of {known_classes()}")
    class_keys = {k.name: k.kind for k in _class_keys(model_class)} if model_class else {}
    allowed = {**MODEL_KEYS, **dict.fromkeys(META_KEYS, "text"), **class_keys}
    for key in cfg:
        if key not in allowed:
            raise ModelConfigError(f"{where}: {_unknown_key(key, allowed, model_class)}")
    for key, kind in allowed.items():
        if key in cfg and kind in _KIND_TEXT:
            _check_value(cfg[key], kind, where, key)
    tables = cfg.get("tables", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) and "name" in t for t in tables):
        raise ModelConfigError(f"{where}: 'tables' must be a list of objects with a 'name'")
    if "tables" in cfg and not tables:
        raise ModelConfigError(
            f"{where}: 'tables' is an empty list: list the model's tables, or leave the key out"
        )
    for i, t in enumerate(tables):
        _check_table(t, i, where)
    _check_unique(tables, where)
    cfg["_source"] = where
    return cfg


def _read_json(path: Path) -> Any:
    text = read_user_text(path, "model config", ModelConfigError, file_kind="model config file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e
    except RecursionError as e:
        raise ModelConfigError(f"{path}: invalid JSON: nesting too deep") from e


def _class_keys(model_class: str) -> tuple[ConfigKey, ...]:
    return strategy_for(model_class).config_keys


def _unknown_key(key: str, allowed: Mapping[str, str], model_class: str | None) -> str:
    """The message for a key no config of ``model_class`` has: the class it belongs to, or the
    closest allowed key."""
    owners = [c for c in known_classes() if key in {k.name for k in _class_keys(c)}]
    if owners:
        return f"{key!r} is a {' / '.join(owners)} key; " + (
            f"this config's model_class is {model_class}" if model_class else "set model_class"
        )
    close = difflib.get_close_matches(key, list(allowed), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f" (allowed: {', '.join(allowed)})"
    return f"unknown key {key!r}{hint}"


def _check_table(t: dict, i: int, where: str) -> None:
    label = f"tables[{i}]"
    _check_value(t["name"], "name", where, f"{label}.name")
    label = f"{label} ({t['name']})"
    for key in t:
        if key not in TABLE_KEYS:
            close = difflib.get_close_matches(key, list(TABLE_KEYS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ModelConfigError(f"{where}: {label}: unknown key {key!r}{hint}")
        _check_value(t[key], TABLE_KEYS[key], where, f"{label}: {key}")


def _check_unique(tables: list[dict], where: str) -> None:
    seen_tables: set[str] = set()
    seen_features: dict[str, str] = {}
    for t in tables:
        if t["name"] in seen_tables:
            raise ModelConfigError(f"{where}: table {t['name']} is listed twice")
        seen_tables.add(t["name"])
        for f in t.get("feature_names") or ():
            if f in seen_features:
                raise ModelConfigError(
                    f"{where}: feature {f} is served by tables {seen_features[f]} and {t['name']}; "
                    "a feature looks up one table"
                )
            seen_features[f] = t["name"]
    features = [
        f for t in tables for f in t.get("feature_names") or (default_feature_name(t["name"]),)
    ]
    problem = feature_input_problem(features)
    if problem is not None:
        raise ModelConfigError(f"{where}: {problem}; give the features distinct names")


def _check_value(value: Any, kind: str, where: str, key: str) -> None:
    if not _is_kind(value, kind):
        raise ModelConfigError(f"{where}: {key} must be {_KIND_TEXT[kind]}, not {value!r}"[:300])


def _is_kind(value: Any, kind: str) -> bool:
    if kind == COUNT:
        return _is_count(value)
    if kind == SIZES:
        return isinstance(value, list) and bool(value) and all(_is_count(v) for v in value)
    if kind == "name":
        return isinstance(value, str) and bool(value) and "." not in value
    if kind == "names":
        return isinstance(value, list) and all(isinstance(v, str) and v for v in value)
    if kind == "text":
        return isinstance(value, str)
    raise AssertionError(kind)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= _INT64_MAX


# --------------------------------------------------------------------------------------------
# A config as the whole model


def read_config_spec(name_or_path: str | Path) -> DLRMSpec:
    """The model a config file or built-in config describes, with no checkpoint: shapes only,
    nothing allocated (:func:`load_model_config`, then :func:`spec_from_model_config`)."""
    return spec_from_model_config(load_model_config(name_or_path))


def spec_from_model_config(cfg: Mapping[str, Any]) -> DLRMSpec:
    """The :class:`DLRMSpec` of a config read by :func:`load_model_config` that states the whole
    model (FP32, no key prefix). A missing key is a :class:`ModelConfigError` naming it and the
    file; so are shapes that TorchRec cannot build (tables of several dims, a bottom MLP that
    does not end at the embedding dim, the class's own constraints)."""
    where = cfg.get("_source", "model config")
    for key in REQUIRED_KEYS:
        _require(cfg, key, where)
    strategy = strategy_for(cfg["model_class"])
    for key in strategy.config_keys:
        _require(cfg, key.name, where, f"{strategy.name}: {key.help}")
    tables = cfg.get("tables") or []
    if not tables:
        raise ModelConfigError(
            f"{where}: missing key 'tables' (a model config without a checkpoint lists every table)"
        )
    for i, t in enumerate(tables):
        for key in REQUIRED_TABLE_KEYS:
            if key not in t:
                raise ModelConfigError(
                    f"{where}: tables[{i}] ({t['name']}): missing key {key!r} (a model config "
                    "without a checkpoint states every table's shape)"
                )
    dims = sorted({t["embedding_dim"] for t in tables})
    if len(dims) > 1:
        raise ModelConfigError(
            f"{where}: tables have embedding_dim {dims}; a TorchRec DLRM's tables share one dim"
        )
    bottom = tuple(cfg["dense_arch_layer_sizes"])
    if bottom[-1] != dims[0]:
        raise ModelConfigError(
            f"{where}: dense_arch_layer_sizes ends at {bottom[-1]} but the tables have "
            f"embedding_dim {dims[0]} (the bottom MLP ends at the embedding dim)"
        )
    spec = DLRMSpec(
        model_class=strategy.name,
        tables=tuple(
            TableSpec(
                name=t["name"],
                num_embeddings=t["num_embeddings"],
                embedding_dim=t["embedding_dim"],
                feature_names=tuple(t.get("feature_names") or (default_feature_name(t["name"]),)),
            )
            for t in tables
        ),
        dense_in_features=cfg["dense_in_features"],
        dense_arch_layer_sizes=bottom,
        over_arch_layer_sizes=tuple(cfg["over_arch_layer_sizes"]),
        **{k.name: _spec_value(cfg[k.name], k.kind) for k in strategy.config_keys},
    )
    problem = strategy.shape_problem(spec)
    if problem is not None:
        raise ModelConfigError(f"{where}: {problem}")
    return replace(spec, dense_bytes=dense_parameter_count(spec) * 4)


def _require(cfg: Mapping[str, Any], key: str, where: str, what: str = "") -> None:
    if key not in cfg:
        about = f"{what}; " if what else ""
        raise ModelConfigError(
            f"{where}: missing key {key!r} ({about}a model config without a checkpoint states the "
            "whole model)"
        )


def _spec_value(value: Any, kind: str) -> Any:
    return tuple(value) if kind == SIZES else value


def dense_parameter_count(spec: DLRMSpec) -> int:
    """Values in every dense tensor of ``spec``'s model: its linears' weights and biases and its
    cross layers (what a checkpoint of it holds besides the tables)."""
    strategy = strategy_for(spec.model_class)
    linears = [layer for group in strategy.linear_groups(spec).values() for layer in group]
    cross = [s for layer in strategy.cross_layers(spec) for s in layer.shapes().values()]
    return sum((layer.in_features + 1) * layer.out_features for layer in linears) + sum(
        math.prod(s) for s in cross
    )


# --------------------------------------------------------------------------------------------
# Writing


def spec_to_model_config(spec: DLRMSpec) -> dict:
    """The model-config JSON object that reproduces ``spec``'s names and order (and its table
    shapes, to check)."""
    return {
        "model_class": spec.model_class,
        "dense_in_features": spec.dense_in_features,
        "tables": [
            {
                "name": t.name,
                "feature_names": list(t.feature_names),
                "num_embeddings": t.num_embeddings,
                "embedding_dim": t.embedding_dim,
            }
            for t in spec.tables
        ],
    }


def full_model_config(spec: DLRMSpec) -> dict:
    """The model config that describes all of ``spec`` (what :func:`spec_from_model_config`
    reads back without a checkpoint): :func:`spec_to_model_config` plus the layer sizes and the
    class's own keys."""
    base = spec_to_model_config(spec)
    tables = base.pop("tables")
    return {
        **base,
        "dense_arch_layer_sizes": list(spec.dense_arch_layer_sizes),
        "over_arch_layer_sizes": list(spec.over_arch_layer_sizes),
        **{
            k.name: _json_value(getattr(spec, k.name))
            for k in strategy_for(spec.model_class).config_keys
        },
        "tables": tables,
    }


def _json_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def default_feature_name(table_name: str) -> str:
    """``t_cat_0`` -> ``cat_0``; any other name is its own feature name."""
    return table_name[2:] if table_name.startswith("t_") and len(table_name) > 2 else table_name
