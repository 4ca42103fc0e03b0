"""N-gram (prompt lookup) drafter: continuations of earlier occurrences of the last n tokens, merged into a trie.

Like transformers' prompt lookup decoding it matches the last ``n`` committed tokens (``n`` from ``max_ngram``
down to ``min_ngram``) against the prompt and the generated text. Unlike it, every matching occurrence
contributes its continuation (most recent first, longer matches weighted higher) and the continuations are merged
into one draft tree within the node budget, so several guesses are verified in one forward.
"""

from __future__ import annotations

from collections import defaultdict

from specdec.algorithms import tree as tree_ops
from specdec.errors import ConfigError
from specdec.protocols import Feedback
from specdec.types import DraftContext, DraftTree


class NGramDrafter:
    """Prompt-lookup drafter over an incrementally built n-gram index (no model, no probabilities).

    max_ngram / min_ngram: longest and shortest suffix to match. max_depth: longest continuation drafted.
    max_candidates: occurrences merged into the trie. The index maps each n-gram to the positions where it ends,
    so a proposal costs O(max_candidates * max_depth) whatever the context length.
    """

    needs_hidden_states = False
    returns_probs = False
    vocab_size = None  # proposes only ids it has seen committed: the target's own

    def __init__(self, target=None, tokenizer=None, max_ngram: int = 3, min_ngram: int = 2, max_depth: int = 8,
                 max_candidates: int = 8) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ConfigError(f"ngram drafter needs 1 <= min_ngram <= max_ngram; got {min_ngram}, {max_ngram}.")
        if max_depth < 1 or max_candidates < 1:
            raise ConfigError("ngram drafter needs max_depth >= 1 and max_candidates >= 1.")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.max_depth, self.max_candidates = max_depth, max_candidates
        self.reset()

    def modules(self) -> list:
        return []

    def reset(self) -> None:
        self._tokens: list[int] = []
        self._index: dict[int, dict[tuple[int, ...], list[int]]] = {
            n: defaultdict(list) for n in range(self.min_ngram, self.max_ngram + 1)
        }

    def _extend(self, new: list[int]) -> None:
        """Index every n-gram ending at a newly committed position."""
        toks = self._tokens
        for t in new:
            toks.append(t)
            end = len(toks) - 1
            for n, index in self._index.items():
                if end - n + 1 >= 0:
                    index[tuple(toks[end - n + 1:end + 1])].append(end)

    def candidates(self, depth: int) -> tuple[list[list[int]], list[float]]:
        """Continuations (most recent, longest match first) of the current suffix, and their weights."""
        toks = self._tokens
        last = len(toks) - 1
        seen: set[int] = set()
        conts: list[list[int]] = []
        weights: list[float] = []
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if n > len(toks):
                continue
            positions = self._index[n].get(tuple(toks[last - n + 1:]), ())
            for p in reversed(positions):
                if p == last or p in seen:
                    continue
                seen.add(p)
                conts.append(toks[p + 1:p + 1 + depth])
                weights.append(float(n))
                if len(conts) >= self.max_candidates:
                    return conts, weights
        return conts, weights

    def propose(self, ctx: DraftContext) -> DraftTree:
        ids = ctx.input_ids
        if ids.shape[0] != 1:
            raise ConfigError("the ngram drafter proposes for one request at a time (input_ids [1, T]).")
        if ids.shape[1] > len(self._tokens):
            self._extend(ids[0, len(self._tokens):].tolist())
        root = self._tokens[-1]
        depth = min(self.max_depth, ctx.max_depth)
        if depth < 1 or ctx.max_nodes < 2:
            return tree_ops.chain(root, [], device=ids.device)
        conts, weights = self.candidates(depth)
        return tree_ops.from_sequences(root, conts, ctx.max_nodes, weights, device=ids.device)

    def observe(self, feedback: Feedback) -> None:
        # the committed tokens reach the index through the next context; nothing to roll back
        pass
