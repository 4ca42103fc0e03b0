"""EAGLE-2-style dynamic tree growth: golden cases with fixed draft probabilities (which nodes are kept at budget N)."""

from __future__ import annotations

import pytest
import torch

from drafters.growing import DraftVocab, DynamicGrowth, TreeGrower
from drafters.tree_shape import TreeShape
from specdec.algorithms import tree as tree_ops
from specdec.types import DraftContext

V = 8
# next-token probabilities of the draft after each path (root token 0)
TABLE = {
    (): {1: 0.6, 2: 0.3, 3: 0.1},
    (1,): {4: 0.9, 5: 0.1},
    (2,): {1: 0.5, 4: 0.5},
    (1, 4): {6: 1.0},
    (2, 1): {7: 0.8, 6: 0.2},
    (2, 4): {7: 0.6, 5: 0.4},
}


def logits(path: tuple[int, ...]) -> torch.Tensor:
    probs = torch.full((V,), 1e-9)
    for t, p in TABLE.get(path, {7: 1.0}).items():
        probs[t] = p
    return probs.log()


class FixedForward:
    """A drafter's level forward whose distributions come from TABLE; records the levels it was asked to run."""

    def __init__(self) -> None:
        self.levels: list[list[tuple[int, ...]]] = []

    def __call__(self, tokens, parents_t, lo, hi):
        parents = parents_t[0].tolist()
        paths = [tuple(tokens[j] for j in tree_ops.path_to(parents, i)[1:]) for i in range(lo, hi)]
        self.levels.append(paths)
        return torch.stack([logits(p) for p in paths])[None]


def grow(max_nodes: int, top_k: int = 2, depth: int = 3, min_value: float = 0.0):
    """The shared grower (what every tree-growing drafter uses) with a fixed draft distribution."""
    forward = FixedForward()
    grower = TreeGrower(TreeShape.build(depth=depth), DynamicGrowth(True, top_k, depth, min_value))
    grown = grower.grow(DraftContext(input_ids=torch.tensor([[5, 0]]), prompt_len=2, max_nodes=max_nodes,
                                     max_depth=depth), logits(()), forward, DraftVocab(V))
    tree = grown.tree
    paths = sorted(tuple(int(tree.tokens[0, j]) for j in tree_ops.path_to(tree.parents[0].tolist(), i)[1:])
                   for i in range(1, tree.num_nodes))
    return forward, tree, paths


def test_run_order_maps_kept_nodes_to_the_draft_cache():
    forward = FixedForward()
    grower = TreeGrower(TreeShape.build(depth=3), DynamicGrowth(True, 2, 3))
    grown = grower.grow(DraftContext(input_ids=torch.tensor([[5, 0]]), prompt_len=2, max_nodes=16, max_depth=3),
                        logits(()), forward, DraftVocab(V))
    ran = [p for level in forward.levels for p in level]  # run order: (1,), (2,), (1, 4), (2, 1)
    tokens, parents = grown.tree.tokens[0].tolist(), grown.tree.parents[0].tolist()
    node_of = {tuple(tokens[j] for j in tree_ops.path_to(parents, i)[1:]): i for i in range(len(tokens))}
    for path, node in node_of.items():
        r = grown.run_of[node]
        assert (r is None) == (path not in ran and node != 0)
        if r:
            assert ran[r - 1] == path
    # of an accepted path 1 -> 4 -> 6, the cache keeps the two nodes that ran (6 is a leaf), at their run offsets
    accepted = [0, node_of[(1,)], node_of[(1, 4)], node_of[(1, 4, 6)]]
    assert grown.cached(accepted) == [ran.index((1,)), ran.index((1, 4))]


def test_expands_the_most_probable_frontier_nodes():
    d, _, _ = grow(max_nodes=16, top_k=2, depth=3)
    # level 1 creates 1 (.6) and 2 (.3): both expanded; level 2 creates (1,4) .54, (1,5) .06, (2,1) .15, (2,4) .15:
    # the best two by cumulative probability are expanded: (1,4) and (2,1) (tie with (2,4) goes to the earlier)
    assert d.levels == [[(1,), (2,)], [(1, 4), (2, 1)]]


@pytest.mark.parametrize("budget, kept", [
    (1, []),
    (2, [(1,)]),
    (4, [(1,), (1, 4), (1, 4, 6)]),  # .6, .54, .54 (the path through 1 -> 4 -> 6 keeps its full value)
    (6, [(1,), (1, 4), (1, 4, 6), (2,), (2, 1)]),  # then .3 and .15
])
def test_keeps_the_best_nodes_by_cumulative_probability(budget, kept):
    _, tree, paths = grow(max_nodes=budget)
    assert tree.num_nodes == budget and paths == sorted(kept) and tree.draft_probs is None


def test_values_are_path_products_and_become_the_scores():
    _, tree, paths = grow(max_nodes=16)
    assert tree.num_nodes == 1 + 2 + 4 + 4  # 2 at depth 1, 2x2 at depth 2, 2 expanded x2 at depth 3
    by_path = {p: float(s) for p, s in zip(
        [tuple(int(tree.tokens[0, j]) for j in tree_ops.path_to(tree.parents[0].tolist(), i)[1:])
         for i in range(tree.num_nodes)], tree.scores[0])}
    assert by_path[()] == 1.0
    assert by_path[(1, 4, 6)] == pytest.approx(0.6 * 0.9 * 1.0) and by_path[(2, 1, 7)] == pytest.approx(0.3 * 0.5 * 0.8)


@pytest.mark.parametrize("min_value, levels, depth", [
    (0.0, 2, 3),
    (0.55, 1, 2),  # level 2's best path is worth .54: it is not expanded (one draft forward saved)
    (0.61, 0, 1),  # level 1's best is .6: no draft forward at all
])
def test_min_value_stops_growth_on_unsure_levels(min_value, levels, depth):
    d, tree, _ = grow(max_nodes=16, min_value=min_value)
    assert len(d.levels) == levels and int(tree_ops.depths(tree.parents).max()) == depth


class FixedHeads(torch.nn.Module):
    """Two Medusa heads with fixed distributions (they do not see the parent token)."""

    num_heads = 2

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("d2t", torch.arange(V))

    def logits(self, hidden):
        head1 = torch.full((V,), 1e-9)
        head1[1], head1[2], head1[3] = 0.5, 0.4, 0.1
        head2 = torch.full((V,), 1e-9)
        head2[4], head2[5] = 0.7, 0.3
        return torch.stack([head1, head2]).log()


def test_medusa_dynamic_tree_golden(target):
    from drafters.medusa import MedusaDrafter

    d = MedusaDrafter(target, heads=FixedHeads(), dynamic=True, top_k=2)
    ctx = DraftContext(input_ids=torch.tensor([[5, 0]]), prompt_len=2, max_nodes=5, max_depth=4,
                       hidden=torch.zeros(1, 1, 4))
    tree = d.propose(ctx)
    paths = sorted(tuple(int(tree.tokens[0, j]) for j in tree_ops.path_to(tree.parents[0].tolist(), i)[1:])
                   for i in range(1, tree.num_nodes))
    # values: 1 .5, 2 .4, (1,4) .35, (2,4) .28, (1,5) .15, (2,5) .12 -> the best four
    assert paths == [(1,), (1, 4), (2,), (2, 4)] and tree.draft_probs is None
