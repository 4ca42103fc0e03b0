"""The one wiring module: names -> concrete drafters and verifiers, their config schemas, and the roles some play.

specdec's core never imports a concrete drafter or verifier; this table names them by import path and loads them on
demand, so ``drafters/`` and ``verifiers/`` can depend on ``specdec`` and not the other way round. Everything else
asks here: which verifier serves batches, which drafter is transformers' assistant model, what a config may hold.

Adding a drafter is a module implementing :class:`specdec.protocols.Drafter`, a YAML file ``conf/drafter/<name>.yaml``
and one entry in :data:`DRAFTERS` (or, from outside the package, :func:`register_drafter`); a verifier likewise
(:class:`specdec.protocols.Verifier`, ``conf/verifier/<name>.yaml``, :data:`VERIFIERS` / :func:`register_verifier`).

>>> sorted(DRAFTERS)[:3], verifier_class("paged").capabilities.batching
(['draft_model', 'eagle', 'eagle3'], True)
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from specdec.errors import ConfigError


@dataclass(frozen=True)
class DrafterEntry:
    """A registered drafter: where its class is (``"module:Class"``, or the class itself), and the options a config
    must set (option -> (what it is, what to put there)), checked before any model loads."""

    cls: str | type
    requires: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=dict)


DRAFTERS: dict[str, DrafterEntry] = {
    "none": DrafterEntry("drafters.none:NoDrafter"),
    "ngram": DrafterEntry("drafters.ngram:NGramDrafter"),
    "suffix": DrafterEntry("drafters.suffix:SuffixDrafter"),
    "recycling": DrafterEntry("drafters.recycling:RecyclingDrafter"),
    "draft_model": DrafterEntry("drafters.draft_model:DraftModelDrafter", requires={"path": (
        "a draft model", "hub id or local checkpoint directory of a small causal LM sharing the target's tokenizer")}),
    "eagle": DrafterEntry("drafters.eagle:EagleDrafter"),
    "eagle3": DrafterEntry("drafters.eagle3:Eagle3Drafter"),
    "medusa": DrafterEntry("drafters.medusa:MedusaDrafter"),
    "layerskip": DrafterEntry("drafters.layerskip:LayerSkipDrafter"),
    "hybrid": DrafterEntry("drafters.hybrid:HybridDrafter"),
}
VERIFIERS: dict[str, str | type] = {
    "hf": "verifiers.hf:HFVerifier",
    "paged": "verifiers.paged:PagedVerifier",
}

# roles: the few places where the rest of the code needs a particular one
DEFAULT_DRAFTER = "ngram"  # what generate() and SpecDecoder use when no drafter is named: needs no training
NO_DRAFTER = "none"  # plain decoding through the speculative loop
ASSISTANT_DRAFTER = "draft_model"  # its `path` is a causal LM that transformers' assisted generation can use too
RECOMMENDED_DRAFTER = "hybrid"  # what the bench method specdec:adaptive runs (with the adaptive budget)
REFERENCE_VERIFIER = "hf"  # the default verifier: transformers' own forward, a Cache and a 4D mask
ENGINE_OPTIONS = ("preemption",)  # options in a batching verifier's config that belong to the batching engine


@dataclass(frozen=True)
class NamedMethod:
    """A decoding method known by a name of its own: the drafter (config) it runs and whether the node budget is
    adaptive (re-decided each step from the measured verify cost, ``SpecDecoder(adaptive=True)``)."""

    drafter: str
    adaptive: bool = False


# names that are methods rather than drafters, shared by the bench (``specdec:<name>``) and the CLI
# (``specdec generate --drafter <name>``); any other name is a drafter (config) with a static budget
METHODS: dict[str, NamedMethod] = {
    "adaptive": NamedMethod(RECOMMENDED_DRAFTER, adaptive=True),  # the recommended setting: specdec:hybrid+adaptive
}


def named_method(name: str) -> NamedMethod:
    """What a method name runs: an entry of :data:`METHODS`, else the drafter of that name with a static budget.

    >>> named_method("adaptive"), named_method("ngram")
    (NamedMethod(drafter='hybrid', adaptive=True), NamedMethod(drafter='ngram', adaptive=False))
    """
    return METHODS.get(name, NamedMethod(name))


def _resolve(ref: str | type) -> type:
    if isinstance(ref, type):
        return ref
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def _lookup(table: Mapping[str, Any], kind: str, name: str):
    try:
        return table[name]
    except KeyError:
        raise ConfigError(f"unknown {kind} {name!r}; choose one of {sorted(table)} (e.g. {kind}={sorted(table)[0]}).") \
            from None


def drafter_class(name: str) -> type:
    """The drafter class registered under ``name``."""
    return _resolve(_lookup(DRAFTERS, "drafter", name).cls)


def verifier_class(name: str) -> type:
    """The verifier class registered under ``name`` (its ``capabilities`` are readable before one is built)."""
    return _resolve(_lookup(VERIFIERS, "verifier", name))


def register_drafter(name: str, cls: str | type, requires: Mapping[str, tuple[str, str]] | None = None) -> None:
    """Make a drafter available by name (``drafter=<name>``, ``generate(drafter=<name>)``); ``cls`` is a class or
    ``"module:Class"``, constructed as ``cls(target=..., tokenizer=..., **options)``."""
    DRAFTERS[name] = DrafterEntry(cls, dict(requires or {}))


def register_verifier(name: str, cls: str | type) -> None:
    """Make a verifier available by name; ``cls`` is a class or ``"module:Class"``, constructed as
    ``cls(target, **options)``."""
    VERIFIERS[name] = cls


def batching_verifier() -> str:
    """The name of the first registered verifier that serves batches (what a batch of prompts runs on)."""
    for name in VERIFIERS:
        if verifier_class(name).capabilities.batching:
            return name
    raise ConfigError("no registered verifier serves batches; register one whose capabilities declare batching.")


def _options(cls, wired: tuple[str, ...]) -> list[inspect.Parameter] | None:
    """The constructor's options (None: it takes ``**kwargs``, anything goes)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return [p for name, p in params.items() if name not in ("self", *wired)]


def _check_kwargs(cls, kind: str, name: str, kwargs: Mapping[str, Any], wired: tuple[str, ...]) -> None:
    """Unknown options fail here, listing the valid ones (``wired``: arguments the wiring passes itself)."""
    allowed = _options(cls, wired)
    unknown = sorted(set(kwargs) - {p.name for p in allowed}) if allowed is not None else []
    if unknown:
        raise ConfigError(f"{kind} {name!r} has no option(s) {unknown}; its options are {[p.name for p in allowed]}.")


def check_drafter_config(name: str, options: Mapping[str, Any]) -> None:
    """A drafter config names a registered drafter and sets the options it requires."""
    entry = _lookup(DRAFTERS, "drafter", name)
    for key, (what, value) in entry.requires.items():
        if not options.get(key):
            raise ConfigError(f"drafter {name} needs {what}: set drafter.{key}=<{value}>.")


def build_drafter(name: str, target, tokenizer=None, **kwargs):
    """A drafter by config name, e.g. ``build_drafter("ngram", model, max_ngram=3)``."""
    cls = drafter_class(name)
    _check_kwargs(cls, "drafter", name, kwargs, ("target", "tokenizer"))
    return cls(target=target, tokenizer=tokenizer, **kwargs)


def split_verifier_options(name: str, options: Mapping[str, Any]) -> tuple[dict, dict]:
    """``(verifier options, engine options)``: a batching verifier's config also holds the batching engine's
    options (:data:`ENGINE_OPTIONS`, e.g. ``preemption``), which are not the verifier's own."""
    verifier = {k: v for k, v in options.items() if k not in ENGINE_OPTIONS}
    engine = {k: v for k, v in options.items() if k in ENGINE_OPTIONS}
    if engine and not verifier_class(name).capabilities.batching:
        raise ConfigError(f"verifier {name!r} serves one request at a time; {sorted(engine)} applies to batches "
                          f"(verifier={batching_verifier()}).")
    return verifier, engine


def build_verifier(name: str, target, **kwargs):
    """A verifier by config name, e.g. ``build_verifier("hf", model)``."""
    cls = verifier_class(name)
    _check_kwargs(cls, "verifier", name, kwargs, ("model",))
    return cls(target, **kwargs)


def verifier_schema(name: str) -> type:
    """The config schema of ``conf/verifier/<name>.yaml``: a dataclass with ``name`` and the verifier's constructor
    options (types and defaults from its signature), plus the engine's options for a batching verifier. The
    constructor is the one place an option is declared; configs are checked against it.

    >>> [f.name for f in dataclasses.fields(verifier_schema("hf"))]
    ['name', 'screen_greedy']
    """
    cls = verifier_class(name)
    hints = typing.get_type_hints(cls.__init__)
    fields: list[tuple] = [("name", str, dataclasses.field(default=name))]
    for p in _options(cls, ("model",)) or []:
        default = None if p.default is inspect.Parameter.empty else p.default
        fields.append((p.name, _config_type(hints.get(p.name)), dataclasses.field(default=default)))
    if cls.capabilities.batching:
        fields += [(opt, typing.Optional[str], dataclasses.field(default=None)) for opt in ENGINE_OPTIONS]
    return dataclasses.make_dataclass(f"{cls.__name__}Config", fields)


def _config_type(hint) -> Any:
    """An option's type as a config schema can check it: a plain scalar (optional), else unchecked."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_args(hint) else [hint]
    if len(args) == 1 and args[0] in (bool, int, float, str):
        return typing.Optional[args[0]]
    return Any
