"""Token recycling: draft trees from the target's own top-k predictions at earlier verify steps, without a model.

As Token Recycling (arXiv 2408.08696) does: every verify step already computes the target's distribution after
each node of its tree; the top-k of each goes into an adjacency table (:class:`drafters.successor_table.
SuccessorTable`: token -> its most likely successors, the latest seen), shared by every request, and the next
trees are grown from the root through that table. Where the paper grows a fixed template breadth-first, this drafter
grows the tree best-first by path score: a candidate's score is the product along its path of how often a
candidate of its rank (first, second, ... most likely) was accepted when its parent was, counted online per
drafter. The tree's node scores are those products, which the adaptive budget calibrates and cuts; without a
budget the tree stops at ``max_nodes`` or where a path's score falls below ``min_score``.

The table is filled from the logits the verify step computes for the acceptance rule (the decode driver takes
their top-k for a :class:`specdec.protocols.SuccessorDrafter`): no extra target forward, but a greedy step then
computes the logits instead of the screened argmax (:mod:`specdec.kernels.greedy_head`). A seeded sampled request
drafts from a table of its own (filled by its own steps, it also writes the shared one), so its sample depends on its
seed and prompt alone. ``table_file`` keeps the shared table across restarts (written when a request ends, read when
the first drafter is built; refused with a clear error when it was built for another tokenizer).
"""

from __future__ import annotations

import heapq
import itertools
import threading

import torch

from drafters.successor_table import SuccessorTable, shared_table
from drafters.suffix_cache import tokenizer_fingerprint
from specdec.algorithms import tree as tree_ops
from specdec.errors import ConfigError
from specdec.protocols import Feedback
from specdec.types import DraftContext, DraftTree

_SAVE_LOCK = threading.Lock()  # one writer of a table file at a time within the process
# acceptance of a rank-r candidate given its parent was accepted, before anything is counted: a prior worth
# PRIOR_WEIGHT observations (the first candidate is the target's own argmax the last time: often right)
PRIOR = (0.5, 0.15, 0.08, 0.05, 0.03, 0.02, 0.02, 0.01)
PRIOR_WEIGHT = 20.0


def _vocab_size(target) -> int | None:
    return None if target is None else target.config.get_text_config().vocab_size


class RecyclingDrafter:
    """Token-recycling drafter (no model, no probabilities).

    k: successors kept per token (the top-k read from each verify step). max_depth: deepest node. branch: most
    children a node gets (at most k). min_score: candidates whose path score is below it are not drafted. table:
    name of the shared table (drafters with one name share it); table_file: where to keep it across restarts (None:
    memory only). successor_table: a table object to use instead of the named one. seeded_private: a seeded sampled
    request drafts from a table of its own (its sample then depends on its seed and prompt alone); False: from the
    shared one like every other request (still the target's distribution).
    """

    needs_hidden_states = False
    returns_probs = False
    vocab_size = None  # proposes only ids the target predicted

    def __init__(self, target=None, tokenizer=None, k: int = 8, max_depth: int = 8, branch: int = 8,
                 min_score: float = 0.02, table: str = "default", table_file: str | None = None,
                 successor_table: SuccessorTable | None = None, seeded_private: bool = True) -> None:
        if k < 1 or max_depth < 1 or branch < 1 or not 0 <= min_score < 1:
            raise ConfigError("the recycling drafter needs k >= 1, max_depth >= 1, branch >= 1 and "
                              f"0 <= min_score < 1; got k={k}, max_depth={max_depth}, branch={branch}, "
                              f"min_score={min_score}.")
        self.needs_successors = k
        self.max_depth, self.branch, self.min_score = max_depth, min(branch, k), min_score
        self.table_file, self.seeded_private = table_file, seeded_private
        self._vocab = _vocab_size(target)
        self.table = successor_table if successor_table is not None else shared_table(
            table, tokenizer_fingerprint(tokenizer, self._vocab), k, self._vocab, table_file)
        # per rank: [accepted, tried] counts of candidates whose parent was accepted (kept across requests: they
        # describe the table, not the request)
        self.counts = [[PRIOR[r] * PRIOR_WEIGHT if r < len(PRIOR) else 0.01 * PRIOR_WEIGHT, PRIOR_WEIGHT]
                       for r in range(k)]
        self._own: SuccessorTable | None = None  # a seeded sampled request's own table
        self._ranks: list[int] = []
        self._request_started = False
        self.reset()

    def modules(self) -> list:
        return []

    def reset(self) -> None:
        """The previous request is over: what it taught stays in the shared table (saved to ``table_file``)."""
        if self._request_started and self.table_file:
            with _SAVE_LOCK:
                self.table.save(self.table_file)
        self._own, self._ranks, self._request_started = None, [], False

    def rank_probs(self) -> list[float]:
        """How often a candidate of each rank was accepted when its parent was (with the prior)."""
        return [a / t for a, t in self.counts]

    def propose(self, ctx: DraftContext) -> DraftTree:
        ids = ctx.input_ids
        if ids.shape[0] != 1:
            raise ConfigError("the recycling drafter proposes for one request at a time (input_ids [1, T]).")
        if not self._request_started:
            self._request_started = True
            # a seeded sampled request reads its own table only: its trees, and so its sample, then depend on its
            # seed and prompt alone (greedy output never depends on the trees)
            if self.seeded_private and ctx.generator is not None and ctx.sampling is not None \
                    and ctx.sampling.do_sample:
                self._own = SuccessorTable(self.table.k, self._vocab, self.table.fingerprint)
        root = int(ids[0, -1])
        depth_limit = min(self.max_depth, ctx.max_depth)
        if depth_limit < 1 or ctx.max_nodes < 2:
            self._ranks = [-1]
            return tree_ops.chain(root, [], device=ids.device)
        table = self._own if self._own is not None else self.table
        probs = self.rank_probs()
        tokens, parents, scores, ranks, depths = [root], [-1], [1.0], [-1], [0]
        frontier: list[tuple[float, int, int, int, int]] = []  # (-score, order, parent, rank, token): best first
        order = itertools.count()

        def expand(node: int) -> None:
            if depths[node] >= depth_limit:
                return
            for r, token in enumerate(table.successors(tokens[node])[:self.branch]):
                s = scores[node] * probs[r]
                if s >= self.min_score:
                    heapq.heappush(frontier, (-s, next(order), node, r, token))

        expand(0)
        while frontier and len(tokens) < ctx.max_nodes:
            neg, _, parent, r, token = heapq.heappop(frontier)
            tokens.append(token)
            parents.append(parent)
            scores.append(-neg)
            ranks.append(r)
            depths.append(depths[parent] + 1)
            expand(len(tokens) - 1)
        self._ranks = ranks
        dev = ids.device
        return DraftTree(torch.tensor([tokens], device=dev), torch.tensor([parents], device=dev),
                         scores=torch.tensor([scores], device=dev))

    def observe(self, feedback: Feedback) -> None:
        """The step's verified nodes and their top-k go into the table; the ranks tried along the accepted path
        update the rank probabilities."""
        s = feedback.successors
        if s is not None:
            tokens, topk = s.tokens.cpu().numpy(), s.topk.cpu().numpy()
            self.table.update(tokens, topk)
            if self._own is not None:
                self._own.update(tokens, topk)
        tree, ranks = feedback.tree, self._ranks
        if tree.num_nodes != len(ranks):  # not the tree this drafter proposed (a chain without drafting)
            return
        on_path = set(feedback.acceptance.accepted_nodes(0))
        for i, p in enumerate(tree.parents[0].tolist()):
            if i and p in on_path and ranks[i] >= 0:
                self.counts[ranks[i]][1] += 1
                self.counts[ranks[i]][0] += i in on_path
