"""Draft-tree ops: golden values for every pure function, DraftTree validation, hypothesis properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from drafters import tree_shape as S
from specdec.algorithms import tree as T
from specdec.errors import SpecdecError
from specdec.types import DEAD, DraftTree

NEG32 = torch.finfo(torch.float32).min


def P(*rows):
    return torch.tensor(rows, dtype=torch.long)


# ---------------------------------------------------------------- constructors: golden values


def test_chain_golden():
    t = T.chain(7, [3, 4, 5])
    assert t.tokens.tolist() == [[7, 3, 4, 5]]
    assert t.parents.tolist() == [[-1, 0, 1, 2]]
    assert t.draft_probs is None
    assert t.batch_size == 1 and t.num_nodes == 4
    assert t.num_draft_nodes.tolist() == [3]


def test_chain_root_only():
    t = T.chain(7, [])
    assert t.tokens.tolist() == [[7]] and t.parents.tolist() == [[-1]]
    assert t.num_draft_nodes.tolist() == [0]


def test_from_sequences_docstring_example():
    t = T.from_sequences(0, [[5, 6], [5, 7], [9]], max_nodes=4)
    assert t.tokens.tolist() == [[0, 5, 9, 6]]
    assert t.parents.tolist() == [[-1, 0, 0, 1]]


def test_from_sequences_merges_shared_prefixes():
    t = T.from_sequences(0, [[5, 6], [5, 7], [9]], max_nodes=10)
    # the shared prefix 5 appears once; the whole trie (4 draft nodes) fits the budget of 10
    assert t.tokens.tolist() == [[0, 5, 9, 6, 7]]
    assert t.parents.tolist() == [[-1, 0, 0, 1, 1]]


def test_from_sequences_weights_order_best_first():
    # scores: 9 -> 3, 9.1 -> 3, 5 -> 2, 5.6 -> 2, 5.6.7 -> 1, 5.6.8 -> 1
    t = T.from_sequences(0, [[5, 6, 7], [5, 6, 8], [9, 1]], max_nodes=10, weights=[1, 1, 3])
    assert t.tokens.tolist() == [[0, 9, 1, 5, 6, 7, 8]]
    assert t.parents.tolist() == [[-1, 0, 1, 0, 3, 4, 4]]


def test_from_sequences_budget_cuts_lowest_scores():
    t = T.from_sequences(0, [[5, 6, 7], [5, 6, 8], [9, 1]], max_nodes=4, weights=[1, 1, 3])
    assert t.tokens.tolist() == [[0, 9, 1, 5]]
    assert t.parents.tolist() == [[-1, 0, 1, 0]]


def test_from_sequences_duplicates_and_empty():
    t = T.from_sequences(4, [[1, 2], [1, 2], []], max_nodes=8)
    assert t.tokens.tolist() == [[4, 1, 2]] and t.parents.tolist() == [[-1, 0, 1]]
    assert T.from_sequences(4, [], max_nodes=8).tokens.tolist() == [[4]]
    assert T.from_sequences(4, [[1, 2]], max_nodes=1).tokens.tolist() == [[4]]


def test_from_sequences_rejects_zero_budget():
    with pytest.raises(SpecdecError, match="max_nodes must be >= 1"):
        T.from_sequences(0, [[1]], max_nodes=0)


def test_topology_from_choices_docstring():
    assert S.topology_from_choices([[0], [1], [0, 0]]) == ([-1, 0, 0, 1], [-1, 0, 1, 0])


def test_topology_from_choices_sorts_and_dedups():
    parents, ranks = S.topology_from_choices([[1], [0, 0, 0], [0], [1, 0], [0, 1], [0, 0], [0]])
    # order: [0] [1] [0,0] [0,1] [1,0] [0,0,0]
    assert parents == [-1, 0, 0, 1, 1, 2, 3]
    assert ranks == [-1, 0, 1, 0, 1, 0, 0]
    assert S.topology_from_choices([]) == ([-1], [-1])


def test_topology_from_choices_errors():
    with pytest.raises(SpecdecError, match="add it to the choices"):
        S.topology_from_choices([[0], [1, 0]])
    with pytest.raises(SpecdecError, match="ranks count from 0"):
        S.topology_from_choices([[-1]])


def test_choices_for_shape_golden():
    assert S.choices_for_shape(2, 2) == [[0], [1], [0, 0], [1, 0]]
    assert S.choices_for_shape(3, 1) == [[0], [0, 0], [0, 0, 0]]
    assert S.choices_for_shape(1, 3) == [[0], [1], [2]]
    assert S.choices_for_shape(0, 2) == []
    parents, ranks = S.topology_from_choices(S.choices_for_shape(3, 2))
    assert parents == [-1, 0, 0, 1, 2, 3, 4]
    assert ranks == [-1, 0, 1, 0, 0, 0, 0]


# ---------------------------------------------------------------- derived quantities: golden values


def test_depths_golden():
    assert T.depths(P([-1, 0, 0, 1])).tolist() == [[0, 1, 1, 2]]
    assert T.depths(P([-1, 0, 1, 2], [-1, 0, 0, -2])).tolist() == [[0, 1, 2, 3], [0, 1, 1, 0]]


def test_ancestor_mask_golden():
    m = T.ancestor_mask(P([-1, 0, 0, 1, -2]))
    assert m.dtype == torch.bool
    assert m.int().tolist() == [[
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [1, 1, 0, 1, 0],
        [0, 0, 0, 0, 1],  # a dead node sees only itself
    ]]


def test_ancestor_mask_batch_rows_independent():
    m = T.ancestor_mask(P([-1, 0, 1], [-1, 0, 0]))
    assert m[0].int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert m[1].int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 0, 1]]


def test_position_ids_golden():
    assert T.position_ids(P([-1, 0, 0, 1]), 5).tolist() == [[5, 6, 6, 7]]
    per_row = T.position_ids(P([-1, 0, 0, 1], [-1, 0, 1, -2]), torch.tensor([3, 10]))
    assert per_row.tolist() == [[3, 4, 4, 5], [10, 11, 12, 10]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_verify_mask_golden(dtype):
    m = T.verify_mask(P([-1, 0, 0, 1]), 2, dtype)
    assert m.shape == (1, 1, 4, 6) and m.dtype == dtype
    neg = torch.finfo(dtype).min
    expected = torch.tensor([
        [0, 0, 0, neg, neg, neg],
        [0, 0, 0, 0, neg, neg],
        [0, 0, 0, neg, 0, neg],
        [0, 0, 0, 0, neg, 0],
    ], dtype=dtype)
    assert torch.equal(m[0, 0], expected)


def test_verify_mask_no_prefix_and_batch():
    m = T.verify_mask(P([-1, 0, 1], [-1, 0, 0]), 0, torch.float32)
    assert m.shape == (2, 1, 3, 3)
    allowed = (m == 0)
    assert torch.equal(allowed[:, 0], T.ancestor_mask(P([-1, 0, 1], [-1, 0, 0])))
    assert bool(((m == 0) | (m == NEG32)).all())


def test_is_chain():
    assert T.is_chain(P([-1]))
    assert T.is_chain(P([-1, 0, 1, 2]))
    assert T.is_chain(P([-1, 0, 1], [-1, 0, 1]))
    assert not T.is_chain(P([-1, 0, 0]))
    assert not T.is_chain(P([-1, 0, 1, -2]))  # padding needs the explicit mask
    assert not T.is_chain(P([-1, 0, 1], [-1, 0, 0]))


def test_root_to_leaf_paths_golden():
    assert T.root_to_leaf_paths(P([-1, 0, 0, 1])) == [[[0, 2], [0, 1, 3]]]
    assert T.root_to_leaf_paths(P([-1])) == [[[0]]]
    assert T.root_to_leaf_paths(P([-1, 0, 1, -2, 0, 2], [-1, -2, -2, -2, -2, -2])) == [
        [[0, 4], [0, 1, 2, 5]],
        [[0]],
    ]


def test_path_to_golden():
    row = [-1, 0, 0, 1, 3, 2]
    assert T.path_to(row, 0) == [0]
    assert T.path_to(row, 4) == [0, 1, 3, 4]
    assert T.path_to(row, 5) == [0, 2, 5]


def test_limit_depth_single_tree_removes_deep_nodes():
    t = DraftTree(torch.tensor([[10, 11, 12, 13, 14, 15]]), P([-1, 0, 0, 1, 3, 2]))
    assert T.limit_depth(t, 3) is t
    cut = T.limit_depth(t, 1)
    assert cut.tokens.tolist() == [[10, 11, 12]] and cut.parents.tolist() == [[-1, 0, 0]]
    cut = T.limit_depth(t, 2)
    assert cut.tokens.tolist() == [[10, 11, 12, 13, 15]] and cut.parents.tolist() == [[-1, 0, 0, 1, 2]]
    root = T.limit_depth(t, 0)
    assert root.tokens.tolist() == [[10]] and root.parents.tolist() == [[-1]]


def test_limit_depth_keeps_probs_and_batches_mark_dead():
    probs = torch.arange(3 * 4, dtype=torch.float64).reshape(1, 3, 4)
    t = DraftTree(torch.tensor([[1, 2, 3]]), P([-1, 0, 1]), probs)
    cut = T.limit_depth(t, 1)
    assert torch.equal(cut.draft_probs, probs[:, :2])
    b = DraftTree(torch.tensor([[1, 2, 3], [4, 5, 6]]), P([-1, 0, 1], [-1, 0, 0]))
    cut = T.limit_depth(b, 1)
    assert cut.tokens.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert cut.parents.tolist() == [[-1, 0, DEAD], [-1, 0, 0]]


# ---------------------------------------------------------------- DraftTree validation


@pytest.mark.parametrize("tokens, parents, phrase", [
    (torch.tensor([1, 2]), torch.tensor([-1, 0]), "unsqueeze"),  # no batch dimension
    (torch.tensor([[1, 2]]), P([-1, 0, 1]), "one shape"),
    (torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, dtype=torch.long), "at least the root"),
    (torch.tensor([[1, 2]], dtype=torch.int32), P([-1, 0]), "int64"),
    (torch.tensor([[1, 2]]), P([0, 0]), "parents\\[:, 0\\] must be -1"),
    (torch.tensor([[1, 2]]), P([-2, 0]), "parents\\[:, 0\\] must be -1"),
    (torch.tensor([[1, 2, 3]]), P([-1, 2, 0]), "topologically ordered"),
    (torch.tensor([[1, 2, 3]]), P([-1, 0, 2]), "topologically ordered"),  # own index
    (torch.tensor([[1, 2, 3]]), P([-1, -1, 0]), "-2 for dead"),
    (torch.tensor([[1, 2, 3]]), P([-1, -3, 0]), "-2 for dead"),
    (torch.tensor([[1, 2, 3]]), P([-1, DEAD, 1]), "dead parent"),
    (torch.tensor([[1, 2, 3, 4]]), P([-1, 0, DEAD, 2]), "dead parent"),
])
def test_draft_tree_validation(tokens, parents, phrase):
    with pytest.raises(SpecdecError, match=phrase):
        DraftTree(tokens, parents)


def test_draft_tree_validation_probs_shape():
    with pytest.raises(SpecdecError, match=r"\[B, N, V\]"):
        DraftTree(torch.tensor([[1, 2]]), P([-1, 0]), torch.zeros(1, 3, 5))
    with pytest.raises(SpecdecError, match=r"\[B, N, V\]"):
        DraftTree(torch.tensor([[1, 2]]), P([-1, 0]), torch.zeros(2, 5))
    DraftTree(torch.tensor([[1, 2]]), P([-1, 0]), torch.zeros(1, 2, 5))  # fine


def test_draft_tree_valid_with_dead_padding():
    t = DraftTree(torch.tensor([[1, 2, 3, 0], [1, 0, 0, 0]]), P([-1, 0, 1, DEAD], [-1, DEAD, DEAD, DEAD]))
    assert t.num_draft_nodes.tolist() == [2, 0]


# ---------------------------------------------------------------- properties


@st.composite
def parent_arrays(draw, max_nodes: int = 12, max_batch: int = 3, dead: bool = True) -> torch.Tensor:
    """A ``[B, N]`` batch of valid parent arrays (topological, dead subtrees dead)."""
    n = draw(st.integers(1, max_nodes))
    b = draw(st.integers(1, max_batch))
    rows = []
    for _ in range(b):
        row = [-1]
        for i in range(1, n):
            p = draw(st.integers(-1 if dead else 0, i - 1))
            row.append(DEAD if p < 0 or row[p] == DEAD else p)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


@given(parent_arrays())
def test_prop_random_parents_make_valid_trees(parents):
    DraftTree(torch.zeros_like(parents), parents)


@given(parent_arrays())
def test_prop_ancestor_mask_rows_are_paths(parents):
    mask = T.ancestor_mask(parents)
    for b, row in enumerate(parents.tolist()):
        for i in range(len(row)):
            expected = {i} if (i > 0 and row[i] == DEAD) else set(T.path_to(row, i))
            assert set(mask[b, i].nonzero().flatten().tolist()) == expected


@given(parent_arrays(), st.integers(0, 20), st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_prop_verify_mask(parents, prefix, dtype):
    m = T.verify_mask(parents, prefix, dtype)
    b, n = parents.shape
    assert m.shape == (b, 1, n, prefix + n) and m.dtype == dtype
    assert bool((m[..., :prefix] == 0).all())
    assert torch.equal(m[:, 0, :, prefix:] == 0, T.ancestor_mask(parents))
    assert bool(((m == 0) | (m == torch.finfo(dtype).min)).all())


@given(parent_arrays(), st.integers(0, 50))
def test_prop_position_ids_are_prefix_plus_path_length(parents, prefix):
    pos = T.position_ids(parents, prefix)
    for b, row in enumerate(parents.tolist()):
        for i in range(len(row)):
            if i > 0 and row[i] == DEAD:
                continue
            assert int(pos[b, i]) == prefix + len(T.path_to(row, i)) - 1


@given(parent_arrays())
def test_prop_root_to_leaf_paths_cover_every_live_node(parents):
    for row, paths in zip(parents.tolist(), T.root_to_leaf_paths(parents)):
        live = {i for i, p in enumerate(row) if i == 0 or p >= 0}
        assert set().union(*map(set, paths)) == live
        for path in paths:
            assert path == T.path_to(row, path[-1])
            assert all(row[c] != path[-1] for c in live - {0})  # ends at a leaf


@given(parent_arrays(max_batch=1), st.integers(0, 6))
def test_prop_limit_depth(parents, max_depth):
    tokens = torch.arange(parents.shape[1])[None] + 100  # token = node id + 100, to track nodes
    cut = T.limit_depth(DraftTree(tokens, parents), max_depth)
    d = T.depths(cut.parents)
    assert int(d.max()) <= max_depth
    # the surviving token paths are exactly the original paths no deeper than max_depth
    def token_paths(t):
        row = t.parents[0].tolist()
        return {tuple(t.tokens[0, T.path_to(row, i)].tolist()) for i in range(len(row)) if i == 0 or row[i] >= 0}
    assert token_paths(cut) == {p for p in token_paths(DraftTree(tokens, parents)) if len(p) - 1 <= max_depth}


sequences_st = st.lists(st.lists(st.integers(0, 5), max_size=6), max_size=8)


@given(sequences_st, st.integers(1, 30), st.data())
def test_prop_from_sequences(seqs, max_nodes, data):
    weights = data.draw(st.lists(st.integers(1, 4), min_size=len(seqs), max_size=len(seqs)))
    t = T.from_sequences(99, seqs, max_nodes, [float(w) for w in weights])
    toks, row = t.tokens[0].tolist(), t.parents[0].tolist()
    assert toks[0] == 99 and row[0] == -1
    assert len(toks) <= max_nodes
    assert all(0 <= p < i for i, p in enumerate(row) if i > 0)  # parents precede children, no padding
    siblings = [(p, toks[i]) for i, p in enumerate(row) if i > 0]
    assert len(siblings) == len(set(siblings))  # no duplicate siblings
    paths = {tuple(toks[j] for j in T.path_to(row, i)[1:]): i for i in range(len(toks))}
    # reference trie scores of every distinct prefix
    score: dict[tuple, float] = {}
    for s, w in zip(seqs, weights):
        for k in range(1, len(s) + 1):
            score[tuple(s[:k])] = score.get(tuple(s[:k]), 0.0) + w
    assert set(paths) - {()} <= set(score)  # every tree path is a prefix of an input
    if len(score) + 1 <= max_nodes:
        assert set(paths) - {()} == set(score)  # the whole trie fits: every sequence is a path
    else:
        assert len(toks) == max_nodes  # the budget is used in full
        kept = [score[p] for p in paths if p]
        dropped = [score[p] for p in score if p not in paths]
        assert not kept or min(kept) >= max(dropped)  # best-first: no dropped prefix scores above a kept one
