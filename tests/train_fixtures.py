"""Tiny end-to-end training setups: a saved tiny target, a small chat file, a job config as a plain dict."""

from __future__ import annotations

import json
import random
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.tiny import VOCAB, save_tiny

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def chat_file(path: Path, rows: int = 24, seed: int = 0) -> Path:
    """A chat JSONL file in ``../shared/data/train`` format over the tiny tokenizer's words (w3 .. w95)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(rows):
            motif = [f"w{rng.randrange(3, VOCAB)}" for _ in range(4)]
            user = " ".join(rng.choice(motif) for _ in range(6))
            answer = " ".join(motif * 3)
            f.write(json.dumps({"id": f"row-{i}", "source": "tiny", "messages": [
                {"role": "user", "content": user}, {"role": "assistant", "content": answer}]}) + "\n")
    return path


def job_config(tmp_path: Path, job: str, overrides: list[str] = ()) -> dict:
    """``conf/train/<job>.yaml`` with ``train=smoke``, pointed at a tiny target and a tiny chat file."""
    target = tmp_path / "target"
    if not target.exists():
        save_tiny(target, seed=0)
    data = chat_file(tmp_path / "chat.jsonl")
    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = compose(f"train/{job}", overrides=["train=smoke", "target=custom", f"target.name={target}",
                                                 f"output_dir={tmp_path / 'run'}", "logger=none",
                                                 f"data.cache_dir={tmp_path / 'data'}", *overrides])
    cfg = OmegaConf.to_container(cfg, resolve=True)
    for section in ("self_distill", "teacher_forced"):
        cfg["data"][section]["sources"] = [{"path": str(data), "weight": 1}]
    cfg["data"]["val_fraction"] = 0.25
    return cfg
