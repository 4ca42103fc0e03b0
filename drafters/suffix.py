"""Suffix decoding: draft trees from what followed the context's end, in this request and in every earlier one.

As SuffixDecoding (arXiv 2411.04975) does, without training and without a model: the request's prompt and output and
a shared, bounded cache of earlier requests' prompts and outputs (:class:`drafters.suffix_cache.SuffixCache`) are
searched for earlier occurrences of the context's last tokens; each occurrence is scored by how far back it agrees
with the context (its match length), and the continuations that followed them are merged into one tree where a
continuation many occurrences agree on weighs more (the tree's node scores are those weights' shares, which the
adaptive budget calibrates against what gets accepted). How deep a continuation is drafted follows its match: a
match of ``m`` tokens drafts up to ``spec_factor * m`` (at most ``max_depth``), so a long agreement (a copied
passage, a repeated template) drafts far and a two-token coincidence drafts little.

Every drafter built with the same ``cache`` name in one process shares one cache, so the requests of a decoder, a
batch or a server learn from each other as they run (a seeded sampled request drafts from its own text only, so that
its sample depends on its seed and prompt alone); ``cache_file`` keeps it across restarts (written when a request
ends, read when the first drafter is built; refused with a clear error when it was built for another tokenizer).
"""

from __future__ import annotations

import math
import threading

from drafters.suffix_cache import SuffixCache, shared_cache, tokenizer_fingerprint
from specdec.algorithms import tree as tree_ops
from specdec.errors import ConfigError
from specdec.protocols import Feedback
from specdec.types import DraftContext, DraftTree

_SAVE_LOCK = threading.Lock()  # one writer of a cache file at a time within the process


def _vocab_size(target) -> int | None:
    """The target's vocabulary size (None without a target: a drafter tested alone)."""
    return None if target is None else target.config.get_text_config().vocab_size


class SuffixDrafter:
    """Suffix-decoding drafter (no model, no probabilities).

    max_depth: deepest continuation. max_match: longest agreement measured. spec_factor: a match of m tokens drafts
    up to ``ceil(spec_factor * m)`` tokens. max_candidates: occurrences merged into the tree. min_share: nodes that
    fewer than this share of the occurrences' weight agree on are not drafted. cache: name of the shared cache
    (drafters with one name share it); cache_tokens: its size limit in tokens; cache_positions: occurrences kept per
    token pair; cache_file: where to keep it across restarts (None: memory only). suffix_cache: a cache object to use
    instead of the named one.
    """

    needs_hidden_states = False
    returns_probs = False
    vocab_size = None  # proposes only ids it has seen committed: the target's own

    def __init__(self, target=None, tokenizer=None, max_depth: int = 16, max_match: int = 32,
                 spec_factor: float = 1.0, max_candidates: int = 16, min_share: float = 0.1,
                 cache: str = "default", cache_tokens: int = 1_000_000, cache_positions: int = 64,
                 cache_file: str | None = None, suffix_cache: SuffixCache | None = None) -> None:
        if max_depth < 1 or max_match < 2 or max_candidates < 1 or spec_factor <= 0 or not 0 <= min_share <= 1:
            raise ConfigError("the suffix drafter needs max_depth >= 1, max_match >= 2, max_candidates >= 1, "
                              f"spec_factor > 0 and 0 <= min_share <= 1; got max_depth={max_depth}, "
                              f"max_match={max_match}, max_candidates={max_candidates}, spec_factor={spec_factor}, "
                              f"min_share={min_share}.")
        self.max_depth, self.max_match, self.spec_factor = max_depth, max_match, spec_factor
        self.max_candidates, self.min_share = max_candidates, min_share
        self.cache_file = cache_file
        self.cache = suffix_cache if suffix_cache is not None else shared_cache(
            cache, tokenizer_fingerprint(tokenizer, _vocab_size(target)), cache_tokens, cache_positions, cache_file)
        self._segment: int | None = None
        self._tokens: list[int] = []
        self.reset()

    def modules(self) -> list:
        return []

    def reset(self) -> None:
        """The previous request is over: its tokens stay in the shared cache (saved to ``cache_file`` if set)."""
        if self._segment is not None:
            self.cache.close_segment(self._segment)
            if self.cache_file:
                with _SAVE_LOCK:
                    self.cache.save(self.cache_file)
        self._segment = None
        self._tokens = []

    def propose(self, ctx: DraftContext) -> DraftTree:
        ids = ctx.input_ids
        if ids.shape[0] != 1:
            raise ConfigError("the suffix drafter proposes for one request at a time (input_ids [1, T]).")
        if self._segment is None:
            self._segment = self.cache.open_segment()
        if ids.shape[1] > len(self._tokens):
            new = ids[0, len(self._tokens):].tolist()
            self._tokens += new
            self.cache.extend(self._segment, new)
        root = self._tokens[-1]
        depth = min(self.max_depth, ctx.max_depth)
        if depth < 1 or ctx.max_nodes < 2:
            return tree_ops.chain(root, [], device=ids.device)
        # a seeded sampled request drafts from its own text only: its trees, and so its sample, then depend on its
        # seed and prompt alone, as with every other drafter (greedy output never depends on the trees)
        seeded = ctx.generator is not None and ctx.sampling is not None and ctx.sampling.do_sample
        found = self.cache.matches(self._tokens, self._segment, self.max_match, depth, self.max_candidates,
                                   own_only=seeded)
        conts = [m.continuation[:math.ceil(self.spec_factor * m.length)] for m in found]
        weights = [float(m.length) for m in found]
        tree = tree_ops.from_sequences(root, conts, ctx.max_nodes, weights, device=ids.device)
        if self.min_share > 0 and tree.num_nodes > 1:
            keep = [i for i, s in enumerate(tree.scores[0].tolist()) if i == 0 or s >= self.min_share]
            if len(keep) < tree.num_nodes:  # best-first order: a kept node's parent scores at least as high
                tree = tree_ops.keep_nodes(tree, keep)
        return tree

    def observe(self, feedback: Feedback) -> None:
        """The step's committed tokens go into the cache now (not at the next proposal): a request's last step has
        no next proposal, and its tokens are as useful to the requests after it as the others."""
        if self._segment is not None:
            new = feedback.new_tokens[0].tolist()
            self._tokens += new
            self.cache.extend(self._segment, new)
