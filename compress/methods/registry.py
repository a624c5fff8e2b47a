"""The table-method registry: one handler per way of storing an embedding table.

In the spirit of torchao's ``quantize_(model, config)``: a **method** is one frozen config
dataclass (:class:`~compress.methods.base.MethodConfig`, the settings a recipe rule gives it) and
one handler object (:class:`~compress.methods.base.TableMethod`) that owns everything about it,
from the recipe to the serving runtimes (the hooks, with defaults for what most methods share,
are in :mod:`compress.methods.base`):

======================  ===========================================================================
recipe                  :meth:`~TableMethod.recipe_keys`, :meth:`~TableMethod.parse` (validation),
                        :meth:`~TableMethod.recipe_items` (TOML out), :meth:`~TableMethod.describe`
plan                    :meth:`~TableMethod.fields` (what the plan and manifest report),
                        :meth:`~TableMethod.table_bytes`
prepare / convert       :meth:`~TableMethod.prepare` (a :class:`PreparedTable`: fake-quantizing,
                        trainable) and :meth:`~TableMethod.convert` (a :class:`ConvertedTable`: the
                        stored arrays as buffers, dequantized at lookup)
artifacts               :attr:`~TableMethod.name` (the manifest ``layout``), the files it writes
                        (:meth:`~TableMethod.stored_roles`), :meth:`~TableMethod.stored_arrays`
ONNX                    :meth:`~TableMethod.graph_table` (arrays -> graph table) and
                        :meth:`~TableMethod.onnx_rows` (the lookup's nodes)
TorchRec                :meth:`~TableMethod.fbgemm_data_type`, :meth:`~TableMethod.fbgemm_rows`,
                        :meth:`~TableMethod.converted_from_arrays`
======================  ===========================================================================

Recipes, the plan, prepare/convert, the artifact writer and reader, the manifest check, the ONNX
builders and the TorchRec loaders look methods up here (:func:`get`, :func:`for_config`,
:func:`for_recipe`); none of them names a method. Built-in methods: ``fp32`` (recipe ``keep``,
:mod:`compress.methods.keep`), ``fp16`` (:mod:`compress.methods.fp16`), ``rowwise`` (``ptq``/
``qat`` with ``granularity = "row"``, :mod:`compress.methods.rowwise`), ``tablewise`` (the same
with ``"table"``, :mod:`compress.methods.tablewise`) and ``robe`` (``share``,
:mod:`compress.methods.robe.method`). A new method is one module and one line::

    register(MyMethod())          # recipes then say: method = "<MyMethod.name>"

(``tests/test_method_registry.py`` defines one, symmetric INT8 rows with a float32 scale, and
runs it from a recipe to ONNX Runtime and back to TorchRec.)

One module per method, export hooks included. ``compress`` never imports ``exporters`` (the
data path reads one way; ``tests/test_layering.py``), so the hooks that build ONNX nodes receive
what they need from the exporter as arguments: :meth:`TableMethod.onnx_rows` gets a request
object holding the graph builder, the table, its ids and the shared lookup helpers
(:class:`exporters.onnx.lookup.RowsRequest`). The alternative, a compress-side and an
exporter-side module per method registered under one name, would split what a method is over two
packages and two registrations; the single module keeps a method readable in one place, and its
ONNX code is a few plain node calls.

The registry, the manifest reader and ONNX Runtime serving import no torch: the built-in methods'
modules import it only in the hooks that build tensors, and keep their PyTorch modules (prepared
and converted tables) in :mod:`compress.methods.table_modules`, imported when a table is prepared
or converted. A new method may define its modules beside its handler (it then imports torch when
it is registered).

A method's registered ``name`` is the ``layout`` its tables have in ``manifest.json``. The
built-ins keep the recipe spellings that predate the registry (:data:`RECIPE_SPELLINGS`); any
other method is spelled by its name. Methods that share one array among several tables
(:attr:`TableMethod.shares_arrays`) plan, prepare and write per group instead of per table; the
manifest's ``shared_arrays`` entries do not name their method, so one such method at most can be
registered (:func:`sharing_method`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from compress.methods.handler import MethodConfig, TableMethod

if TYPE_CHECKING:
    from torch import nn

    from compress.recipe.reader import Keys

#: How recipes spell the built-in methods (the recipe syntax predates the registry): ``method`` ->
#: registered names. ``ptq`` (quantized once, frozen) and ``qat`` (quantization-aware, trained)
#: each name two methods, told apart by ``granularity`` (:data:`GRANULARITIES`). A registered
#: method that none of these names is spelled by its own name.
RECIPE_SPELLINGS: dict[str, tuple[str, ...]] = {
    "keep": ("fp32",),
    "fp16": ("fp16",),
    "ptq": ("rowwise", "tablewise"),
    "qat": ("rowwise", "tablewise"),
    "share": ("robe",),
}
#: ``granularity`` of a ``ptq``/``qat`` rule -> registered name; absent means :data:`DEFAULT_GRANULARITY`.
GRANULARITIES: dict[str, str] = {"row": "rowwise", "table": "tablewise"}
DEFAULT_GRANULARITY = "row"
#: The method of a table that no rule decides: kept as it is.
DEFAULT_METHOD = "fp32"
#: The modules of the built-in methods (imported, and so registered, on first lookup).
BUILTIN_MODULES = (
    "compress.methods.keep",
    "compress.methods.fp16",
    "compress.methods.rowwise",
    "compress.methods.tablewise",
    "compress.methods.robe.method",
)


class MethodError(ValueError):
    """A method registered twice, or under a name the registry cannot take."""


# --------------------------------------------------------------------------------------------------
# The registry


_METHODS: dict[str, TableMethod] = {}
_loaded = False


def register(method: TableMethod) -> TableMethod:
    """Add ``method`` under ``method.name``; returns it. :class:`MethodError` for a name already
    registered or taken by a recipe spelling of another method, and for a second method that
    shares arrays."""
    _load_builtins()
    name = getattr(method, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise MethodError(f"{method!r}: a method's name must be an identifier, got {name!r}")
    if name in _METHODS:
        raise MethodError(f"table method {name!r} is already registered ({_METHODS[name]!r})")
    if name in RECIPE_SPELLINGS and name not in RECIPE_SPELLINGS[name]:
        raise MethodError(
            f"{name!r} is a recipe spelling of the method(s) {RECIPE_SPELLINGS[name]}"
        )
    if method.shares_arrays and any(m.shares_arrays for m in _METHODS.values()):
        raise MethodError(
            f"table method {name!r} shares arrays, and {sharing_method().name!r} already does: "
            "the manifest's shared_arrays entries do not name their method"
        )
    _METHODS[name] = method
    return method


def unregister(name: str) -> None:
    """Remove the method ``name`` (tests that register their own)."""
    del _METHODS[name]


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)


def get(name: str) -> TableMethod:
    """The method registered as ``name`` (a manifest layout); ``KeyError`` naming the known ones."""
    _load_builtins()
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"no table method {name!r} (registered: {', '.join(_METHODS)})") from None


def names() -> tuple[str, ...]:
    """Registered names: the built-ins in :data:`RECIPE_SPELLINGS` order, then the others in
    registration order."""
    _load_builtins()
    builtin = dict.fromkeys(n for targets in RECIPE_SPELLINGS.values() for n in targets)
    return (*(n for n in builtin if n in _METHODS), *(n for n in _METHODS if n not in builtin))


def methods() -> tuple[TableMethod, ...]:
    return tuple(_METHODS[n] for n in names())


def for_config(config: MethodConfig) -> TableMethod:
    """The method ``config`` configures."""
    return get(config.METHOD)


def default_config() -> MethodConfig:
    """The config of a table that no rule decides (kept as it is)."""
    return get(DEFAULT_METHOD).config_type()


def sharing_method() -> TableMethod | None:
    """The method whose tables read the manifest's ``shared_arrays`` (``None``: none)."""
    return next((m for m in methods() if m.shares_arrays), None)


def for_module(module: nn.Module) -> TableMethod | None:
    """The sharing method whose group module ``module`` is (its class names it in
    ``TABLE_METHOD``), or ``None``."""
    name = getattr(type(module), "TABLE_METHOD", None)
    return get(name) if name is not None else None


# --------------------------------------------------------------------------------------------------
# Recipe spellings


def recipe_methods() -> tuple[str, ...]:
    """Every ``method`` a recipe rule may name: the built-ins' spellings, then the other
    registered methods by name."""
    spelled = {n for targets in RECIPE_SPELLINGS.values() for n in targets}
    return (*RECIPE_SPELLINGS, *(n for n in names() if n not in spelled))


def spelling_methods(spelling: str) -> tuple[TableMethod, ...]:
    """The methods a recipe's ``method`` may resolve to."""
    return tuple(get(n) for n in RECIPE_SPELLINGS.get(spelling, (spelling,)))


def spelling_keys(spelling: str) -> tuple[str, ...]:
    """Rule keys a rule spelled ``spelling`` may give (over every method it may resolve to)."""
    out: dict[str, None] = {}
    for method in spelling_methods(spelling):
        out.update(dict.fromkeys(method.recipe_keys(spelling)))
    return tuple(out)


def all_recipe_keys() -> tuple[str, ...]:
    """Every method key of every spelling, in registration order."""
    out: dict[str, None] = {}
    for spelling in recipe_methods():
        out.update(dict.fromkeys(spelling_keys(spelling)))
    return tuple(out)


def for_recipe(spelling: str, keys: Keys) -> TableMethod:
    """The method a rule spelled ``spelling`` uses (``ptq``/``qat``: by ``granularity``)."""
    candidates = spelling_methods(spelling)
    if len(candidates) == 1:
        return candidates[0]
    granularity = keys.choice("granularity", tuple(GRANULARITIES)) or DEFAULT_GRANULARITY
    return get(GRANULARITIES[granularity])
