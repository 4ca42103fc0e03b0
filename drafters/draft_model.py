"""Draft-model drafter: a small causal LM that shares the target's vocabulary proposes a chain or a top-k tree.

The tree shape is a list of Medusa-style "choices" (paths of candidate ranks); by default ``width`` candidates at
depth 1, each continued greedily to ``depth`` (``width=1``: a plain chain). The tree grows level by level: one
draft-model forward per level over all of that level's nodes, with a tree mask over the draft model's own KV cache.
After each verify step the draft cache keeps the committed prefix plus the accepted nodes it already ran, so it
never recomputes what it has, and never keeps what the target rejected.
"""

from __future__ import annotations

import torch

from specdec import hf_cache, models, tree as tree_ops
from specdec.errors import ConfigError
from specdec.hf_forward import forward_masked, forward_tokens
from specdec.protocols import Feedback
from specdec.types import DraftContext, DraftTree


class DraftModelDrafter:
    """Proposes trees from a small causal LM's top-k candidates (greedy candidates: no draft probabilities).

    path: hub id or local path of the draft model (or pass ``model=`` directly). depth / width: tree shape when no
    ``choices`` are given. ``vocab_size`` is checked against the target's by :func:`specdec.generate`.
    """

    needs_hidden_states = False
    returns_probs = False

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
            raise ConfigError("the draft_model drafter proposes for one request at a time (input_ids [1, T]).")
        tail = ids[:, hf_cache.cache_length(self.cache):]  # committed tokens the draft model has not seen
        root_logits = forward_tokens(self.model, self.cache, tail).logits[:, -1]  # [1, V]
        parents, ranks = self._shape(ctx.max_nodes, ctx.max_depth)
        tokens = [int(ids[0, -1])] + [0] * (len(parents) - 1)
        self._prefix, self._ran = ids.shape[1], 0
        if len(parents) > 1:
            self._grow(tokens, parents, ranks, root_logits)
        return DraftTree(torch.tensor([tokens]), torch.tensor([parents]))

    def _grow(self, tokens: list[int], parents: list[int], ranks: list[int], root_logits: torch.Tensor) -> None:
        """Fill ``tokens`` level by level: each node takes its rank among its parent's top-k draft tokens."""
        depths = self.depths[: len(parents)]
        topk = {0: root_logits[0].topk(max(ranks[1:]) + 1).indices.tolist()}
        parents_t = torch.tensor([parents])
        lo = 1
        while lo < len(parents):
            hi = lo
            while hi < len(parents) and depths[hi] == depths[lo]:
                hi += 1
            for i in range(lo, hi):
                tokens[i] = topk[parents[i]][ranks[i]]
            need = [ranks[j] for j in range(hi, len(parents)) if lo <= parents[j] < hi]
            if need:  # some node of this level has children: run the level through the draft model
                logits = self._forward_level(tokens, parents_t, lo, hi)
                k = max(need) + 1
                for i in range(lo, hi):
                    topk[i] = logits[0, i - lo].topk(k).indices.tolist()
            lo = hi

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
