"""EAGLE heads drafting for a whole batch: one head forward per draft level for every request, as vLLM's EAGLE does.

Each request keeps its own drafter (its head cache and the pairs it holds); the drafters of one batch share one head
(:meth:`drafters.eagle.EagleDrafter.spawn`). A step of the batch runs:

1. **advance**: every request's new (feature, next token) pairs — the prompt's at its first step, the accepted
   path's after — through the head in one forward, the requests' caches side by side
   (:func:`specdec.models.hf_cache.padded`) under a mask that keeps each request to its own positions; the new
   pairs' K/V then go back to each request's cache;
2. **chain levels**: each request's most probable next token (the head's top-1) extends its chain, and one forward
   over every still-growing chain gives the next level's logits, until each chain reaches its request's node budget
   or (with ``min_value``) its path probability falls below it.

The trees are chains scored by their path probabilities (so the adaptive budget cuts them per request knowing the
batch's rows, :meth:`specdec.algorithms.adaptive.AdaptiveBudget.cut`). Drafts never change the output: greedy
verification keeps exactly the target's tokens whatever was proposed. Greedy requests only: a sampled request's
rejection rule needs the draft distribution of a tree it grew alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from specdec.errors import SpecdecError
from specdec.models import hf_cache
from specdec.models.gqa_attention import gqa_attention_on
from specdec.types import DraftContext, DraftTree


@dataclass(frozen=True)
class BatchLayout:
    """Where each request's positions sit in the batched head cache: ``past [B]`` cached pairs before this step
    (keys ``0 .. past_i - 1``), ``new [B]`` pairs advanced this step (keys ``width .. width + new_i - 1``);
    ``width`` = the longest past, ``n`` = the most new pairs. Chain level ``L`` (from 1) sits at key
    ``width + n + L - 1``."""

    past: torch.Tensor  # [B] long
    new: torch.Tensor  # [B] long
    width: int
    n: int

    def mask(self, queries: int, level: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive ``[B, 1, queries, width + n + level]``: the advance's queries (``level`` 0, ``queries`` = n)
        see their past and the new pairs up to their own; a chain level's one query (``level`` >= 1) sees the past,
        every new pair and the chain's levels up to its own."""
        keys = torch.arange(self.width + self.n + level, device=self.past.device)  # [K]
        own_past = keys[None] < self.past[:, None]  # [B, K]
        off = keys - self.width  # offset among the new pairs (then the chain levels)
        if level == 0:
            q = torch.arange(queries, device=keys.device)
            new = (off[None, None] >= 0) & (off[None, None] <= q[None, :, None])  # [1, n, K]
        else:
            new = ((off[None] >= 0) & (off[None] < self.new[:, None])) | (off[None] >= self.n)  # [B, K]
            new = new[:, None]
        allowed = own_past[:, None] | new  # [B, queries, K]
        zero = torch.zeros((), dtype=dtype, device=keys.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


@torch.inference_mode()
def advance(head_of, drafters: Sequence, ctxs: Sequence[DraftContext]) -> tuple[torch.Tensor, hf_cache.DynamicCache,
                                                                                BatchLayout]:
    """Step 1 for every request: returns the predicted features ``g [B, H]`` of each request's last pair (the
    root's), the batched cache (past, then the new pairs) for the chain levels, and its layout. Each drafter's own
    cache and pair count take the new pairs."""
    pasts, news, feats, toks = [], [], [], []
    for d, ctx in zip(drafters, ctxs):
        hf_cache.crop(d.cache, d._pairs)
        m = ctx.hidden.shape[1]
        nxt = ctx.input_ids[0, d._pairs + 1:d._pairs + m + 1]
        if nxt.shape[0] != m:
            raise SpecdecError(f"eagle drafter out of step: {m} new features but {nxt.shape[0]} new tokens (had "
                               f"{d._pairs} pairs, {ctx.input_ids.shape[1]} committed tokens).")
        pasts.append(d._pairs)
        news.append(m)
        feats.append(ctx.hidden[0])
        toks.append(nxt)
    dev = ctxs[0].input_ids.device
    layout = BatchLayout(torch.tensor(pasts, device=dev), torch.tensor(news, device=dev), max(pasts), max(news))
    n = layout.n
    feat = torch.zeros(len(ctxs), n, feats[0].shape[-1], dtype=feats[0].dtype, device=dev)
    tok = torch.zeros(len(ctxs), n, dtype=torch.long, device=dev)
    for i, (f, t) in enumerate(zip(feats, toks)):
        feat[i, :len(t)] = f
        tok[i, :len(t)] = t
    pos = layout.past[:, None] + torch.arange(n, device=dev)[None]
    cache = hf_cache.padded([d.cache for d in drafters], layout.width)
    head, dtype = head_of.head, head_of.dtype
    with gqa_attention_on(*head.attention_modules()):
        g = head(feat, head_of.embed(tok).to(dtype), pos, layout.mask(n, 0, dtype), cache)  # [B, n, H]
    k, v = hf_cache.layer_kv(cache)
    for i, d in enumerate(drafters):
        m = news[i]
        hf_cache.append(d.cache, k[i:i + 1, :, layout.width:layout.width + m], v[i:i + 1, :, layout.width:layout.width + m])
        d._pairs += m
    last = g[torch.arange(len(ctxs), device=dev), layout.new - 1]  # [B, H]
    return last, cache, layout


@torch.inference_mode()
def propose_chains(head_of, drafters: Sequence, ctxs: Sequence[DraftContext], lengths: Sequence[int],
                   min_value: float = 0.0) -> list[DraftTree]:
    """A chain for each request (``lengths[i]`` draft tokens at most) from the head of ``head_of`` (an
    :class:`~drafters.eagle.EagleDrafter` whose head every drafter shares), one forward per level for the batch.
    Every ``ctxs[i].hidden`` must hold at least one new feature. Returns ``[1, k_i + 1]`` chains, root first,
    scored by path probability."""
    g, cache, layout = advance(head_of, drafters, ctxs)
    head, dtype, vocab = head_of.head, head_of.dtype, head_of.vocab
    b, dev = len(ctxs), g.device
    chains: list[list[int]] = [[int(c.input_ids[0, -1])] for c in ctxs]
    values: list[list[float]] = [[1.0] for _ in ctxs]
    logits = head.logits(g)  # [B, V']
    for level in range(1, max(lengths, default=0) + 1):
        top = torch.log_softmax(logits.float(), dim=-1).max(dim=-1)
        ids = vocab.token_ids(top.indices).tolist()
        probs = top.values.exp().tolist()
        growing = []
        for i in range(b):
            if len(chains[i]) == level and level <= lengths[i] and (level == 1 or values[i][-1] >= min_value):
                chains[i].append(ids[i])
                values[i].append(values[i][-1] * probs[i])
                growing.append(i)
        if not any(level < lengths[i] and values[i][-1] >= min_value for i in growing):
            break
        # one more level for the batch (rows that stopped run too, their outputs unused: one forward either way)
        tok = torch.tensor([[c[-1]] for c in chains], device=dev)
        pos = (layout.past + layout.new - 1 + level)[:, None]
        with gqa_attention_on(*head.attention_modules()):
            g = head(g[:, None], head_of.embed(tok).to(dtype), pos, layout.mask(1, level, dtype), cache,
                     from_target=False)[:, 0]
        logits = head.logits(g)
    return [DraftTree(torch.tensor([c], device=dev), torch.tensor([list(range(-1, len(c) - 1))], device=dev),
                      scores=torch.tensor([v], device=dev)) for c, v in zip(chains, values)]
