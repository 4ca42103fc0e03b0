"""Optional dependencies: what the entry points beyond ``generate()`` need, and the error that names the install.

The core install (``pip install -e .``) holds what :func:`specdec.generate` needs; the benchmark app and the drafter
training jobs need the extras of ``pyproject.toml`` (``pip install -e '.[bench]'``, ``'.[train]'``). Their entry
points call :func:`require` (a ``__main__``: :func:`require_or_exit`) first, so a missing extra is one message naming
the fix, not a ModuleNotFoundError from deep inside. No core module imports an extra's package at module level
(``tests/test_packaging.py`` checks it).
"""

from __future__ import annotations

import importlib.util
import sys

from specdec.errors import SpecdecError

# extra -> the modules (import names) of its packages; pyproject.toml lists the packages (hydra-core is `hydra`)
EXTRAS: dict[str, tuple[str, ...]] = {
    "bench": ("hydra", "omegaconf", "matplotlib"),  # python -m specdec.bench / specdec bench (Hydra, plots)
    "train": ("hydra", "omegaconf", "accelerate", "peft", "wandb"),  # python -m train.<job>
}


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here."""
    out = []
    for module in EXTRAS[extra]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # e.g. sys.modules[module] = None
            found = False
        if not found:
            out.append(module)
    return out


def require(extra: str, what: str) -> None:
    """Fail naming the install command when ``what`` (an entry point) lacks a package of ``extra``."""
    absent = missing(extra)
    if absent:
        raise SpecdecError(f"{what} needs the [{extra}] extra ({', '.join(absent)} not installed): "
                           f"pip install 'specdec[{extra}]' (from a checkout: pip install -e '.[{extra}]').")


def require_or_exit(extra: str, what: str) -> None:
    """:func:`require` for a ``__main__`` (``python -m specdec.bench``, ``python -m train.<job>``): the message on
    stderr and exit status 2, not a traceback."""
    try:
        require(extra, what)
    except SpecdecError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
