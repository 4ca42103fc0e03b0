"""Teacher-forced features: the frozen target run over token sequences, its last hidden states and next-token
distributions recorded at every position, in shards on disk.

Shapes: one shard holds ``n`` positions of ``k`` sequences: ``tokens [n]``, ``hidden [n, H]`` (float16, the
target's last-layer hidden state after its final norm, so ``lm_head(hidden)`` = its logits), ``loss_mask [n]``
(positions whose *token* is a training target: assistant text), ``topk_ids / topk_probs [n, K]`` (the target's
top-K next-token distribution) and ``offsets [k + 1]``; with ``aux_layers`` also ``aux [n, len(aux_layers) * H]``
(float16: transformers' ``hidden_states[i]`` of each listed layer, concatenated; EAGLE-3's features). Shards are written atomically in a fixed order, so an
interrupted extraction resumes at the first missing shard; a shard on disk is reused only when it holds exactly the
sequences it should now (a data set grown by more answers recomputes its last, partial shard and adds the new ones).
``manifest.json`` records the target it came from.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from specdec.models.checkpoint import CheckpointError, target_fingerprint
from specdec.models.hf_forward import select_hidden
from train.data import encode_conversation

MANIFEST = "manifest.json"


def encode_rows(tokenizer, rows: list[dict], max_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(ids [T], loss_mask [T])`` per row: self-distilled rows keep their exact ids (answer = mask), chat rows
    go through :func:`train.data.encode_conversation`. Rows with fewer than 2 tokens or no masked token drop."""
    out = []
    for r in rows:
        if "input_ids" in r:
            ids = torch.tensor(r["input_ids"][:max_len], dtype=torch.long)
            mask = torch.arange(len(ids)) >= int(r["n_prompt"])
        else:
            ids, mask = encode_conversation(tokenizer, r["messages"], max_len)
        if len(ids) >= 2 and bool(mask[1:].any()):
            out.append((ids, mask))
    return out


@torch.inference_mode()
def extract(model, tokenizer, rows: list[dict], out_dir: str | Path, *, max_len: int = 1024,
            batch_tokens: int = 4096, topk: int = 8, shard_rows: int = 64, progress: bool = True,
            aux_layers: tuple[int, ...] = ()) -> FeatureSet:
    """Run ``model`` over ``rows`` and write feature shards to ``out_dir`` (resuming a partial run)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = target_fingerprint(model)
    manifest_path = out_dir / MANIFEST
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old.get("target") != fingerprint or old.get("max_len") != max_len or old.get("topk") != topk or \
                old.get("aux_layers", []) != list(aux_layers):
            raise CheckpointError(f"{out_dir} holds features of another target or setting ({old.get('target')}, "
                                  f"max_len {old.get('max_len')}, topk {old.get('topk')}); use a new data.cache_dir.")
    seqs = encode_rows(tokenizer, rows, max_len)
    shards = [seqs[i:i + shard_rows] for i in range(0, len(seqs), shard_rows)]
    names = [f"shard-{i:05d}.safetensors" for i in range(len(shards))]
    manifest = {"target": fingerprint, "max_len": max_len, "topk": topk, "aux_layers": list(aux_layers),
                "shards": names,
                "sequences": len(seqs), "positions": int(sum(len(s[0]) for s in seqs))}
    if manifest_path.exists() and json.loads(manifest_path.read_text()) == {**manifest, "complete": True} and \
            all(shard_matches(out_dir / n, s) for n, s in zip(names, shards)):
        return FeatureSet(out_dir)  # complete already: not rewritten (other processes may be reading it)
    _write_json(manifest_path, {**manifest, "complete": False})
    bar = tqdm(total=len(seqs), desc="teacher-forced features", unit="seq", disable=not progress)
    for name, shard in zip(names, shards):
        if not shard_matches(out_dir / name, shard):
            _write_shard(model, shard, out_dir / name, batch_tokens, topk, tuple(aux_layers))
        bar.update(len(shard))
    bar.close()
    _write_json(manifest_path, {**manifest, "complete": True})
    return FeatureSet(out_dir)


def shard_matches(path: Path, seqs: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """True when the shard at ``path`` exists and holds exactly ``seqs`` (same tokens, loss masks and lengths)."""
    if not path.exists():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            offsets, tokens, mask = f.get_tensor("offsets"), f.get_tensor("tokens"), f.get_tensor("loss_mask")
    except (OSError, KeyError, SafetensorError):  # a torn or foreign file: rewrite it
        return False
    want = torch.tensor([0] + [len(s[0]) for s in seqs]).cumsum(0)
    return (torch.equal(offsets, want) and torch.equal(tokens, torch.cat([s[0] for s in seqs]))
            and torch.equal(mask, torch.cat([s[1] for s in seqs]).to(mask.dtype)))


def _write_shard(model, seqs, path: Path, batch_tokens: int, topk: int, aux_layers: tuple[int, ...] = ()) -> None:
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    results: dict[int, tuple[torch.Tensor, ...]] = {}
    i = 0
    while i < len(order):
        j = i + 1
        while j < len(order) and (j + 1 - i) * len(seqs[order[j]][0]) <= batch_tokens:
            j += 1
        group = order[i:j]
        width = max(len(seqs[g][0]) for g in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        attn = torch.zeros(len(group), width, dtype=torch.long)
        for row, g in enumerate(group):
            n = len(seqs[g][0])
            ids[row, :n], attn[row, :n] = seqs[g][0], 1
        out = model(input_ids=ids.to(model.device), attention_mask=attn.to(model.device), output_hidden_states=True,
                    use_cache=False)
        probs = out.logits.float().softmax(-1)
        top = probs.topk(topk, dim=-1)
        hidden, top_ids, top_p = out.hidden_states[-1].half().cpu(), top.indices.int().cpu(), top.values.half().cpu()
        aux = select_hidden(aux_layers, None, out.hidden_states)  # the layers a verifier returns the drafter
        aux = None if aux is None else aux.half().cpu()
        for row, g in enumerate(group):
            n = len(seqs[g][0])
            results[g] = (hidden[row, :n], top_ids[row, :n], top_p[row, :n]) + \
                ((aux[row, :n],) if aux is not None else ())
        i = j
    offsets = torch.tensor([0] + [len(s[0]) for s in seqs]).cumsum(0)
    tensors = {
        "tokens": torch.cat([s[0] for s in seqs]),
        "loss_mask": torch.cat([s[1] for s in seqs]).to(torch.uint8),
        "hidden": torch.cat([results[g][0] for g in range(len(seqs))]),
        "topk_ids": torch.cat([results[g][1] for g in range(len(seqs))]),
        "topk_probs": torch.cat([results[g][2] for g in range(len(seqs))]),
        "offsets": offsets,
    }
    if aux_layers:
        tensors["aux"] = torch.cat([results[g][3] for g in range(len(seqs))])
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


@dataclass
class Batch:
    """A padded batch of sequences. ``tokens [B, L]``, ``hidden [B, L, H]`` (float32), ``loss_mask [B, L]``,
    ``valid [B, L]`` (False on padding), ``target_top1 [B, L]`` (the target's argmax next token at each position),
    ``aux [B, L, k H]`` (float32; the feature layers' hidden states, when the set has them)."""

    tokens: torch.Tensor
    hidden: torch.Tensor
    loss_mask: torch.Tensor
    valid: torch.Tensor
    target_top1: torch.Tensor
    aux: torch.Tensor | None = None

    def to(self, device) -> Batch:
        return Batch(*(None if t is None else t.to(device) for t in vars(self).values()))


class FeatureSet:
    """All shards of a feature directory in memory (float16 hidden states: ~1.2 KB per position at H=576)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not (path / MANIFEST).exists():
            raise CheckpointError(f"{path} has no {MANIFEST}; build features first (the job's data step).")
        self.manifest = json.loads((path / MANIFEST).read_text())
        if not self.manifest.get("complete"):
            raise CheckpointError(f"features in {path} are incomplete; re-run the job to finish them (it resumes).")
        parts = [load_file(str(path / n)) for n in self.manifest["shards"]]
        if not parts:
            raise CheckpointError(f"{path} holds no sequences; check the data sources and max_len.")
        base = torch.tensor([0] + [int(p["offsets"][-1]) for p in parts]).cumsum(0)
        self.offsets = torch.cat([parts[0]["offsets"][:1]] + [p["offsets"][1:] + b for p, b in zip(parts, base)])
        for key in ("tokens", "loss_mask", "hidden", "topk_ids", "topk_probs"):
            setattr(self, key, torch.cat([p[key] for p in parts]))
        self.aux = torch.cat([p["aux"] for p in parts]) if self.manifest.get("aux_layers") else None
        self.loss_mask = self.loss_mask.bool()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def target(self) -> dict:
        return self.manifest["target"]

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def batch(self, indices: list[int]) -> Batch:
        lo = [int(self.offsets[i]) for i in indices]
        lens = [self.length(i) for i in indices]
        width = max(lens)
        b = len(indices)
        tokens = torch.zeros(b, width, dtype=torch.long)
        hidden = torch.zeros(b, width, self.hidden.shape[-1])
        mask = torch.zeros(b, width, dtype=torch.bool)
        valid = torch.zeros(b, width, dtype=torch.bool)
        top1 = torch.zeros(b, width, dtype=torch.long)
        aux = None if self.aux is None else torch.zeros(b, width, self.aux.shape[-1])
        for r, (s, n) in enumerate(zip(lo, lens)):
            tokens[r, :n] = self.tokens[s:s + n]
            hidden[r, :n] = self.hidden[s:s + n].float()
            mask[r, :n] = self.loss_mask[s:s + n]
            valid[r, :n] = True
            top1[r, :n] = self.topk_ids[s:s + n, 0].long()
            if aux is not None:
                aux[r, :n] = self.aux[s:s + n].float()
        return Batch(tokens, hidden, mask, valid, top1, aux)

    def token_counts(self, vocab_size: int) -> torch.Tensor:
        """How often each token appears at a loss position (for a reduced draft vocabulary)."""
        return torch.bincount(self.tokens[self.loss_mask], minlength=vocab_size)
