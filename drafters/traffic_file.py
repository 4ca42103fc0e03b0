"""The files that keep what drafters learned from traffic across restarts (the suffix cache, the recycling table).

numpy's ``.npz`` read without pickle: named arrays beside a JSON header holding the kind of file, its format version
and the tokenizer's fingerprint (token ids mean nothing under another vocabulary). Written atomically (a temporary
file, then a rename), so a crash mid-write leaves the old file. A file that does not parse, is of another kind or
version, or was built for another tokenizer is refused with a :class:`ConfigError` naming it and the fix.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np

from specdec.errors import ConfigError


def write(path: str | Path, kind: str, version: int, fingerprint: str, arrays: dict[str, np.ndarray],
          **extra) -> Path:
    """``arrays`` and a header ``{format: kind, version, fingerprint, **extra}`` to ``path``, atomically."""
    path = Path(path)
    header = json.dumps({"format": kind, "version": version, "fingerprint": fingerprint, **extra})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, header=np.frombuffer(header.encode(), dtype=np.uint8), **arrays)
    os.replace(tmp, path)
    return path


def read(path: str | Path, kind: str, what: str, version: int, fingerprint: str,
         names: tuple[str, ...]) -> tuple[dict, dict[str, np.ndarray]]:
    """``(header, arrays)`` of a file :func:`write` made with this ``kind``, ``version`` and ``fingerprint``;
    ``what`` names the file in errors (``"suffix cache"``); ``names``: the arrays it must hold."""
    path = Path(path)
    fix = f"delete {path} (or point the drafter's file option elsewhere) to start empty."
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(bytes(data["header"]).decode())
            arrays = {n: data[n] for n in names}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError, EOFError) as e:
        raise ConfigError(f"the {what} file {path} is not readable ({type(e).__name__}: {e}); {fix}") from e
    if not isinstance(header, dict) or header.get("format") != kind:
        raise ConfigError(f"{path} is not a specdec {what} file; {fix}")
    if header.get("version") != version:
        raise ConfigError(f"the {what} file {path} has format version {header.get('version')}, this specdec reads "
                          f"version {version}; {fix}")
    if header.get("fingerprint") != fingerprint:
        raise ConfigError(f"the {what} file {path} was built for another tokenizer ({header.get('fingerprint')}, "
                          f"this target's is {fingerprint}); its token ids would mean other words. {fix}")
    return header, arrays


def corrupt(path: str | Path, what: str, why: str) -> ConfigError:
    """The error for a file that parsed but does not hold what its header says."""
    return ConfigError(f"the {what} file {path} is corrupt ({why}); delete {path} (or point the drafter's file "
                       "option elsewhere) to start empty.")
