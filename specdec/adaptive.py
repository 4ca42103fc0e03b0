"""Per-request adaptive draft budgets: running acceptance statistics + the cost model -> next step's node budget.

Each request owns an :class:`AdaptiveBudget`. After every verify step it records, by depth, whether the accepted
path went deeper when a draft node was there to take (``AcceptanceStats``: an exponential moving average of the
conditional acceptance rate at each depth), and how long the drafter's ``propose`` took. Before the next step it
asks :func:`specdec.cost.choose_budget` for the node budget that maximises expected tokens per second on this
machine, treating the drafter's best nodes as a chain (node k accepted with the product of the first k depth
rates). A drafter that is not being accepted is thus switched off (budget 1: plain decoding) and re-tried now and
then (every ``probe_every`` steps it gets a small tree again, so its statistics can recover).

The output never depends on the budget (every budget is lossless); only the speed does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from specdec import tree as tree_ops
from specdec.cost import CostProfile, chain_node_values, choose_budget
from specdec.types import Acceptance, DraftTree


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
    give the drafter a ``probe_nodes`` tree to see whether it is being accepted again.
    """

    def __init__(self, profile: CostProfile, drafter: str, max_nodes: int = 32, decay: float = 0.9,
                 prior: float = 0.5, probe_every: int = 8, probe_nodes: int = 2) -> None:
        self.profile = profile
        self.drafter = drafter
        self.max_nodes = max_nodes
        self.stats = AcceptanceStats(decay=decay, prior=prior)
        self.draft_ms: float | None = profile.draft_ms.get(drafter)
        self.probe_every = probe_every
        self.probe_nodes = probe_nodes
        self._idle = 0
        self.history: list[int] = []  # budgets used, one per step

    def nodes(self, batch_rows: int = 0) -> int:
        """The budget for the next step; ``batch_rows``: rows the other requests of the batch put in the same step."""
        values = chain_node_values([self.stats.rate(d) for d in range(self.max_nodes - 1)])
        profile = self._profile()
        n = choose_budget(profile, values, self.drafter, self.max_nodes, base_rows=batch_rows).nodes
        if n == 1:
            self._idle += 1
            if self._idle >= self.probe_every:
                self._idle = 0
                n = min(self.probe_nodes, self.max_nodes)
        else:
            self._idle = 0
        self.history.append(n)
        return n

    def observe(self, tree: DraftTree, acceptance: Acceptance, draft_ms: float | None = None) -> None:
        """Record one verify step of this request (``tree`` and ``acceptance`` for batch row 0)."""
        depth = int(tree_ops.depths(tree.parents)[0].max()) if tree.num_nodes > 1 else 0
        self.stats.update(depth, int(acceptance.num_accepted[0]))
        if draft_ms is not None:
            self.draft_ms = draft_ms if self.draft_ms is None else 0.8 * self.draft_ms + 0.2 * draft_ms

    def _profile(self) -> CostProfile:
        if self.draft_ms is None:
            return self.profile
        return CostProfile(self.profile.key, self.profile.verify_ms, {**self.profile.draft_ms,
                                                                       self.drafter: self.draft_ms})
