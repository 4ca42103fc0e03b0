"""Training text: chat files, weighted mixtures, a stable held-out split, and token ids with loss masks.

Chat files hold one JSON object a line: ``{"id", "source", "messages": [{"role", "content"}, ...]}`` (the format of
``../shared/data/train/``); plain ``.txt`` files are cut into chunks. A mixture is a list of ``{path, weight}``:
rows are drawn from each file in proportion to its weight (seeded), and a row goes to the validation split when a
hash of its id says so, so the split never changes when the mixture does.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from specdec.errors import ConfigError
from specdec.splits import is_validation  # noqa: F401 - re-exported: train/'s split is specdec's

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@dataclass(frozen=True)
class Source:
    """One file of a mixture: ``path`` (absolute, or relative to ``data_root``) and its sampling ``weight``."""

    path: str
    weight: float = 1.0


def resolve(path: str | Path, data_root: str | Path | None = None) -> Path:
    """``path`` as given if it exists or is absolute, else under ``data_root`` (default ``../shared/data``)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return Path(data_root).expanduser() / p if data_root else SHARED_DATA / p


def read_conversations(path: str | Path, text_chunk_chars: int = 2000) -> list[dict]:
    """Rows ``{"id", "messages"}`` of a chat JSONL file, or chunks of a ``.txt`` file as one-message rows."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"training data file {path} does not exist; fix the path in data.sources "
                          "(relative paths are read under data.root, default ../shared/data).")
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        return [{"id": f"{path.stem}-{i}", "messages": [{"role": "text", "content": text[s:s + text_chunk_chars]}]}
                for i, s in enumerate(range(0, len(text), text_chunk_chars))]
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                messages = row["messages"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConfigError(f"{path}:{n} is not a chat row with 'messages' ({e}); see ../shared/data/README.md "
                                  "for the format.") from None
            rows.append({"id": str(row.get("id", f"{path.stem}-{n}")), "messages": messages})
    return rows


def mixture(sources: Sequence[Source | dict], total: int, *, split: str = "train", val_fraction: float = 0.05,
            seed: int = 0, data_root: str | Path | None = None) -> list[dict]:
    """``total`` rows of one split, drawn from ``sources`` in proportion to their weights (seeded, no repeats).

    A file with fewer rows than its share gives all it has. Rows keep their file's name in ``source``.
    """
    if split not in ("train", "val"):
        raise ConfigError(f"split must be 'train' or 'val'; got {split!r}.")
    sources = [s if isinstance(s, Source) else Source(**s) for s in sources]
    if not sources:
        raise ConfigError("data.sources is empty; list at least one {path, weight}.")
    weights = [float(s.weight) for s in sources]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"data source weights must be >= 0 with a positive sum; got {weights}.")
    rng = random.Random(seed)
    out: list[dict] = []
    for s, w in zip(sources, weights):
        rows = [r for r in read_conversations(resolve(s.path, data_root))
                if is_validation(r["id"], val_fraction) == (split == "val")]
        rng.shuffle(rows)
        share = round(total * w / sum(weights))
        out.extend({**r, "source": Path(s.path).stem} for r in rows[:share])
    rng.shuffle(out)
    return out


def prompts_of(rows: Iterable[dict]) -> list[dict]:
    """The first user turn of each row, as a one-message conversation (prompts for self-distillation)."""
    out = []
    for r in rows:
        users = [m for m in r["messages"] if m.get("role") == "user" and m.get("content", "").strip()]
        if users:
            out.append({"id": r["id"], "source": r.get("source", ""), "messages": [users[0]]})
    return out


def encode_conversation(tokenizer, messages: list[dict], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[T]`` and loss mask ``[T]`` (1 on assistant tokens; on every token of plain text).

    Uses the tokenizer's chat template when it has one (assistant spans found by templating growing prefixes),
    else ``role: content`` lines. Truncated to ``max_len`` tokens.
    """
    if len(messages) == 1 and messages[0].get("role") == "text":
        ids = tokenizer(messages[0]["content"], add_special_tokens=False)["input_ids"][:max_len]
        return torch.tensor(ids, dtype=torch.long), torch.ones(len(ids), dtype=torch.bool)
    ids: list[int] = []
    mask: list[bool] = []
    for i, m in enumerate(messages):
        if getattr(tokenizer, "chat_template", None):
            before = _template(tokenizer, messages[:i], add_generation_prompt=m["role"] == "assistant") if i else []
            upto = _template(tokenizer, messages[: i + 1], add_generation_prompt=False)
            if upto[: len(ids)] != ids:  # template not prefix-stable: fall back to the whole conversation at once
                upto = ids + upto[len(before):]
            piece, head = upto[len(ids):], len(before) - len(ids) if m["role"] == "assistant" else len(upto) - len(ids)
        else:
            text = f"{m['role']}: {m['content']}\n"
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            head = len(tokenizer(f"{m['role']}: ", add_special_tokens=False)["input_ids"]) \
                if m["role"] == "assistant" else len(piece)
        head = max(0, min(head, len(piece)))
        ids.extend(piece)
        mask.extend([False] * head + [True] * (len(piece) - head))
        if len(ids) >= max_len:
            break
    return torch.tensor(ids[:max_len], dtype=torch.long), torch.tensor(mask[:max_len], dtype=torch.bool)


def _template(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def encode_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt ids for a conversation ending in a user turn, ready for the assistant's answer."""
    if getattr(tokenizer, "chat_template", None):
        return _template(tokenizer, messages, add_generation_prompt=True)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return tokenizer(text, add_special_tokens=False)["input_ids"]
