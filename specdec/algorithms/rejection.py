"""Lossless speculative sampling over chains and trees (recursive rejection sampling).

At a node u the target's warped distribution is p (``warp_probs(logits[u])``). Its children x_1, x_2, ... are tried
in index order; child i is accepted with probability ``min(1, p(x_i) / q_i(x_i))``. On rejection the target side
becomes the normalized residual ``p <- norm(max(0, p - q_i))`` and the draft side forgets x_i:

- children drawn from the drafter's q **without replacement** (distinct siblings; ``draft_probs`` given):
  ``q_{i+1} = q_i`` with x_i removed, renormalized — the distribution the next sibling was drawn from
  (recursive rejection sampling, as in SpecInfer / Recursive Speculative Decoding). For a chain this is the classic
  rule: accept with ``min(1, p/q)``, else resample from ``norm(max(0, p - q))``.
- deterministic candidates (``draft_probs`` None: n-gram, top-k): q_i is a point mass on x_i, so x_i is accepted
  with probability p(x_i) and the residual is p with x_i removed, renormalized.

After an acceptance the walk continues at the child; when every child is rejected (or u is a leaf), the emitted token
is drawn from the current residual (for a leaf: p itself, the bonus token). By induction on the steps each stage
emits exactly p's distribution, so the output distribution equals the target's.
"""

from __future__ import annotations

import torch

from specdec.algorithms.sampling import SamplingParams, sample, uniform, warp_probs
from specdec.errors import SpecdecError
from specdec.types import Acceptance, DraftTree


def children_lists(parents_row: list[int]) -> list[list[int]]:
    """Live children of each node, in index order."""
    kids: list[list[int]] = [[] for _ in parents_row]
    for i, p in enumerate(parents_row):
        if i > 0 and p >= 0:
            kids[p].append(i)
    return kids


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``norm(max(0, p - q))``; p itself when the residual has no mass (then p <= q everywhere, so p == q and
    every draft would have been accepted: a rejection cannot happen except through float rounding)."""
    r = (p - q).clamp_(min=0)
    total = r.sum()
    return r / total if total > 0 else p


def _without(q: torch.Tensor, token: int) -> torch.Tensor:
    q = q.clone()
    q[token] = 0
    total = q.sum()
    return q / total if total > 0 else q


def step_at_node(p: torch.Tensor, q: torch.Tensor | None, candidates: list[int],
                 generator: torch.Generator | None) -> tuple[int | None, torch.Tensor]:
    """Try ``candidates`` (tokens of u's children) against target ``p [V]``; q ``[V]`` or None (point masses).

    Returns ``(index of the accepted candidate or None, the residual p after the rejections)``.
    """
    for i, x in enumerate(candidates):
        if q is None:
            accept = float(p[x])
        else:
            qx = float(q[x])
            if qx <= 0:
                raise SpecdecError("a drafter proposed a token its own draft_probs give probability 0; a drafter "
                                   "that reports draft_probs must draw its children from them.")
            accept = min(1.0, float(p[x]) / qx)
        if uniform(generator) < accept:
            return i, p
        if q is None:
            p = _without(p, x)
        else:
            p = _residual(p, q)
            q = _without(q, x)
    return None, p


def speculative_sampling(tree: DraftTree, logits: torch.Tensor, sampling: SamplingParams,
                         generator: torch.Generator | None = None) -> Acceptance:
    """Chain and tree speculative sampling (``sampling.do_sample`` must be true).

    logits: ``[B, N, V]`` target logits at every node. Uses ``tree.draft_probs [B, N, V]`` (row u = the
    distribution u's children were drawn from, without replacement) when present, point masses otherwise.
    """
    paths, tokens_out = [], []
    for b in range(tree.batch_size):
        parents_row = tree.parents[b].tolist()
        tokens_row = tree.tokens[b].tolist()
        kids = children_lists(parents_row)
        u, path = 0, [0]
        while True:
            p = warp_probs(logits[b, u], sampling)
            q = None if tree.draft_probs is None else tree.draft_probs[b, u].float()
            chosen, p = step_at_node(p, q, [tokens_row[c] for c in kids[u]], generator)
            if chosen is None:
                next_token = sample(p, generator)
                break
            u = kids[u][chosen]
            path.append(u)
        paths.append(path)
        tokens_out.append(next_token)
    return Acceptance.from_paths(paths, tokens_out, tree.tokens.device)
