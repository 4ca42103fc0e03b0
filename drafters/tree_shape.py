"""A drafter's configured tree shape: Medusa-style "choices" -> parents, ranks, depths, priority; cut per step.

The common published format for a static draft tree is a list of "choices", each a path of child ranks from the
root (``[[0], [1], [0, 0]]``: the root's best and second-best candidates, and the best continuation of the first).
:class:`TreeShape` turns one into the topology the level grower fills (:mod:`drafters.growing`) and cuts it to each
step's node budget and depth limit, best paths first when the shape was chosen from validation accuracy.

>>> shape = TreeShape.build([[0], [1], [0, 0]])
>>> shape.parents, shape.ranks, shape.depths
([-1, 0, 0, 1], [-1, 0, 1, 0], [0, 1, 1, 2])
>>> shape.cut(max_nodes=3, max_depth=8)
([-1, 0, 0], [-1, 0, 1])
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from specdec.algorithms.tree import depth_list
from specdec.errors import ConfigError, SpecdecError


def topology_from_choices(choices: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """Tree shape from Medusa-style "choices" (each a path of child ranks from the root).

    Returns ``(parents, ranks)`` for the nodes root first, sorted by depth then lexicographically, where
    ``ranks[i]`` is node i's rank among its parent's candidates (the k in "the k-th most likely token").
    Every prefix of a choice must itself be a choice.

    >>> topology_from_choices([[0], [1], [0, 0]])
    ([-1, 0, 0, 1], [-1, 0, 1, 0])
    """
    paths = sorted({tuple(int(r) for r in c) for c in choices}, key=lambda p: (len(p), p))
    index = {(): 0}
    parents, ranks = [-1], [-1]
    for p in paths:
        if len(p) == 0:
            continue
        if any(r < 0 for r in p):
            raise SpecdecError(f"tree choice {list(p)} has a negative rank; ranks count from 0.")
        if p[:-1] not in index:
            raise SpecdecError(f"tree choice {list(p)} has no parent choice {list(p[:-1])}; add it to the choices.")
        index[p] = len(parents)
        parents.append(index[p[:-1]])
        ranks.append(p[-1])
    return parents, ranks


def choices_for_shape(depth: int, width: int) -> list[list[int]]:
    """Choices for a simple shape: ``width`` candidates at depth 1, each followed by a greedy chain.

    >>> choices_for_shape(2, 2)
    [[0], [1], [0, 0], [1, 0]]
    """
    out = []
    for d in range(1, depth + 1):
        for w in range(width):
            out.append([w] + [0] * (d - 1))
    return out


def choices_from_accuracy(accuracy: Sequence[Sequence[float]], max_nodes: int) -> list[list[int]]:
    """The draft tree ("choices") with the most expected accepted tokens within ``max_nodes`` (root included).

    accuracy[d][r]: measured probability that the drafter's rank-``r`` candidate at depth ``d + 1`` is the target's
    token (per-head top-k accuracy for Medusa, per-depth for an autoregressive head). A path's value is the product
    of its ranks' accuracies (Medusa's independence estimate); the best paths are taken greedily, best first, which
    keeps every chosen path's prefix chosen and, when accuracies fall with rank, its sibling ranks contiguous.

    >>> choices_from_accuracy([[0.6, 0.2], [0.5, 0.1]], 4)
    [[0], [0, 0], [1]]
    """
    accuracy = [[min(row[: r + 1]) for r in range(len(row))] for row in accuracy]  # noise: keep ranks ordered
    chosen: list[list[int]] = []
    heap = [(-float(accuracy[0][r]), [r]) for r in range(len(accuracy[0])) if accuracy[0][r] > 0] if accuracy else []
    heapq.heapify(heap)
    while heap and len(chosen) < max_nodes - 1:
        neg, path = heapq.heappop(heap)
        chosen.append(path)
        d = len(path)
        if d < len(accuracy):
            for r, a in enumerate(accuracy[d]):
                if a > 0:
                    heapq.heappush(heap, (neg * float(a), path + [r]))
    return chosen


def choice_priority(choices: Sequence[Sequence[int]]) -> list[int]:
    """Node indices (in :func:`topology_from_choices` order) of ``choices`` in the order given, duplicates dropped.

    Trees built by :func:`choices_from_accuracy` list their best paths first; :func:`cut_tree` keeps that order.

    >>> choice_priority([[0], [0, 0], [1]])
    [1, 3, 2]
    """
    paths = sorted({tuple(int(r) for r in c) for c in choices if len(c)}, key=lambda p: (len(p), p))
    index = {p: i + 1 for i, p in enumerate(paths)}
    out: list[int] = []
    for c in choices:
        i = index.get(tuple(int(r) for r in c))
        if i is not None and i not in out:
            out.append(i)
    return out


def cut_tree(parents: Sequence[int], ranks: Sequence[int], priority: Sequence[int], max_nodes: int,
             max_depth: int) -> tuple[list[int], list[int]]:
    """A configured tree cut to ``max_nodes`` (root included) and ``max_depth``: ``(parents, ranks)``.

    Nodes are taken in ``priority`` order (best first) as long as their parent was taken, then renumbered in
    node order, so a small budget keeps the most valuable paths rather than the shallowest nodes.

    >>> cut_tree([-1, 0, 0, 1], [-1, 0, 1, 0], [1, 3, 2], 3, 8)
    ([-1, 0, 1], [-1, 0, 0])
    """
    d = depth_list(parents)
    kept = {0}
    for i in priority:
        if len(kept) >= max(1, max_nodes):
            break
        if d[i] <= max_depth and parents[i] in kept:
            kept.add(i)
    order = sorted(kept)
    new = {old: j for j, old in enumerate(order)}
    return [-1] + [new[parents[i]] for i in order[1:]], [-1] + [ranks[i] for i in order[1:]]


def check_contiguous_ranks(parents: Sequence[int], ranks: Sequence[int]) -> None:
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


@dataclass(frozen=True)
class TreeShape:
    """A static draft tree: topology, candidate ranks, depths, the order in which a small budget keeps nodes, and
    the drafter's own node cap.

    parents / ranks / depths: per node, root first (:func:`topology_from_choices`). priority: non-root nodes best
    first (trained trees: the order their choices were listed in; otherwise node order). max_nodes: the drafter's
    own budget (root included) when smaller than the step's; None: the step decides.
    """

    parents: list[int]
    ranks: list[int]
    depths: list[int]
    priority: list[int]
    max_nodes: int | None = None

    @classmethod
    def build(cls, choices: Sequence[Sequence[int]] | None = None, *, depth: int | None = None, width: int = 1,
              trained: Sequence[Sequence[int]] | None = None, default: tuple[int, int] = (4, 1),
              max_nodes: int | None = None) -> TreeShape:
        """The shape a drafter's options describe, first match wins: explicit ``choices``; ``depth`` (and
        ``width``) for :func:`choices_for_shape`; the ``trained`` choices a checkpoint ships (kept best first under
        a small budget); else the ``default`` (depth, width)."""
        is_trained = False
        if choices is None:
            if depth:
                choices = choices_for_shape(int(depth), int(width))
            elif trained:
                choices, is_trained = trained, True
            else:
                choices = choices_for_shape(*default)
        parents, ranks = topology_from_choices(choices)
        check_contiguous_ranks(parents, ranks)
        priority = choice_priority(choices) if is_trained else list(range(1, len(parents)))
        return cls(parents, ranks, depth_list(parents), priority, max_nodes)

    @property
    def max_depth(self) -> int:
        return max(self.depths)

    def budget(self, max_nodes: int) -> int:
        """The step's node budget capped by the drafter's own (root included)."""
        return min(max_nodes, self.max_nodes or max_nodes)

    def cut(self, max_nodes: int, max_depth: int) -> tuple[list[int], list[int]]:
        """``(parents, ranks)`` of the shape cut to the step's budget (and the drafter's cap) and depth limit."""
        return cut_tree(self.parents, self.ranks, self.priority, self.budget(max_nodes), max_depth)
