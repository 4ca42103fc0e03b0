"""Reading and writing the files of public drafter checkpoints: ``config.json`` and weights.

Weights are read from safetensors (one file or shards with an index) by default. A pickle checkpoint
(``pytorch_model.bin``, ``*.pt``) runs code on load in the general case, so it is read only when the caller opts in
(``allow_pickle=True``), and then with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from specdec.models.checkpoint import CheckpointError

CONFIG = "config.json"
PICKLE_NAMES = ("pytorch_model.bin", "model.pt", "pytorch_model.pt")


def read_config(path: str | Path) -> dict | None:
    """``config.json`` of a directory (None when it has none); a corrupt file is an error naming it."""
    f = Path(path) / CONFIG
    if not f.exists():
        return None
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON ({e}); restore the file or re-export the checkpoint.") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{f} does not hold a JSON object.")
    return cfg


def read_weights(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory: ``model.safetensors``, sharded safetensors (``*.index.json``), any
    other ``*.safetensors`` files, or (only with ``allow_pickle``) a pickle file."""
    path = Path(path)
    index = sorted(path.glob("*.safetensors.index.json"))
    if index:
        try:
            shards = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index[0]} is corrupt ({e}).") from None
        files = [path / s for s in shards]
    else:
        files = sorted(path.glob("*.safetensors"))
    if files:
        state: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                state.update(load_file(str(f)))
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{f} is missing or corrupt ({e}); download it again.") from None
        return state
    pickles = [path / n for n in PICKLE_NAMES if (path / n).exists()] or sorted(path.glob("*.pt"))
    if pickles:
        if not allow_pickle:
            raise CheckpointError(
                f"{pickles[0]} is a pickle checkpoint: loading one can run code from the file. Convert it to "
                "safetensors, or, if you trust its source, opt in with allow_pickle=True (drafter.allow_pickle=true, "
                "generate(..., drafter_kwargs={'allow_pickle': True}), specdec export --allow-pickle).")
        try:
            obj = torch.load(pickles[0], map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch.load raises many types for a bad file
            raise CheckpointError(f"{pickles[0]} could not be read as weights ({type(e).__name__}: {e}).") from None
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{pickles[0]} does not hold a flat state dict of tensors.")
        return obj
    raise CheckpointError(f"{path} holds no weights (no *.safetensors, no pickle file).")


def write_dir(path: str | Path, config: dict, state: dict[str, torch.Tensor], extra: dict[str, str] | None = None
              ) -> Path:
    """``config.json`` + ``model.safetensors`` (+ ``extra`` text files) into ``path`` (created)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    (path / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    for name, text in (extra or {}).items():
        (path / name).write_text(text)
    return path
