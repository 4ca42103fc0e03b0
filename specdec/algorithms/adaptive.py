"""Per-request adaptive draft budgets: running acceptance statistics + the cost model -> next step's node budget.

Each request owns an :class:`AdaptiveBudget`. After every verify step it records, by depth, whether the accepted
path went deeper when a draft node was there to take (``AcceptanceStats``: an exponential moving average of the
conditional acceptance rate at each depth), and how long the drafter's ``propose`` took. Before the next step it
asks :func:`specdec.algorithms.cost.choose_budget` for the node budget that maximises expected tokens per second on this
machine, treating the drafter's best nodes as a chain (node k accepted with the product of the first k depth
rates). A drafter that is not being accepted is thus switched off (budget 1: plain decoding) and re-tried now and
then (every ``probe_every`` steps it gets a small tree again, so its statistics can recover).

Drafters that score their nodes (``DraftTree.scores``: dynamic trees' path probabilities, n-gram support) are
budgeted per step instead: they propose up to ``max_nodes`` and :meth:`AdaptiveBudget.cut` keeps the nodes that
pay on this step's own confidences, calibrated against what was accepted (:class:`Calibrator`). A confident step
keeps a deep chain, an unsure one a few siblings or nothing. Only trees without ``draft_probs`` (deterministic
candidates) are cut, which is lossless for any choice of nodes; sampled trees keep their size.

The output never depends on the budget (every budget is lossless); only the speed does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from specdec.algorithms import tree as tree_ops
from specdec.algorithms.cost import CostProfile, chain_node_values, choose_budget
from specdec.types import Acceptance, DraftTree


class Calibrator:
    """A drafter's raw node confidence -> the probability that the node is accepted, learned from what is accepted.

    Cells are (confidence bin, depth); each holds decayed counts of drafted and accepted nodes plus ``prior_weight``
    pseudo-nodes accepted at the raw confidence itself (a calibrated drafter needs no correction). A node's value is
    never above its parent's, so values stay ancestor-monotone. One calibrator can serve many requests of the same
    drafter (the decoder shares one), so what was learned carries over to the next request.

    >>> c = Calibrator(bins=2, max_depth=2, prior_weight=1.0, decay=1.0)
    >>> c.update([1.0, 0.9, 0.9], [0, 1, 2], [True, False, False])
    >>> [round(v, 3) for v in c.values([1.0, 0.9, 0.9], [0, 1, 2], [-1, 0, 1])]
    [1.0, 0.45, 0.45]
    """

    def __init__(self, bins: int = 10, max_depth: int = 8, prior_weight: float = 2.0, decay: float = 0.998) -> None:
        self.bins, self.max_depth, self.prior_weight, self.decay = bins, max_depth, prior_weight, decay
        self.drafted = [[0.0] * bins for _ in range(max_depth)]
        self.accepted = [[0.0] * bins for _ in range(max_depth)]

    def _cell(self, score: float, depth: int) -> tuple[int, int]:
        return min(depth, self.max_depth) - 1, min(int(max(score, 0.0) * self.bins + 1e-6), self.bins - 1)  # float32-safe

    def value(self, score: float, depth: int) -> float:
        """Estimated P(accepted) of a node at ``depth`` >= 1 with raw confidence ``score``."""
        d, b = self._cell(score, depth)
        w = self.prior_weight
        return (self.accepted[d][b] + w * float(score)) / (self.drafted[d][b] + w)

    def values(self, scores: list[float], depths: list[int], parents: list[int]) -> list[float]:
        """Calibrated values of a tree's nodes (root 1.0; parents before children; dead nodes 0)."""
        out = [1.0] * len(scores)
        for i in range(1, len(scores)):
            p = parents[i]
            out[i] = 0.0 if p < 0 else min(out[p], self.value(scores[i], depths[i]))
        return out

    def update(self, scores: list[float], depths: list[int], accepted: list[bool]) -> None:
        """One verified tree: every non-root node's raw score, depth and whether it is on the accepted path."""
        for row in (*self.drafted, *self.accepted):
            for b in range(self.bins):
                row[b] *= self.decay
        for score, depth, hit in zip(scores[1:], depths[1:], accepted[1:]):
            if depth >= 1:
                d, b = self._cell(score, depth)
                self.drafted[d][b] += 1.0
                self.accepted[d][b] += float(hit)


def uncut(acceptance: Acceptance, keep: list[int]) -> Acceptance:
    """An acceptance over a cut tree renumbered to the tree it was cut from (``keep``: the kept nodes' indices
    there), so a drafter is told what was accepted of its own tree."""
    path = [keep[i] for i in acceptance.accepted_nodes(0)]
    return Acceptance.from_paths([path], [int(acceptance.next_token[0])], device=acceptance.path.device)


@dataclass
class AcceptanceStats:
    """Conditional acceptance by depth: ``rates[d]`` ~ P(depth d+1 accepted | depth d accepted, a node drafted there).

    decay: weight of the past in the moving average; prior: the rate assumed before any observation.
    """

    decay: float = 0.9
    prior: float = 0.5
    rates: list[float] = field(default_factory=list)
    steps: int = 0

    def rate(self, d: int) -> float:
        return self.rates[d] if d < len(self.rates) else self.prior

    def update(self, drafted_depth: int, accepted: int) -> None:
        """One verify step: the tree reached ``drafted_depth``; the accepted path has ``accepted`` draft tokens.

        Depths 1..accepted count as successes; depth accepted+1 (if drafted) as a failure; deeper ones were never
        reached, so they are not evidence.

        >>> s = AcceptanceStats(decay=0.5, prior=0.5); s.update(drafted_depth=3, accepted=1); s.rates
        [0.75, 0.25]
        """
        self.steps += 1
        for d in range(min(accepted + 1, drafted_depth)):
            while len(self.rates) <= d:
                self.rates.append(self.prior)
            hit = 1.0 if d < accepted else 0.0
            self.rates[d] = self.decay * self.rates[d] + (1 - self.decay) * hit


class AdaptiveBudget:
    """The node budget of one request's next verify step (root included), re-decided after every step.

    profile: measured verify costs (and drafter call costs, updated online here); drafter: its kind (the key of
    ``profile.draft_ms``); max_nodes: the largest budget allowed; probe_every: after this many steps at budget 1,
    give the drafter a ``probe_nodes`` tree to see whether it is being accepted again. calibrator: what the
    drafter's node scores are worth (shared across requests; a fresh one if None). off_after: for scored drafters,
    the unpaid steps in a row after which drafting stops until the next probe. In a batch, probes come
    ``1 + batch_rows`` times less often: each is a drafter call (an EAGLE-style head's catch-up over the skipped
    steps, then its tree) that a batch's step seldom repays, and every request of the batch probes.
    """

    def __init__(self, profile: CostProfile, drafter: str, max_nodes: int = 32, decay: float = 0.9,
                 prior: float = 0.5, probe_every: int = 8, probe_nodes: int = 2,
                 calibrator: Calibrator | None = None, off_after: int = 4) -> None:
        self.profile = profile
        self.drafter = drafter
        self.max_nodes = max_nodes
        self.stats = AcceptanceStats(decay=decay, prior=prior)
        self.calibrator = calibrator if calibrator is not None else Calibrator()
        self.draft_ms: float | None = profile.draft_ms.get(drafter)
        self.probe_every = probe_every
        self.probe_nodes = probe_nodes
        self.off_after = off_after  # scored drafters: after this many unpaid steps in a row, stop drafting
        self._idle = 0
        self._scored = False  # the drafter's trees carry scores: budget each step by cutting
        self._unpaid = 0  # consecutive steps where drafting, its call included, did not beat plain decoding
        self._probing = False
        self._chosen: tuple = (None, 1)  # (inputs, nodes) of the last cost-model choice in nodes()
        self.history: list[int] = []  # budgets used, one per step (after the cut, for scored trees)

    def nodes(self, batch_rows: int = 0) -> int:
        """The budget for the next step; ``batch_rows``: rows the other requests of the batch put in the same step.

        For a drafter that scores its nodes this is an upper bound (``max_nodes``, or 1 while drafting does not
        pay) and :meth:`cut` decides the step's tree."""
        every = self.probe_every * (1 + batch_rows)
        if self._scored:
            n = self.max_nodes
            if self._unpaid >= self.off_after:
                self._idle += 1
                n = 1
                if self._idle >= every:
                    self._idle, n, self._probing = 0, self.max_nodes, True
            self.history.append(n)
            return n
        # the same inputs, the same choice: a step that drafts nothing changes no rate, so in a batch (where the
        # budget mostly stays at 1) the cost model ran for every request and step (0.17 ms each under cProfile)
        key = (tuple(self.stats.rates), batch_rows, self.draft_ms)
        if key != self._chosen[0]:
            values = chain_node_values([self.stats.rate(d) for d in range(self.max_nodes - 1)])
            self._chosen = (key, choose_budget(self._profile(), values, self.drafter, self.max_nodes,
                                               base_rows=batch_rows).nodes)
        n = self._chosen[1]
        if n == 1:
            self._idle += 1
            if self._idle >= every:
                self._idle = 0
                n = min(self.probe_nodes, self.max_nodes)
        else:
            self._idle = 0
        self.history.append(n)
        return n

    def cut(self, tree: DraftTree, batch_rows: int = 0) -> tuple[DraftTree, list[int] | None]:
        """This step's tree: the proposed one cut to the nodes that pay for their verify cost, by calibrated
        confidence and the cost model (:func:`specdec.algorithms.cost.choose_budget`, then
        :func:`specdec.algorithms.tree.best_subtree`). After ``off_after`` steps in a row where drafting did not pay
        for its call too, the next steps do not draft (probed every ``probe_every`` steps). Returns the tree and the
        kept nodes' indices in the proposed tree (None when nothing was cut). Trees without scores, or with
        ``draft_probs`` (sampled drafts, whose rejection rule needs every drawn sibling), are returned as they are.
        """
        if tree.scores is None or tree.draft_probs is not None or tree.num_nodes < 2:
            return tree, None
        self._scored = True
        parents = tree.parents[0].tolist()
        values = self.calibrator.values(tree.scores[0].tolist(), tree_ops.depths(tree.parents)[0].tolist(), parents)
        # the drafter's call is spent by now: keep what pays for its verify cost alone; whether drafting paid at all
        # (its call cost included) decides if the next steps draft
        profile = self._profile()
        budget = choose_budget(profile, values[1:], None, tree.num_nodes, base_rows=batch_rows)
        n = budget.nodes
        plain = (1.0 + batch_rows) / profile.verify(1 + batch_rows)
        paid = n > 1 and budget.expected_tokens / (budget.step_ms + profile.draft(self.drafter)) > plain
        self._unpaid = 0 if paid else self._unpaid + 1
        if self._probing:  # a probe verifies a few nodes whatever the calibration says, so it can learn it was wrong
            self._probing = False
            n = max(n, min(self.probe_nodes, tree.num_nodes))
        if self.history:
            self.history[-1] = n
        if n >= tree.num_nodes:
            return tree, None
        keep = tree_ops.best_subtree(parents, values, n)
        return tree_ops.keep_nodes(tree, keep), keep

    def observe(self, tree: DraftTree, acceptance: Acceptance, draft_ms: float | None = None) -> None:
        """Record one verify step of this request (``tree`` — as verified, after any cut — and ``acceptance`` for
        batch row 0)."""
        depths = tree_ops.depths(tree.parents)[0].tolist()
        depth = max(depths) if tree.num_nodes > 1 else 0
        self.stats.update(depth, int(acceptance.num_accepted[0]))
        if tree.scores is not None and tree.num_nodes > 1:
            on_path = set(acceptance.accepted_nodes(0))
            self.calibrator.update(tree.scores[0].tolist(), depths, [i in on_path for i in range(tree.num_nodes)])
        if draft_ms is not None:
            self.draft_ms = draft_ms if self.draft_ms is None else 0.8 * self.draft_ms + 0.2 * draft_ms

    def _profile(self) -> CostProfile:
        if self.draft_ms is None:
            return self.profile
        return CostProfile(self.profile.key, self.profile.verify_ms, {**self.profile.draft_ms,
                                                                       self.drafter: self.draft_ms})
