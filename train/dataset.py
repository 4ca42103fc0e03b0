"""The data step every job shares: self-distilled answers + teacher-forced conversations -> feature sets.

:func:`build` takes the ``data`` config section as a plain dict. Everything it makes is cached under one directory
named after the target and a hash of that section, so the four drafter jobs (and a resumed job) reuse it:

- ``answers-train.jsonl`` / ``answers-val.jsonl``: the target's own answers (resumable, see :mod:`train.selfdistill`);
- ``train/`` and ``val/``: feature shards (resumable, see :mod:`train.features`);
- the held-out prompts for validation tau are the ``val`` prompts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from specdec import models
from specdec.models.checkpoint import target_fingerprint
from train import features, selfdistill
from train.data import mixture, prompts_of


@dataclass
class Data:
    train: features.FeatureSet
    val: features.FeatureSet
    val_prompts: list[dict]  # held-out conversations ending in a user turn
    cache_dir: Path
    num_answers: int = 0  # self-distilled answers in the training rows (all the cache holds)


def cache_dir_for(cfg: dict, target) -> Path:
    """``cfg['cache_dir']`` or ``$SPECDEC_CACHE/data/<model type>-<hash of target + data config>``."""
    if cfg.get("cache_dir"):
        return Path(cfg["cache_dir"]).expanduser()
    key = {k: v for k, v in cfg.items() if k not in ("cache_dir", "val")}
    key["target"] = target_fingerprint(target)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return models.cache_dir() / "data" / f"{key['target']['model_type']}-{digest}"


def build(cfg: dict, target, tokenizer, progress: bool = True, aux_layers: tuple[int, ...] = ()) -> Data:
    """Make (or reuse) the train and validation feature sets described by the ``data`` config section.

    ``aux_layers``: also record those layers' hidden states (EAGLE-3); they go to their own feature directories
    (``train-aux-2-15-27/``) beside the plain ones, sharing the cached answers."""
    out = cache_dir_for(cfg, target)
    out.mkdir(parents=True, exist_ok=True)
    root, seed, val_fraction = cfg.get("root"), int(cfg.get("seed", 0)), float(cfg.get("val_fraction", 0.05))
    sd, tf, val = cfg["self_distill"], cfg["teacher_forced"], cfg["val"]
    gen = dict(batch_size=int(sd["batch_size"]), max_new_tokens=int(sd["max_new_tokens"]),
               do_sample=bool(sd.get("do_sample", False)), temperature=float(sd.get("temperature", 1.0)),
               seed=seed, progress=progress,
               max_prompt_tokens=max(16, int(cfg["max_len"]) - int(sd["max_new_tokens"]) // 2))

    train_rows: list[dict] = []
    if int(sd["num_prompts"]) > 0:
        prompts = prompts_of(mixture(sd["sources"], int(sd["num_prompts"]), split="train",
                                     val_fraction=val_fraction, seed=seed, data_root=root))
        train_rows += selfdistill.generate_answers(target, tokenizer, prompts, out / "answers-train.jsonl", **gen)
    num_answers = len(train_rows)
    if int(tf["num_rows"]) > 0:
        train_rows += mixture(tf["sources"], int(tf["num_rows"]), split="train", val_fraction=val_fraction,
                              seed=seed + 1, data_root=root)
    val_prompts = prompts_of(mixture(sd["sources"], int(val["num_prompts"]), split="val",
                                     val_fraction=val_fraction, seed=seed, data_root=root))
    val_rows = selfdistill.generate_answers(target, tokenizer, val_prompts, out / "answers-val.jsonl", **gen)

    feat = dict(max_len=int(cfg["max_len"]), batch_tokens=int(cfg["features"]["batch_tokens"]),
                topk=int(cfg["features"]["topk"]), progress=progress)
    suffix = "-aux-" + "-".join(map(str, aux_layers)) if aux_layers else ""
    train_set = features.extract(target, tokenizer, train_rows, out / f"train{suffix}", aux_layers=aux_layers, **feat)
    val_set = features.extract(target, tokenizer, val_rows, out / f"val{suffix}", aux_layers=aux_layers, **feat)
    return Data(train=train_set, val=val_set, val_prompts=val_prompts, cache_dir=out, num_answers=num_answers)
