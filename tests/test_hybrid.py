"""The hybrid drafter: budget split, matching the accepted path in each part's tree, shares following acceptance."""

from __future__ import annotations

import pytest
import torch

from drafters.hybrid import HybridDrafter, matched_path, split_budget
from specdec.algorithms import tree as tree_ops
from specdec.errors import ConfigError
from specdec.protocols import Feedback
from specdec.types import Acceptance, DraftContext, DraftTree
from tests.conftest import get_tiny
from tests.tiny import tiny_tokenizer


@pytest.mark.parametrize("nodes, rates, min_share, expected", [
    (10, [1.0, 1.0], 0.2, [5, 5]),
    (10, [9.0, 1.0], 0.2, [8, 2]),  # floor 0.2 keeps the weaker part at 2
    (10, [9.0, 1.0], 0.0, [9, 1]),
    (3, [1.0, 1.0, 1.0], 0.1, [1, 1, 1]),
    (0, [1.0, 2.0], 0.2, [0, 0]),
])
def test_split_budget_golden(nodes, rates, min_share, expected):
    assert split_budget(nodes, rates, min_share) == expected
    assert sum(split_budget(nodes, rates, min_share)) == nodes


def test_matched_path():
    tree = DraftTree(torch.tensor([[0, 5, 6, 7, 8]]), torch.tensor([[-1, 0, 0, 1, 3]]))  # 0->5->7->8, 0->6
    assert matched_path(tree, [5, 7, 9]) == [0, 1, 3]
    assert matched_path(tree, [6]) == [0, 2]
    assert matched_path(tree, [9, 5]) == [0]
    assert matched_path(tree, []) == [0]


class Fixed:
    """A part that always proposes one fixed continuation and records what it was told was accepted."""

    needs_hidden_states = False
    returns_probs = False
    vocab_size = None

    def __init__(self, cont):
        self.cont, self.seen = cont, []

    def reset(self):
        pass

    def propose(self, ctx):
        return tree_ops.chain(int(ctx.input_ids[0, -1]), self.cont[: ctx.max_nodes - 1])

    def observe(self, feedback):
        self.seen.append(feedback.acceptance.accepted_nodes(0))

    def modules(self):
        return []


def test_merge_and_feedback_and_shares():
    good, bad = Fixed([5, 6, 7]), Fixed([9, 9, 9])  # parts given as objects
    h = HybridDrafter(get_tiny(0), tiny_tokenizer(), drafters=[good, bad], min_share=0.1, decay=0.5)
    ctx = DraftContext(input_ids=torch.tensor([[3, 4]]), prompt_len=2, max_nodes=7, max_depth=8)
    for _ in range(4):
        tree = h.propose(ctx)
        assert tree.draft_probs is None and tree.num_nodes <= 7
        paths = {tuple(int(tree.tokens[0, j]) for j in p[1:]) for p in tree_ops.root_to_leaf_paths(tree.parents)[0]}
        assert paths <= {(5, 6, 7), (5, 6), (5,), (9, 9, 9), (9, 9), (9,)}
        # the target accepts 5, 6 then says 8
        acc = Acceptance.from_paths([tree_ops.path_to(tree.parents[0].tolist(),
                                                      next(i for i in range(tree.num_nodes)
                                                           if tree.tokens[0, i] == 6))], [8])
        h.observe(Feedback(tree=tree, acceptance=acc, new_tokens=torch.tensor([[5, 6, 8]])))
    assert good.seen[-1] == [0, 1, 2] and bad.seen[-1] == [0]  # each part hears its own tree's indices
    assert h.shares[0] > 0.9  # the budget moved to the part being accepted
    budgets = split_budget(6, h.rates, h.min_share)
    assert budgets[0] > budgets[1] >= 1


def test_bad_configs():
    t = get_tiny(0)
    with pytest.raises(ConfigError, match="at least two"):
        HybridDrafter(t, drafters=["ngram"])
    with pytest.raises(ConfigError, match="another drafter"):
        HybridDrafter(t, drafters=["ngram", {"name": "hybrid"}])
    with pytest.raises(ConfigError, match="min_share"):
        HybridDrafter(t, drafters=["ngram", "none"], min_share=0.9)
