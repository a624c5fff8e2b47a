"""What every TorchRec DLRM class shares, and the interface one class's strategy fills in.

``torchrec.models.dlrm`` builds ``DLRM``, ``DLRM_DCN`` and ``DLRM_Projection`` from the same
parts: a sparse arch (an ``EmbeddingBagCollection``), a dense (bottom) MLP, an interaction and an
over (top) arch. Only the interaction differs. The state-dict keys of the shared parts are
defined here, once; :class:`DLRMClass` is the interface one class's strategy implements for its
interaction (its keys, how its shape is inferred from a state dict, its TorchRec constructor
arguments, its output width, its linear layers and cross layers, its graph interaction's name).

Key templates (without the ``model.`` prefix of a ``DLRMTrain`` wrapper, :data:`TRAIN_PREFIX`):

- tables: ``sparse_arch.embedding_bag_collection.embedding_bags.<table>.weight``
  (:func:`table_weight_key`);
- bottom MLP: ``dense_arch.model._mlp.<i>._linear.{weight,bias}`` (:data:`DENSE_MLP`);
- top MLP: ``over_arch.model.0._mlp.<i>._linear.*`` (:data:`OVER_MLP`) then the final
  ``over_arch.model.1.*`` (:data:`OVER_FINAL`);
- interaction: ``inter_arch.*``, per class (see the class's module).

Nothing here or in the built-in strategies imports torch at import time (the TorchRec class a
strategy builds is imported on first use of :attr:`DLRMClass.module_type`): the manifest reader
and ONNX Runtime serving ask strategies about a class without torch.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from compress.data.dataset import Dataset
from compress.errors import CheckpointError
from compress.io.model_spec import DLRMSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

#: The DLRM submodule that holds the embedding tables (every other one is dense).
SPARSE_ARCH = "sparse_arch"
#: Module path of the embedding-bag collection inside a DLRM.
EBC_PATH = f"{SPARSE_ARCH}.embedding_bag_collection"
#: What every table's weight key starts with (then ``<table>.weight``).
EBC_PREFIX = f"{EBC_PATH}.embedding_bags."
#: Module path template of the bottom MLP's linears (``{}``: the layer index).
DENSE_MLP = "dense_arch.model._mlp.{}._linear"
#: Module path template of the top MLP's linears before the last one.
OVER_MLP = "over_arch.model.0._mlp.{}._linear"
#: Module path of the top MLP's last linear (no activation: it gives the logits).
OVER_FINAL = "over_arch.model.1"
#: The DLRM submodules that hold dense (non-embedding) state.
DENSE_ROOTS = ("dense_arch", "inter_arch", "over_arch")
#: Module path that every interaction key starts with.
INTER_ARCH = "inter_arch"
#: The key prefix of a ``DLRMTrain`` wrapper's state dict.
TRAIN_PREFIX = "model."
#: Names of the linear groups every class has (:meth:`DLRMClass.linear_groups`).
DENSE_GROUP, OVER_GROUP = "dense_arch", "over_arch"

_TABLE_RE = re.compile(re.escape(EBC_PREFIX) + r"(?P<table>[^.]+)\.weight$")


def table_weight_key(table: str) -> str:
    """State-dict key of a table's weight inside a (prefix-free) DLRM."""
    return f"{EBC_PREFIX}{table}.weight"


def table_of_key(key: str) -> str | None:
    """The table whose weight ``key`` (prefix-free) is, else ``None``."""
    m = _TABLE_RE.match(key)
    return m["table"] if m else None


def mlp_key_pattern(template: str) -> re.Pattern[str]:
    """``"a.b.{}._linear"`` -> a pattern of its ``weight``/``bias`` keys; group 1 is the index."""
    head, tail = (re.escape(part) for part in template.split("{}"))
    return re.compile(rf"{head}(\d+){tail}\.(weight|bias)$")


def ebc_of(dlrm: nn.Module) -> nn.Module:
    """The embedding-bag collection (or the module standing in for it) of a DLRM."""
    return dlrm.get_submodule(EBC_PATH)


def set_ebc(dlrm: nn.Module, ebc: nn.Module) -> None:
    """Put ``ebc`` in the place of ``dlrm``'s embedding-bag collection."""
    parent, _, name = EBC_PATH.rpartition(".")
    setattr(dlrm.get_submodule(parent), name, ebc)


def unwrap(module: nn.Module) -> tuple[nn.Module, str]:
    """``(the DLRM, state-dict key prefix)``: a ``DLRMTrain``'s ``model`` with :data:`TRAIN_PREFIX`."""
    from torchrec.models.dlrm import DLRMTrain

    if isinstance(module, DLRMTrain):
        return module.model, TRAIN_PREFIX
    return module, ""


@dataclass(frozen=True)
class LinearLayer:
    """One ``nn.Linear`` of the model: state-dict name (without the key prefix) and sizes."""

    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class CrossLayerKeys:
    """State-dict keys and width of one low-rank cross layer (TorchRec ``LowRankCrossNet``):
    ``W_kernel`` ``[width, rank]``, ``V_kernel`` ``[rank, width]``, ``bias`` ``[width]``."""

    w_kernel: str
    v_kernel: str
    bias: str
    width: int
    rank: int

    @property
    def keys(self) -> tuple[str, str, str]:
        return (self.w_kernel, self.v_kernel, self.bias)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            self.w_kernel: (self.width, self.rank),
            self.v_kernel: (self.rank, self.width),
            self.bias: (self.width,),
        }


#: Kinds of a model-config value (:class:`ConfigKey`): a positive integer; a non-empty list of them.
COUNT, SIZES = "count", "sizes"


@dataclass(frozen=True)
class ConfigKey:
    """One model-config key of a class's interaction (:attr:`DLRMClass.config_keys`): named as the
    :class:`~compress.io.model_spec.DLRMSpec` field and the TorchRec constructor argument it
    sets; ``kind`` is :data:`COUNT` or :data:`SIZES`; ``help`` says what it is, for messages."""

    name: str
    kind: str
    help: str


@dataclass(frozen=True)
class InteractionShape:
    """What a state dict says about one class's interaction: the number of sparse features it
    takes and its :class:`~compress.io.model_spec.DLRMSpec` parameters (``dcn_num_layers``...)."""

    num_features: int
    params: dict[str, Any] = field(default_factory=dict)


def mlp_weights(
    sd: Mapping[str, torch.Tensor], template: str, source: str, what: str, required: bool = True
) -> list[torch.Tensor]:
    """The weights of the linears ``template.format(i)``, i = 0..n-1, checked to chain;
    :class:`CheckpointError` when they are missing (``required``), misnumbered or do not chain."""
    pattern = mlp_key_pattern(template)
    layers: dict[int, torch.Tensor] = {}
    for key, t in sd.items():
        m = pattern.match(key)
        if m and m.group(2) == "weight":
            layers[int(m.group(1))] = t
    if required and not layers:
        raise CheckpointError(f"{source}: no {what} MLP layers found (not a TorchRec DLRM)")
    if sorted(layers) != list(range(len(layers))):
        raise CheckpointError(
            f"{source}: {what} MLP layers are not numbered 0..n: {sorted(layers)}"
        )
    weights = [layers[i] for i in range(len(layers))]
    for a, b in zip(weights, weights[1:], strict=False):
        if a.shape[0] != b.shape[1]:
            raise CheckpointError(
                f"{source}: {what} MLP layer widths do not chain ({tuple(a.shape)} -> {tuple(b.shape)})"
            )
    return weights


def exact_div(a: int, b: int, source: str, what: str) -> int:
    """``a // b``; :class:`CheckpointError` when ``a`` is not a multiple of the embedding dim ``b``."""
    if a % b:
        raise CheckpointError(f"{source}: {what} {a} is not a multiple of the embedding dim {b}")
    return a // b


def chain(template: str, in_features: int, sizes: Sequence[int]) -> tuple[LinearLayer, ...]:
    """Linears ``template.format(i)`` of ``sizes`` outputs, each taking the previous one's."""
    out, width = [], in_features
    for i, size in enumerate(sizes):
        out.append(LinearLayer(template.format(i), width, size))
        width = size
    return tuple(out)


class DLRMClass(ABC):
    """One TorchRec DLRM class: everything the project knows about it that the others do not share.

    Subclasses set the class attributes and implement the abstract methods; one instance is
    registered by :func:`compress.io.dlrm_classes.register` under :attr:`name`.
    """

    #: The TorchRec class name, as in a model config and a manifest (``model_class``).
    name: ClassVar[str]
    #: The ``torch.nn.Module`` class it builds (subclasses of it count as this class). The
    #: built-in strategies import their TorchRec class on first use (a property).
    module_type: ClassVar[type[nn.Module]]
    #: The interaction's kind: the ``type`` of ``inspect``'s ``interaction`` and the name of the
    #: graph interaction that exporters build for it.
    interaction: ClassVar[str]
    #: The model-config keys of this class's interaction, beyond those every class has
    #: (:mod:`compress.io.model_config`): the one place its config format is defined.
    config_keys: ClassVar[tuple[ConfigKey, ...]] = ()
    #: The :class:`~compress.io.model_spec.DLRMSpec` fields this class needs set (those of its
    #: :attr:`config_keys`).
    interaction_fields: ClassVar[tuple[str, ...]] = ()
    #: Largest absolute logit difference accepted between the exported graphs and PyTorch.
    parity_atol: ClassVar[float] = 1e-5

    # ---- state dict -> architecture

    @abstractmethod
    def claims(self, sd: Mapping[str, torch.Tensor]) -> bool:
        """Whether a (prefix-free) state dict holds this class's interaction keys."""

    @abstractmethod
    def infer_interaction(
        self, sd: Mapping[str, torch.Tensor], *, dim: int, over_in: int, source: str
    ) -> InteractionShape:
        """The interaction's shape from a state dict's tensor shapes (``dim``: embedding dim,
        ``over_in``: the over arch's input width); :class:`CheckpointError` when inconsistent."""

    # ---- architecture -> module

    @abstractmethod
    def constructor_kwargs(self, spec: DLRMSpec) -> dict[str, Any]:
        """The TorchRec constructor's arguments beyond those every class takes."""

    def build(self, spec: DLRMSpec, ebc: nn.Module, device: torch.device) -> nn.Module:
        """A freshly initialised :attr:`module_type` of ``spec``'s shapes around ``ebc``."""
        return self.module_type(
            embedding_bag_collection=ebc,
            dense_in_features=spec.dense_in_features,
            dense_arch_layer_sizes=list(spec.dense_arch_layer_sizes),
            over_arch_layer_sizes=list(spec.over_arch_layer_sizes),
            dense_device=device,
            **self.constructor_kwargs(spec),
        )

    # ---- widths and layers

    def interaction_in_width(self, spec: DLRMSpec) -> int:
        """Width of the flattened interaction input ``cat(dense, sparse)``: ``(F+1)*D``."""
        return (spec.num_sparse_features + 1) * spec.embedding_dim

    @abstractmethod
    def over_in_width(self, spec: DLRMSpec) -> int:
        """Width of the interaction's output, which is the over arch's input."""

    def interaction_linears(self, spec: DLRMSpec) -> dict[str, tuple[LinearLayer, ...]]:
        """The interaction's ``nn.Linear`` stacks by group name (none by default). A group is
        named as the :class:`~exporters.onnx.spec.DLRMGraphSpec` field that holds it."""
        return {}

    def cross_layers(self, spec: DLRMSpec) -> tuple[CrossLayerKeys, ...]:
        """The interaction's low-rank cross layers (none by default): not ``nn.Linear`` layers,
        they stay as they are."""
        return ()

    def linear_groups(self, spec: DLRMSpec) -> dict[str, tuple[LinearLayer, ...]]:
        """Every ``nn.Linear`` by group, in state-dict order: :data:`DENSE_GROUP`, the
        interaction's groups, :data:`OVER_GROUP`."""
        over_in = self.over_in_width(spec)
        over = spec.over_arch_layer_sizes
        last_in = over[-2] if len(over) > 1 else over_in
        return {
            DENSE_GROUP: chain(DENSE_MLP, spec.dense_in_features, spec.dense_arch_layer_sizes),
            **self.interaction_linears(spec),
            OVER_GROUP: (
                *chain(OVER_MLP, over_in, over[:-1]),
                LinearLayer(OVER_FINAL, last_in, over[-1]),
            ),
        }

    def interaction_summary(self, spec: DLRMSpec) -> dict[str, Any]:
        """The ``interaction`` entry of ``inspect``: its ``type`` and parameters."""
        return {"type": self.interaction}

    def shape_problem(self, spec: DLRMSpec) -> str | None:
        """What makes ``spec``'s interaction parameters unbuildable for this class (``None``: they
        fit), for a model config read without a checkpoint; none by default."""
        return None

    def missing_fields(self, values: Mapping[str, Any]) -> list[str]:
        """The :attr:`interaction_fields` that ``values`` lacks or holds as ``None``."""
        return [f for f in self.interaction_fields if values.get(f) is None]

    # ---- inputs

    def dummy_inputs(self, spec: DLRMSpec, n: int, seed: int, max_bag: int = 3) -> Dataset:
        """``n`` unlabelled inputs of the model's ``forward``, as a dataset (what the export's
        parity check scores): standard normal dense, every bag 0..``max_bag`` uniform ids."""
        rng = np.random.default_rng([seed, 0x4D48])
        dense = rng.standard_normal((n, spec.dense_in_features), dtype=np.float32)
        values, offsets = {}, {}
        for f in spec.feature_names:
            lengths = rng.integers(0, max_bag + 1, n)
            offsets[f] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            values[f] = rng.integers(
                0, spec.table_of_feature(f).num_embeddings, int(offsets[f][-1])
            )
        return Dataset(dense=dense, labels=np.zeros(n, np.float32), values=values, offsets=offsets)
