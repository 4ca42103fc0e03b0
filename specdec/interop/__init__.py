"""Drafter checkpoints other engines read and write: EAGLE-3 (vLLM/SGLang/SpecForge ``config.json``), speculators
(vLLM's native format), EAGLE-1 and Medusa (vLLM's and the research repos' layouts).

- **Import**: :func:`detect` names the drafter kind of a public checkpoint directory, :func:`load` converts it to
  this project's ``(state, meta)`` (what :func:`specdec.models.checkpoint.load` returns for our own), so every
  drafter loads public heads through the one path; ``drafter=<dir>`` and ``generate(..., drafter=<dir>)`` take them.
- **Export**: :func:`export` writes one of our checkpoints as a directory the engine loads with no extra flags
  (``specdec export <checkpoint> --to eagle3|speculators|medusa <dir>``).

Each layout lives in its own module with ``detect(config) -> bool``, ``load(path, config, allow_pickle)`` and,
where exporting applies, ``export(state, meta, out_dir, **options)``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from specdec.errors import ConfigError
from specdec.models import checkpoint
from specdec.models.checkpoint import CheckpointError
from specdec.interop.files import read_config

# import layouts, most specific first: (kind our drafter has, module)
IMPORTERS = (("eagle3", "specdec.interop.speculators"), ("eagle3", "specdec.interop.eagle3"),
             ("medusa", "specdec.interop.medusa"), ("eagle", "specdec.interop.eagle1"))
EXPORTERS = {"eagle3": "specdec.interop.eagle3", "speculators": "specdec.interop.speculators",
             "medusa": "specdec.interop.medusa"}
EXPORT_OPTIONS = {"eagle3": (), "speculators": ("verifier", "speculative_tokens"), "medusa": ("pad_vocab",)}


def _module(name: str):
    return importlib.import_module(name)


def detect(path: str | Path) -> tuple[str, str] | None:
    """``(drafter kind, layout module)`` of a public checkpoint directory, None when it is none we read."""
    cfg = read_config(path)
    if cfg is None:
        return None
    for kind, mod in IMPORTERS:
        if _module(mod).detect(cfg):
            return kind, mod
    return None


def is_public(path: str | Path) -> bool:
    """Whether ``path`` is a directory in a public layout we import (and not one of our own checkpoints)."""
    p = Path(path).expanduser()
    try:
        return p.is_dir() and not checkpoint.is_checkpoint(p) and detect(p) is not None
    except CheckpointError:
        return True  # a corrupt config.json: loading it says what is wrong


def load(path: str | Path, kind: str | None = None, allow_pickle: bool = False) -> tuple[dict, dict]:
    """``(state, meta)`` of a public checkpoint, converted to the layout of our ``kind`` drafter (meta: ``kind``,
    ``config``, ``target: None``, ``source``: the layout it came from)."""
    path = Path(path).expanduser()
    found = detect(path)
    if found is None:
        raise CheckpointError(f"{path} is neither a specdec drafter checkpoint (drafter.json) nor a public EAGLE-1, "
                              "EAGLE-3, speculators or Medusa directory (config.json); pass the directory a train/ "
                              "job wrote or one of those.")
    have, mod = found
    if kind is not None and have != kind:
        raise CheckpointError(f"{path} holds a {have!r} drafter in a public layout, not {kind!r}; use drafter={have} "
                              "with this path.")
    return _module(mod).load(path, read_config(path), allow_pickle)


def load_checkpoint(path: str | Path, kind: str | None = None, target=None,
                    allow_pickle: bool = False) -> tuple[dict, dict]:
    """``(state, meta)`` of any drafter checkpoint a drafter can run: ours (:func:`checkpoint.load`, checked against
    ``target``) or a public layout converted (``meta["target"]`` None: the drafter checks its shapes instead).
    ``allow_pickle``: read a public pickle checkpoint (it can run code: only for files you trust)."""
    if not checkpoint.is_checkpoint(path) and is_public(path):
        return load(path, kind, allow_pickle)
    return checkpoint.load(path, kind=kind, target=target)


def layout_options(to: str, **given) -> dict:
    """Of ``given`` export settings (the CLI's flags, a job's ``export`` section), those layout ``to`` takes and
    that are set (not None); a setting no layout takes is refused."""
    unknown = sorted(set(given) - {k for keys in EXPORT_OPTIONS.values() for k in keys})
    if unknown:
        raise ConfigError(f"unknown export settings {unknown}; the layouts take "
                          f"{ {to: list(keys) for to, keys in EXPORT_OPTIONS.items()} }.")
    return {k: v for k, v in given.items() if k in EXPORT_OPTIONS.get(to, ()) and v is not None}


def export(src: str | Path, to: str, out_dir: str | Path, allow_pickle: bool = False, **options) -> Path:
    """Write our checkpoint ``src`` in layout ``to`` (``eagle3``, ``speculators`` or ``medusa``) at ``out_dir``
    (``options``: the layout's, e.g. speculators' ``verifier`` and ``speculative_tokens``)."""
    if to not in EXPORTERS:
        raise CheckpointError(f"unknown export layout {to!r}; choose one of {sorted(EXPORTERS)}.")
    state, meta = load_checkpoint(src, allow_pickle=allow_pickle)
    return _module(EXPORTERS[to]).export(state, meta, Path(out_dir), **options)
