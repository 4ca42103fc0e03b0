"""Typical acceptance (Medusa's posterior threshold). **LOSSY**: the output distribution is NOT the target's.

A draft token x at a node whose target distribution is p (temperature applied) is accepted when
``p(x) > min(posterior_threshold, posterior_alpha * exp(-H(p)))`` and its parent was accepted; the deepest
accepted node ends the path and the next token is sampled from p there. Plausible-but-unlikely drafts are kept
that rejection sampling would often reject, so tau is higher and outputs drift from the target's distribution.
It exists for comparison with Medusa; every report labels it lossy.
"""

from __future__ import annotations

import math

import torch

from specdec.algorithms.sampling import SamplingParams, sample, warp_probs
from specdec.types import Acceptance, DraftTree

POSTERIOR_THRESHOLD = 0.09  # Medusa's defaults
POSTERIOR_ALPHA = 0.3


def typical_threshold(p: torch.Tensor, threshold: float = POSTERIOR_THRESHOLD,
                      alpha: float = POSTERIOR_ALPHA) -> torch.Tensor:
    """``[...]`` acceptance threshold per distribution ``p [..., V]``: min(threshold, alpha * exp(-entropy))."""
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)
    return torch.minimum(torch.full_like(entropy, threshold), alpha * torch.exp(-entropy))


def typical(tree: DraftTree, logits: torch.Tensor, sampling: SamplingParams | None = None,
            generator: torch.Generator | None = None) -> Acceptance:
    """LOSSY typical acceptance over a tree; logits ``[B, N, V]``. Greedy (argmax) bonus when not sampling.

    A node is accepted when its parent is and the target at the parent gives its token more than the parent's
    threshold. As in Medusa's ``evaluate_posterior``, the deepest accepted node ends the path; among equally deep
    ones the path the target finds most likely (sum of log p of its tokens), then the lowest index.

    Example: root children 3 (p 0.08) and 0 (p 0.5), both above the root's threshold 0.067; only the child of 3
    passes its own threshold, so the path is root -> 3 -> its child (depth 2), not root -> 0 (depth 1).
    """
    sampling = sampling or SamplingParams()
    probs = warp_probs(logits, SamplingParams(do_sample=True, temperature=sampling.temperature
                                              if sampling.do_sample else 1.0))  # [B, N, V]
    thresholds = typical_threshold(probs)  # [B, N]
    paths, next_tokens = [], []
    for b in range(tree.batch_size):
        path = _deepest_typical_path(tree.parents[b].tolist(), tree.tokens[b].tolist(), probs[b], thresholds[b])
        paths.append(path)
        u = path[-1]
        if sampling.do_sample:
            next_tokens.append(sample(warp_probs(logits[b, u], sampling), generator))
        else:
            next_tokens.append(int(logits[b, u].argmax()))
    return Acceptance.from_paths(paths, next_tokens, tree.tokens.device)


def _deepest_typical_path(parents: list[int], tokens: list[int], probs: torch.Tensor,
                          thresholds: torch.Tensor) -> list[int]:
    """Root-first path to the deepest accepted node (ties: highest path log-likelihood, then lowest index).

    probs ``[N, V]`` and thresholds ``[N]`` of one tree; parents precede children, so one pass suffices.
    """
    n = len(parents)
    ok = [False] * n
    depth = [0] * n
    loglik = [0.0] * n
    ok[0] = True
    best = 0
    for i in range(1, n):
        par = parents[i]
        if par < 0 or not ok[par]:
            continue
        p = float(probs[par, tokens[i]])
        if p > float(thresholds[par]):
            ok[i], depth[i], loglik[i] = True, depth[par] + 1, loglik[par] + math.log(p)
            if (depth[i], loglik[i]) > (depth[best], loglik[best]):
                best = i
    path = [best]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    return path[::-1]
