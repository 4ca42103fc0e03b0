"""Draft-model drafter: a small causal LM that shares the target's vocabulary proposes a chain or a top-k tree.

The tree shape is a list of Medusa-style "choices" (paths of candidate ranks); by default ``width`` candidates at
depth 1, each continued greedily to ``depth`` (``width=1``: a plain chain). The tree grows level by level: one
draft-model forward per level over all of that level's nodes, with a tree mask over the draft model's own KV cache.
After each verify step the draft cache keeps the committed prefix plus the accepted nodes it already ran, so it
never recomputes what it has, and never keeps what the target rejected.
"""

from __future__ import annotations

import torch

from specdec import hf_cache, models
from specdec import tree as tree_ops
from specdec.errors import ConfigError
from specdec.hf_forward import forward_masked, forward_tokens
from specdec.protocols import Feedback
from specdec.sampling import warp_probs
from specdec.types import DEAD, DraftContext, DraftTree


class DraftModelDrafter:
    """Proposes trees from a small causal LM.

    Greedy requests: each node's children are the draft model's top-k tokens (deterministic candidates, no
    draft probabilities). Sampled requests: children are drawn without replacement from the draft model's
    distribution q, warped like the target's (temperature, top-k, top-p), and the tree reports q as
    ``draft_probs`` so the rejection rule stays lossless.

    path: hub id or local path of the draft model (or pass ``model=`` directly). depth / width: tree shape when no
    ``choices`` are given. ``vocab_size`` is checked against the target's by :func:`specdec.generate`.
    """

    needs_hidden_states = False
    returns_probs = True  # when sampling

    def __init__(self, target=None, tokenizer=None, path: str | None = None, model=None, depth: int = 4,
                 width: int = 1, choices: list[list[int]] | None = None, dtype: str | None = None) -> None:
        if model is None:
            if not path:
                raise ConfigError(
                    "the draft_model drafter needs a model: set drafter.path=<hub id or local path> "
                    "(a causal LM sharing the target's tokenizer), or pass model=... in Python."
                )
            model, _ = models.load_target(path, dtype=dtype or "float32")
        if depth < 1 or width < 1:
            raise ConfigError(f"draft_model needs depth >= 1 and width >= 1; got depth={depth}, width={width}.")
        self.model = model.eval()
        self.vocab_size = models.vocab_size(self.model)
        choices = choices if choices is not None else tree_ops.choices_for_shape(depth, width)
        self.parents, self.ranks = tree_ops.topology_from_choices(choices)
        check_contiguous_ranks(self.parents, self.ranks)
        self.depths = tree_ops.depths(torch.tensor([self.parents]))[0].tolist()
        self.reset()

    def reset(self) -> None:
        self.cache = hf_cache.new_cache()
        self._prefix = 0  # committed tokens in the draft cache when the last tree was grown (root included)
        self._ran = 0  # tree nodes (after the root) whose K/V sit in the draft cache after the prefix

    def _shape(self, max_nodes: int, max_depth: int) -> tuple[list[int], list[int]]:
        """The configured tree cut to the node budget and depth limit (a prefix in node order)."""
        keep = [i for i in range(len(self.parents)) if self.depths[i] <= max_depth][:max_nodes]
        return [self.parents[i] for i in keep], [self.ranks[i] for i in keep]

    def propose(self, ctx: DraftContext) -> DraftTree:
        ids = ctx.input_ids
        if ids.shape[0] != 1:
            raise ConfigError(f"the {type(self).__name__} proposes for one request at a time (input_ids [1, T]).")
        root_logits = self._advance(ctx)  # [1, V]
        parents, ranks = self._shape(ctx.max_nodes, ctx.max_depth)
        tokens = [int(ids[0, -1])] + [0] * (len(parents) - 1)
        self._ran = 0
        sampling = ctx.sampling if ctx.sampling is not None and ctx.sampling.do_sample else None
        probs = torch.zeros(1, len(parents), root_logits.shape[-1]) if sampling else None
        if len(parents) > 1:
            self._grow(tokens, parents, ranks, root_logits, sampling, ctx.generator, probs)
        return DraftTree(torch.tensor([tokens]), torch.tensor([parents]), probs)

    def _advance(self, ctx: DraftContext) -> torch.Tensor:
        """Bring the draft cache up to the committed tokens; the root's next-token logits ``[1, V]``.

        Sets ``self._prefix``: the cache entries before the tree's first node (the root's entry is the last).
        """
        tail = ctx.input_ids[:, hf_cache.cache_length(self.cache):]  # committed tokens the draft model has not seen
        self._prefix = ctx.input_ids.shape[1]
        return forward_tokens(self.model, self.cache, tail).logits[:, -1]

    def _grow(self, tokens: list[int], parents: list[int], ranks: list[int], root_logits: torch.Tensor,
              sampling, generator, probs: torch.Tensor | None) -> None:
        """Fill ``tokens`` level by level: node i takes candidate ``ranks[i]`` of its parent's candidates.

        A node whose parent has too few candidates (sampling from a distribution with fewer tokens left than
        asked for) becomes dead: ``parents[i] = -2``, and so does its subtree.
        """
        depths = self.depths[: len(parents)]
        cands = {0: self._candidates(root_logits[0], max(ranks[1:]) + 1, sampling, generator, probs, 0)}
        lo = 1
        while lo < len(parents):
            hi = lo
            while hi < len(parents) and depths[hi] == depths[lo]:
                hi += 1
            for i in range(lo, hi):
                options = cands.get(parents[i], [])
                if parents[i] >= 0 and ranks[i] < len(options):
                    tokens[i] = options[ranks[i]]
                else:
                    parents[i] = DEAD
            need = [ranks[j] for j in range(hi, len(parents)) if lo <= parents[j] < hi]
            if need:  # some node of this level has children: run the level through the draft model
                logits = self._forward_level(tokens, torch.tensor([parents]), lo, hi)
                k = max(need) + 1
                for i in range(lo, hi):
                    if parents[i] >= 0:
                        cands[i] = self._candidates(logits[0, i - lo], k, sampling, generator, probs, i)
            lo = hi

    @staticmethod
    def _candidates(logits: torch.Tensor, k: int, sampling, generator, probs: torch.Tensor | None,
                    node: int) -> list[int]:
        """Top-k tokens (greedy) or k tokens drawn without replacement from the warped q (sampling)."""
        if sampling is None:
            return logits.topk(k).indices.tolist()
        q = warp_probs(logits, sampling)
        probs[0, node] = q
        k = min(k, int((q > 0).sum()))
        return torch.multinomial(q, k, replacement=False, generator=generator).tolist()

    def _forward_level(self, tokens: list[int], parents_t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        seg = torch.tensor([tokens[lo:hi]])
        sub = parents_t[:, :hi]
        chain = tree_ops.is_chain(sub)
        mask = None if chain else tree_ops.segment_mask(sub, lo, hi, self._prefix, self.model.dtype)
        pos = (self._prefix - 1 + tree_ops.depths(sub)[:, lo:hi])
        out = forward_masked(self.model, self.cache, seg, mask, pos)
        self._ran = hi - 1
        return out.logits

    def observe(self, feedback: Feedback) -> None:
        """Keep the accepted nodes the draft model already ran; drop the rest of the tree from its cache."""
        path = feedback.acceptance.accepted_nodes(0)[1:]
        keep = [node - 1 for node in path if node - 1 < self._ran]
        hf_cache.keep_positions(self.cache, self._prefix, keep)
        self._ran = 0


def check_contiguous_ranks(parents: list[int], ranks: list[int]) -> None:
    """Each node's children must use candidate ranks 0..k-1 with no gap.

    When sampling, siblings are drawn without replacement in rank order; a skipped rank would be drawn and then
    left out of the tree, and the rejection rule (which removes only the tried siblings from q) would be wrong.
    """
    seen: dict[int, list[int]] = {}
    for p, r in zip(parents[1:], ranks[1:]):
        seen.setdefault(p, []).append(r)
    for p, rs in seen.items():
        if sorted(rs) != list(range(len(rs))):
            raise ConfigError(
                f"draft tree choices give node {p} children of ranks {sorted(rs)}; use ranks 0..{len(rs) - 1} "
                "without gaps (add the missing choices)."
            )
