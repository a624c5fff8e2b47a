"""Infer a DLRM's architecture (:class:`~compress.io.model_spec.DLRMSpec`) from its state-dict tensors.

Only tensor names and shapes are read, so this works on memory-mapped or ``meta`` tensors.

- Tables: ``sparse_arch.embedding_bag_collection.embedding_bags.<table>.weight``, in the order the
  state dict lists them, which is the order the model declared them (and so the order of its
  features in the interaction). A ``torch.distributed.checkpoint`` directory keeps that order for
  what rank 0 wrote (see :mod:`compress.io.checkpoint`); when some tables were written only by other
  ranks their order is unknown and a model config must give it (several tables) or the model is
  refused, never rebuilt in a guessed order. A model config's table list overrides any order.
- Weights are float32, float16 or bfloat16 (the latter two are read as float32); other dtypes are
  refused, naming the key.
- Bottom MLP: ``dense_arch.model._mlp.<i>._linear.weight``; top MLP: ``over_arch.model.0._mlp.<i>``
  then ``over_arch.model.1`` (the key templates are in :mod:`compress.io.dlrm_classes.base`).
- Interaction: the first registered class whose strategy claims the ``inter_arch.*`` keys
  (``crossnet``: ``DLRM_DCN``; ``interaction_branch1``/``2``: ``DLRM_Projection``), else the
  dot-product ``DLRM`` (:func:`compress.io.dlrm_classes.detect`). The strategy infers the number
  of sparse features F from the interaction's input width and the interaction's parameters.
- Feature names are not in a state dict. Without a model config each table serves one feature named
  after it with a leading ``t_`` removed (``t_cat_0`` -> ``cat_0``; TorchRec's DLRM examples name
  tables ``t_<feature>``); a table named otherwise gives its own name to its feature.

A model config (JSON, :mod:`compress.io.model_config`) can name features, fix the table order,
and state shapes to check (table shapes, MLP sizes, the class's interaction keys)::

    {"model_class": "DLRM",
     "tables": [{"name": "t_cat_0", "feature_names": ["cat_0"], "num_embeddings": 100,
                 "embedding_dim": 16}, ...]}
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import torch

from compress.errors import CheckpointError, ModelConfigError
from compress.io.dlrm_classes import detect, strategy_for
from compress.io.dlrm_classes.base import (
    DENSE_GROUP,
    DENSE_MLP,
    EBC_PREFIX,
    OVER_FINAL,
    OVER_GROUP,
    OVER_MLP,
    mlp_weights,
    table_of_key,
    table_weight_key,
)
from compress.io.model_config import (  # noqa: F401  (re-exported: the config format's home)
    default_feature_name,
    load_model_config,
    spec_to_model_config,
)
from compress.io.model_spec import DLRMSpec, TableSpec


def infer_spec(
    tensors: dict[str, torch.Tensor],
    *,
    source: str,
    model_config: dict | None = None,
    unordered_keys: Collection[str] = frozenset(),
    config_searched: Sequence[str | Path] = (),
    lenient: bool = False,
) -> DLRMSpec:
    """Architecture of the DLRM whose state dict is ``tensors``.

    ``source`` names the checkpoint in error messages. ``unordered_keys`` are keys whose position
    in ``tensors`` is not the saved order (:attr:`compress.io.checkpoint.Checkpoint.unordered_keys`);
    ``config_searched`` lists where a model config was looked for, for the error that asks for one.
    ``lenient`` (for writing a config template) keeps an unknown table order as listed and gives
    every table one default feature even when the interaction takes another number.

    The parts every class shares are read here; the interaction by the class's strategy
    (:func:`compress.io.dlrm_classes.detect`). Raises :class:`CheckpointError` when the tensors
    are not a TorchRec DLRM, :class:`ModelConfigError` when ``model_config`` disagrees or is
    needed and missing.
    """
    prefix = _find_prefix(tensors, source)
    sd = _strip(tensors, prefix, source)
    tables = _tables(sd, source)
    config_order = [t["name"] for t in (model_config or {}).get("tables", []) if "name" in t]
    unordered = [n for n, _, _ in tables if prefix + table_weight_key(n) in unordered_keys]
    if unordered and len(tables) > 1 and not config_order and not lenient:
        raise ModelConfigError(_order_unknown_message(source, len(tables), config_searched))
    dim = tables[0][2]
    if any(d != dim for _, _, d in tables):
        raise CheckpointError(
            f"{source}: tables have different embedding dims {sorted({d for *_, d in tables})}"
        )
    dense_w, over_sizes, over_in = _mlps(sd, prefix, source, dim)
    strategy = detect(sd, source, (model_config or {}).get("model_class"))
    interaction = strategy.infer_interaction(sd, dim=dim, over_in=over_in, source=source)
    names = [n for n, _, _ in tables]
    feature_names = _feature_names(names, interaction.num_features, model_config, source, lenient)
    if model_config is not None:
        _check_config(model_config, strategy.name, tables, dense_w[0].shape[1], source)
        if config_order:
            by_name = {t[0]: t for t in tables}
            tables = [by_name[n] for n in config_order]
    spec = DLRMSpec(
        model_class=strategy.name,
        tables=tuple(
            TableSpec(n, r, d, tuple(feature_names[n]), _dtype_name(sd[table_weight_key(n)]))
            for n, r, d in tables
        ),
        dense_in_features=dense_w[0].shape[1],
        dense_arch_layer_sizes=tuple(w.shape[0] for w in dense_w),
        over_arch_layer_sizes=over_sizes,
        key_prefix=prefix,
        dense_dtype=_dtype_name(dense_w[0]),
        dense_bytes=sum(
            t.numel() * t.element_size() for k, t in sd.items() if not k.startswith(EBC_PREFIX)
        ),
        **interaction.params,
    )
    if model_config is not None:
        _check_layer_sizes(model_config, spec, source)
    return spec


def _strip(tensors: dict[str, torch.Tensor], prefix: str, source: str) -> dict[str, torch.Tensor]:
    """The state dict without ``prefix``, its dtypes checked; keys outside it are an error."""
    stray = [k for k in tensors if not k.startswith(prefix)]
    if stray:
        raise CheckpointError(
            f"{source}: {len(stray)} key(s) outside the DLRM ({prefix or 'no prefix'}): "
            f"{_preview(stray)}"
        )
    sd = {k[len(prefix) :]: v for k, v in tensors.items()}
    _check_dtypes(sd, prefix, source)
    return sd


def _mlps(
    sd: dict[str, torch.Tensor], prefix: str, source: str, dim: int
) -> tuple[list[torch.Tensor], tuple[int, ...], int]:
    """The bottom MLP's weights, the top MLP's sizes and the top MLP's input width."""
    dense_w = mlp_weights(sd, DENSE_MLP, source, DENSE_GROUP)
    over_w = mlp_weights(sd, OVER_MLP, source, OVER_GROUP, required=False)
    final = f"{OVER_FINAL}.weight"
    if final not in sd:
        raise CheckpointError(f"{source}: missing {prefix}{final} (not a TorchRec DLRM)")
    over_sizes = tuple(w.shape[0] for w in over_w) + (sd[final].shape[0],)
    over_in = over_w[0].shape[1] if over_w else sd[final].shape[1]
    if dense_w[-1].shape[0] != dim:
        raise CheckpointError(
            f"{source}: bottom MLP ends at {dense_w[-1].shape[0]} but tables have dim {dim}"
        )
    return dense_w, over_sizes, over_in


# --------------------------------------------------------------------------------------------


def _find_prefix(tensors: dict[str, torch.Tensor], source: str) -> str:
    """What every key carries before ``sparse_arch.`` (``"model."`` for ``DLRMTrain``)."""
    for key in tensors:
        i = key.find(EBC_PREFIX)
        if i >= 0 and (i == 0 or key[i - 1] == "."):
            return key[:i]
    raise CheckpointError(
        f"{source}: not a TorchRec DLRM state dict (no '{EBC_PREFIX}<table>.weight' keys; "
        f"first keys: {list(tensors)[:3]})"
    )


def _tables(sd: dict[str, torch.Tensor], source: str) -> list[tuple[str, int, int]]:
    out = []
    for key, t in sd.items():
        table = table_of_key(key)
        if table is not None:
            if t.dim() != 2:
                raise CheckpointError(
                    f"{source}: table {table} has shape {tuple(t.shape)}, expected 2-D"
                )
            out.append((table, int(t.shape[0]), int(t.shape[1])))
    return out


def _order_unknown_message(source: str, n_tables: int, searched: Sequence[str | Path]) -> str:
    where = f" (looked for {', '.join(map(str, searched))})" if searched else ""
    return (
        f"{source}: this distributed checkpoint was written by several ranks and does not record "
        f"the order in which the model declared its {n_tables} tables, which fixes the order of "
        "its features; write a model config listing the tables in that order: run "
        f"`dqrm-compress inspect {source} --write-config {Path(source) / 'model_config.json'}` "
        f"and edit its table order{where}"
    )


READ_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_dtypes(sd: dict[str, torch.Tensor], prefix: str, source: str) -> None:
    for key, t in sd.items():
        if t.dtype not in READ_DTYPES:
            table = table_of_key(key)
            what = f"table {table}" if table is not None else f"{prefix}{key}"
            raise CheckpointError(
                f"{source}: {what} has dtype {_dtype_name(t)}; float32, float16 and bfloat16 "
                "weights are read (convert the state dict with `v.float()` and save it again)"
            )


def _feature_names(
    names: list[str], num_features: int, cfg: dict | None, source: str, lenient: bool = False
) -> dict[str, list[str]]:
    if cfg is not None and cfg.get("tables"):
        given = {t["name"]: t.get("feature_names") for t in cfg["tables"]}
        where = cfg.get("_source", "model config")
        missing = [n for n in names if n not in given]
        extra = [n for n in given if n not in names]
        if missing or extra:
            raise ModelConfigError(
                f"{where}: tables disagree with {source}: "
                + "; ".join(
                    s
                    for s in (
                        f"not in config: {missing}" if missing else "",
                        f"not in checkpoint: {extra}" if extra else "",
                    )
                    if s
                )
            )
        out = {n: list(given[n]) if given[n] else [default_feature_name(n)] for n in names}
        total = sum(len(v) for v in out.values())
        if total != num_features:
            raise ModelConfigError(
                f"{where}: config names {total} features but {source}'s interaction takes {num_features}"
            )
        return out
    if num_features != len(names) and not lenient:
        raise ModelConfigError(
            f"{source}: the model's interaction takes {num_features} features over {len(names)} tables; "
            "some tables serve several features: give --model-config with each table's feature_names"
        )
    return {n: [default_feature_name(n)] for n in names}


def _check_config(cfg: dict, model_class: str, tables: list, dense_in: int, source: str) -> None:
    where = cfg.get("_source", "model config")
    if "model_class" in cfg and cfg["model_class"] != model_class:
        raise ModelConfigError(
            f"{where}: model_class {cfg['model_class']} but {source} is a {model_class}"
        )
    if "dense_in_features" in cfg and cfg["dense_in_features"] != dense_in:
        raise ModelConfigError(
            f"{where}: dense_in_features {cfg['dense_in_features']} but {source} has {dense_in}"
        )
    shapes = {n: (r, d) for n, r, d in tables}
    for t in cfg.get("tables", []):
        r, d = shapes[t["name"]]
        for key, actual in (("num_embeddings", r), ("embedding_dim", d)):
            if key in t and t[key] != actual:
                raise ModelConfigError(
                    f"{where}: table {t['name']}: {key} {t[key]} but {source} has {actual}"
                )


def _check_layer_sizes(cfg: dict, spec: DLRMSpec, source: str) -> None:
    """The MLP sizes and the class's interaction keys (its strategy's ``config_keys``) that
    ``cfg`` states must be ``spec``'s, inferred from the checkpoint ``source``."""
    where = cfg.get("_source", "model config")
    keys = ["dense_arch_layer_sizes", "over_arch_layer_sizes"]
    keys += [k.name for k in strategy_for(spec.model_class).config_keys]
    for key in keys:
        if key not in cfg:
            continue
        actual = getattr(spec, key)
        stated = tuple(cfg[key]) if isinstance(actual, tuple) else cfg[key]
        if stated != actual:
            shown = list(actual) if isinstance(actual, tuple) else actual
            raise ModelConfigError(f"{where}: {key} {cfg[key]} but {source} has {shown}")


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _preview(items: Sequence[str], limit: int = 4) -> str:
    head = ", ".join(map(repr, items[:limit]))
    return head + (f", ... ({len(items)} in all)" if len(items) > limit else "")
