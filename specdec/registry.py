"""The one wiring module: names -> concrete drafters and verifiers.

specdec's core never imports a concrete drafter or verifier; this table names them by import path and loads them
on demand, so ``drafters/`` and ``verifiers/`` can depend on ``specdec`` and not the other way round.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from specdec.errors import ConfigError

DRAFTERS: dict[str, str] = {
    "none": "drafters.none:NoDrafter",
    "ngram": "drafters.ngram:NGramDrafter",
    "draft_model": "drafters.draft_model:DraftModelDrafter",
    "eagle": "drafters.eagle:EagleDrafter",
    "medusa": "drafters.medusa:MedusaDrafter",
    "layerskip": "drafters.layerskip:LayerSkipDrafter",
    "hybrid": "drafters.hybrid:HybridDrafter",
}
VERIFIERS: dict[str, str] = {
    "hf": "verifiers.hf:HFVerifier",
    "paged": "verifiers.paged:PagedVerifier",
}


def _load(table: Mapping[str, str], kind: str, name: str):
    try:
        module, attr = table[name].split(":")
    except KeyError:
        raise ConfigError(f"unknown {kind} {name!r}; choose one of {sorted(table)} (e.g. {kind}={sorted(table)[0]}).") from None
    return getattr(importlib.import_module(module), attr)


def _check_kwargs(cls, kind: str, name: str, kwargs: Mapping[str, Any], wired: tuple[str, ...]) -> None:
    """Unknown options fail here, listing the valid ones (``wired``: arguments the wiring passes itself)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    allowed = [p for p in params if p not in ("self", *wired)]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ConfigError(f"{kind} {name!r} has no option(s) {unknown}; its options are {allowed}.")


def build_drafter(name: str, target, tokenizer=None, **kwargs):
    """A drafter by config name, e.g. ``build_drafter("ngram", model, max_ngram=3)``."""
    cls = _load(DRAFTERS, "drafter", name)
    _check_kwargs(cls, "drafter", name, kwargs, ("target", "tokenizer"))
    return cls(target=target, tokenizer=tokenizer, **kwargs)


def build_verifier(name: str, target, **kwargs):
    """A verifier by config name, e.g. ``build_verifier("hf", model)``."""
    cls = _load(VERIFIERS, "verifier", name)
    _check_kwargs(cls, "verifier", name, kwargs, ("model",))
    return cls(target, **kwargs)
