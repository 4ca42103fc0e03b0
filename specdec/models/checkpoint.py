"""Drafter checkpoints: a directory with ``model.safetensors`` and ``drafter.json`` (kind, config, target fingerprint).

Written atomically (a temporary directory renamed into place), so a crash never leaves half a checkpoint.
Loading checks the files, the drafter kind and the target it was trained for, and names the fix when they
disagree: a drafter trained for another target would propose tokens the target rarely accepts, or crash on
shapes. Lives in ``specdec`` because both ``drafters/`` (loading) and ``train/`` (saving) use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from specdec.errors import SpecdecError

WEIGHTS = "model.safetensors"
META = "drafter.json"
FORMAT_VERSION = 1


class CheckpointError(SpecdecError):
    """A missing, corrupt or mismatched drafter checkpoint."""


def target_fingerprint(model) -> dict:
    """What identifies a target for a drafter: architecture sizes, vocabulary and a hash of its embedding."""
    cfg = model.config
    emb = model.get_input_embeddings().weight
    # rounded through bfloat16, so the same target loaded in float32, bfloat16 or float64 has one fingerprint
    sample = emb[:: max(1, emb.shape[0] // 64)].detach().cpu().to(torch.bfloat16).float().contiguous()
    return {
        "model_type": getattr(cfg, "model_type", None),
        "vocab_size": int(emb.shape[0]),
        "hidden_size": int(cfg.hidden_size),
        "num_hidden_layers": int(cfg.num_hidden_layers),
        "embedding_sha1": hashlib.sha1(sample.numpy().tobytes()).hexdigest()[:16],
    }


def check_target(meta: dict, model, path: str | Path) -> None:
    """Refuse a checkpoint trained for another target, saying which property differs. A checkpoint without a
    fingerprint (``meta["target"]`` None: a public layout, or saved without a target) is left to the drafter,
    which checks its shapes."""
    want = meta.get("target")
    if want is None:
        return
    have = target_fingerprint(model)
    diffs = [f"{k}: checkpoint {want.get(k)!r} vs target {have[k]!r}" for k in have if want.get(k) != have[k]]
    if diffs:
        raise CheckpointError(
            f"drafter checkpoint {path} was trained for a different target ({'; '.join(diffs)}). "
            f"Train one for this target (python -m train.{meta.get('kind', '<drafter>')} target=...) or use "
            "the target it was made for."
        )


def save(path: str | Path, kind: str, state: dict[str, torch.Tensor], config: dict, target=None,
         extra: dict | None = None, card: str | None = None) -> Path:
    """Write a checkpoint directory atomically; ``card`` (markdown) goes to README.md beside the weights."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / WEIGHTS))
        meta = {"format": FORMAT_VERSION, "kind": kind, "config": config,
                "target": target_fingerprint(target) if target is not None else None, **(extra or {})}
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        if card is not None:
            (tmp / "README.md").write_text(card)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def cast_floats(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Floating tensors in ``dtype`` (e.g. float16 to ship half-size files); integer buffers unchanged."""
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` names a drafter checkpoint directory written here (a string that is not one is a drafter
    name, or a public layout: :func:`specdec.interop.is_public`)."""
    try:
        return (Path(path).expanduser() / META).exists()
    except (OSError, ValueError):
        return False


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    if not (path / META).exists():
        raise CheckpointError(f"{path} is not a drafter checkpoint (no {META}); pass the directory a train/ job "
                              "wrote (its checkpoints/ or final/ folder).")
    try:
        meta = json.loads((path / META).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / META} is corrupt ({e}); re-run the training job or restore the file.") from None
    if not isinstance(meta, dict) or "kind" not in meta or "config" not in meta:
        raise CheckpointError(f"{path / META} lacks 'kind'/'config'; it was not written by specdec's train/ jobs.")
    return meta


def load(path: str | Path, kind: str | None = None, target=None) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state_dict, meta)`` of a checkpoint, checking its kind and (given ``target``) the target it fits.
    Drafters read public layouts too, through :func:`specdec.interop.load_checkpoint`."""
    path = Path(path).expanduser()
    meta = read_meta(path)
    if kind is not None and meta["kind"] != kind:
        raise CheckpointError(f"{path} holds a {meta['kind']!r} drafter, not {kind!r}; use drafter={meta['kind']} "
                              f"with this path.")
    if target is not None:
        check_target(meta, target, path)
    try:
        state = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path / WEIGHTS} is missing or corrupt ({e}); re-run the training job "
                              "(resume=true continues from its last training state).") from None
    return state, meta


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """``module.load_state_dict`` with a message that names the mismatched tensors instead of a stack dump."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"checkpoint {path} does not fit this drafter (missing {missing[:4]}, unexpected {unexpected[:4]}, "
            f"shapes {shapes[:4]}); it was saved with another configuration or target."
        )
    floats = [t.dtype for t in state.values() if t.is_floating_point()]
    mine = {t.dtype for t in own.values() if t.is_floating_point()}
    if floats and mine:  # stored wider than the module (a float64 public head): widen it, so no bit is lost
        wide = max(floats, key=lambda d: torch.finfo(d).bits)
        if all(torch.finfo(wide).bits > torch.finfo(d).bits for d in mine):
            module.to(wide)
    module.load_state_dict(state)


SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints"


def shipped(kind: str) -> Path:
    """The checkpoint of ``kind`` shipped in ``checkpoints/`` for the default target."""
    path = SHIPPED / f"smollm2-135m-{kind}"
    if not (path / META).exists():
        raise CheckpointError(f"no {kind} checkpoint is shipped at {path}; pass drafter.path=<checkpoint directory> "
                              f"(train one with python -m train.{kind}).")
    return path
