"""The cost model: what a verify step and a drafter call cost on this machine, and the tree budget that pays.

A :class:`CostProfile` holds measured milliseconds: a verify step over ``n`` tree nodes (``verify_ms``, measured at
a few sizes and interpolated between them) and one drafter call (``draft_ms``, per drafter kind). It is measured
once per (model, dtype, threads, device, torch version) and cached as a small JSON file (``specdec profile`` prints
it); a profile whose key differs from the current setting is not used.

:func:`choose_budget` picks the node budget that maximises expected tokens per second::

    E[tokens | n nodes] / (verify_ms(n) + draft_ms)     with   E[tokens | n] = 1 + v_1 + ... + v_{n-1}

where ``v_i`` are the drafted nodes' acceptance probabilities, best first (each node counts the probability that it
is accepted, i.e. its whole path is; the bonus token is the 1). Plain decoding (``n = 1``) is always a candidate, so a
drafter that does not pay is switched off.

>>> p = CostProfile(key={}, verify_ms={1: 50.0, 4: 55.0, 16: 80.0}, draft_ms={"ngram": 1.0})
>>> round(p.verify(10), 2)
67.5
>>> choose_budget(p, [0.9, 0.8, 0.05, 0.02], drafter="ngram").nodes   # the two likely nodes pay, the rest do not
3
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class CostProfile:
    """Measured costs on one setting.

    key: what was measured (model fingerprint, dtype, threads, device, torch version) — a profile is only valid for
    the same key; verify_ms: node count -> milliseconds of one verify step (root included); draft_ms: drafter kind ->
    milliseconds of one ``propose`` call.
    """

    key: Mapping[str, object]
    verify_ms: Mapping[int, float]
    draft_ms: Mapping[str, float] = field(default_factory=dict)

    def verify(self, nodes: int) -> float:
        """Milliseconds of a verify step over ``nodes`` nodes: linear between measured sizes, past the largest in
        proportion. Made non-decreasing first (a smaller tree can always run padded to a larger measured size, so
        it never costs more; this also irons out timing noise)."""
        sizes = sorted(int(n) for n in self.verify_ms)
        ms = [float(self.verify_ms[n]) for n in sizes]
        for i in range(len(ms) - 2, -1, -1):
            ms[i] = min(ms[i], ms[i + 1])
        if nodes <= sizes[0]:
            return ms[0]
        if nodes >= sizes[-1]:
            return ms[-1] * nodes / sizes[-1]
        i = bisect.bisect_left(sizes, nodes)
        lo, hi = sizes[i - 1], sizes[i]
        return ms[i - 1] + (ms[i] - ms[i - 1]) * (nodes - lo) / (hi - lo)

    def draft(self, drafter: str | None) -> float:
        return float(self.draft_ms.get(drafter, 0.0)) if drafter else 0.0


@dataclass(frozen=True)
class Budget:
    """The chosen node budget (root included) and its expected tokens per step and milliseconds per step."""

    nodes: int
    expected_tokens: float
    step_ms: float

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 * self.expected_tokens / self.step_ms


def choose_budget(profile: CostProfile, node_values: Sequence[float], drafter: str | None = None,
                  max_nodes: int | None = None, base_rows: int = 0) -> Budget:
    """The budget ``n`` (1 .. 1 + len(node_values), capped by ``max_nodes``) maximising expected tokens per second.

    node_values: acceptance probability of each candidate draft node (any order; the best are kept first). The
    drafter's call cost is paid only when at least one node is drafted. Ties go to the smaller tree.
    base_rows: rows the same verify step carries anyway (the other requests of a batch, one token each): the step
    then costs ``verify(base_rows + n)`` and yields ``base_rows`` more tokens, so drafting pays only if its extra
    rows are worth it at the batch's own rate — on a compute-bound machine a large batch turns drafting off.

    >>> p = CostProfile(key={}, verify_ms={1: 50.0, 8: 80.0, 16: 130.0})
    >>> choose_budget(p, [0.5, 0.3]).nodes, choose_budget(p, [0.5, 0.3], base_rows=7).nodes
    (3, 1)
    """
    values = sorted((float(v) for v in node_values), reverse=True)
    cap = len(values) + 1 if max_nodes is None else min(max_nodes, len(values) + 1)
    best = Budget(1, 1.0 + base_rows, profile.verify(1 + base_rows))
    expected = 1.0 + base_rows
    for n in range(2, cap + 1):
        expected += values[n - 2]
        cand = Budget(n, expected, profile.verify(n + base_rows) + profile.draft(drafter))
        if cand.tokens_per_s > best.tokens_per_s * (1 + 1e-9):
            best = cand
    return best


def chain_node_values(accept_by_depth: Sequence[float]) -> list[float]:
    """Acceptance probability of the node at each depth of a chain, from conditional per-depth acceptance rates.

    ``accept_by_depth[d]``: P(depth d+1 accepted | depth d accepted). A chain node is accepted when every node above
    it is: the running product.

    >>> chain_node_values([0.5, 0.5, 1.0])
    [0.5, 0.25, 0.25]
    """
    out, p = [], 1.0
    for a in accept_by_depth:
        p *= float(a)
        out.append(p)
    return out
