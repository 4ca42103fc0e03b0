"""The greedy acceptance rule: golden values, and the rule table."""

from __future__ import annotations

import pytest
import torch

from specdec.algorithms import acceptance as A
from specdec.errors import ConfigError
from specdec.types import DEAD, DraftTree

V = 16


def logits_for(argmax_rows: list[list[int]], vocab: int = V) -> torch.Tensor:
    """``[B, N, V]`` logits whose argmax at node i of row b is ``argmax_rows[b][i]``."""
    g = torch.Generator().manual_seed(0)
    logits = torch.rand(len(argmax_rows), len(argmax_rows[0]), vocab, generator=g, dtype=torch.float64)
    for b, row in enumerate(argmax_rows):
        for i, t in enumerate(row):
            logits[b, i, t] = 5.0
    return logits


def tree(tokens, parents) -> DraftTree:
    return DraftTree(torch.tensor(tokens), torch.tensor(parents))


def run(t: DraftTree, argmax_rows):
    return A.greedy(t, logits_for(argmax_rows), A.SamplingParams(), None)


def test_chain_fully_accepted_gives_bonus():
    acc = run(tree([[9, 3, 4, 5]], [[-1, 0, 1, 2]]), [[3, 4, 5, 11]])
    assert acc.path.tolist() == [[0, 1, 2, 3]]
    assert acc.num_accepted.tolist() == [3]
    assert acc.next_token.tolist() == [11]
    assert acc.accepted_nodes(0) == [0, 1, 2, 3]


def test_rejection_at_depth_one_gives_recovered_token():
    acc = run(tree([[9, 3, 4, 5]], [[-1, 0, 1, 2]]), [[7, 4, 5, 11]])
    assert acc.path.tolist() == [[0]]
    assert acc.num_accepted.tolist() == [0]
    assert acc.next_token.tolist() == [7]


def test_rejection_mid_chain():
    acc = run(tree([[9, 3, 4, 5]], [[-1, 0, 1, 2]]), [[3, 8, 5, 11]])
    assert acc.accepted_nodes(0) == [0, 1]
    assert acc.next_token.tolist() == [8]


def test_root_only_tree_is_plain_decoding():
    acc = run(tree([[9]], [[-1]]), [[12]])
    assert acc.path.tolist() == [[0]] and acc.num_accepted.tolist() == [0] and acc.next_token.tolist() == [12]


def test_docstring_example():
    acc = run(tree([[1, 5, 9, 6]], [[-1, 0, 0, 1]]), [[5, 6, 2, 8]])
    assert acc.accepted_nodes(0) == [0, 1, 3]
    assert acc.next_token.tolist() == [8]


def test_second_branch_wins():
    # root children: 4 (node 1, rejected) and 5 (node 2, accepted); node 3 (child of 1) is never reachable
    acc = run(tree([[1, 4, 5, 6, 7]], [[-1, 0, 0, 1, 2]]), [[5, 6, 7, 0, 13]])
    assert acc.path.tolist() == [[0, 2, 4]]
    assert acc.num_accepted.tolist() == [2]
    assert acc.next_token.tolist() == [13]


def test_deeper_branch_preferred():
    # both depth-1 children match? impossible (one argmax); instead: branch A accepted to depth 1,
    # branch B (through the same first node) accepted to depth 2
    acc = run(tree([[1, 4, 8, 6, 7]], [[-1, 0, 1, 1, 3]]), [[4, 6, 0, 7, 12]])
    # node 1 (4) ok; children 2 (8) no, 3 (6) ok; node 4 (7) child of 3 ok
    assert acc.path.tolist() == [[0, 1, 3, 4]]
    assert acc.num_accepted.tolist() == [3]
    assert acc.next_token.tolist() == [12]
    # duplicate siblings: the lower-index one is a dead end, the higher-index one continues deeper and wins
    acc = run(tree([[1, 4, 4, 6]], [[-1, 0, 0, 2]]), [[4, 9, 6, 10]])
    assert acc.path.tolist() == [[0, 2, 3]]
    assert acc.next_token.tolist() == [10]


def test_ties_go_to_lowest_index():
    # duplicate siblings carrying the same token: both accepted at depth 1; the lower index ends the path
    acc = run(tree([[1, 4, 4]], [[-1, 0, 0]]), [[4, 10, 11]])
    assert acc.path.tolist() == [[0, 1]]
    assert acc.next_token.tolist() == [10]
    # two accepted depth-2 nodes under different parents: the lower index wins
    acc = run(tree([[1, 4, 4, 6, 6]], [[-1, 0, 0, 2, 1]]), [[4, 6, 6, 10, 11]])
    assert acc.path.tolist() == [[0, 2, 3]]
    assert acc.next_token.tolist() == [10]


def test_dead_nodes_never_accepted():
    acc = run(tree([[1, 4, 5]], [[-1, 0, DEAD]]), [[5, 9, 9]])
    assert acc.path.tolist() == [[0]]
    assert acc.next_token.tolist() == [5]
    # a dead node carrying the target's token, before a live one carrying the same token
    acc = run(tree([[1, 5, 5, 7]], [[-1, DEAD, 0, 2]]), [[5, 7, 7, 3]])
    assert acc.path.tolist() == [[0, 2, 3]]
    assert acc.next_token.tolist() == [3]
    # the last node is dead and carries the token the target wants after node 2: still never accepted
    # (a dead parent index -2 must not be read as "the node before last")
    acc = run(tree([[1, 4, 6, 10]], [[-1, 0, 1, DEAD]]), [[4, 6, 10, 3]])
    assert acc.path.tolist() == [[0, 1, 2]]
    assert acc.next_token.tolist() == [10]


def test_batch_of_two_pads_paths():
    t = tree([[1, 4, 5, 6], [2, 7, 8, 9]], [[-1, 0, 1, 2], [-1, 0, 0, DEAD]])
    acc = run(t, [[4, 5, 6, 14], [8, 0, 15, 9]])
    assert acc.path.tolist() == [[0, 1, 2, 3], [0, 2, -1, -1]]
    assert acc.num_accepted.tolist() == [3, 1]
    assert acc.next_token.tolist() == [14, 15]
    assert acc.accepted_nodes(0) == [0, 1, 2, 3] and acc.accepted_nodes(1) == [0, 2]


def test_accept_matching_equals_greedy():
    t = tree([[1, 4, 5, 6, 7]], [[-1, 0, 0, 1, 2]])
    logits = logits_for([[5, 6, 7, 0, 13]])
    a, b = A.greedy(t, logits), A.accept_matching(t, logits.argmax(-1))
    assert a.path.tolist() == b.path.tolist() and a.next_token.tolist() == b.next_token.tolist()


def test_rule_table():
    assert A.get_rule("greedy") is A.greedy
    assert "greedy" in A.RULES and "greedy" not in A.LOSSY
    with pytest.raises(ConfigError, match="choose one of"):
        A.get_rule("nope")
