"""The n-gram (prompt lookup) drafter: index and candidates golden values, tree limits, reset."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from drafters.ngram import NGramDrafter
from specdec.algorithms import tree as T
from specdec.errors import ConfigError
from specdec.types import DraftContext


def ctx(tokens, max_nodes: int = 16, max_depth: int = 8) -> DraftContext:
    return DraftContext(input_ids=torch.tensor([tokens]), prompt_len=len(tokens), max_nodes=max_nodes,
                        max_depth=max_depth)


def propose(drafter: NGramDrafter, tokens, **kw):
    t = drafter.propose(ctx(tokens, **kw))
    return t.tokens[0].tolist(), t.parents[0].tolist()


# index positions:     0  1  2  3  4  5  6  7   8  9  10
THREE_GRAM_TEXT = [5, 6, 7, 8, 9, 6, 7, 10, 5, 6, 7]


def test_candidates_longest_match_first():
    d = NGramDrafter(max_ngram=3, min_ngram=1)
    d.propose(ctx(THREE_GRAM_TEXT))
    conts, weights = d.candidates(3)
    # (5, 6, 7) also ends at 2 -> [8, 9, 6] (weight 3); (6, 7) also ends at 6 -> [10, 5, 6] (weight 2);
    # (7,) ends nowhere new
    assert conts == [[8, 9, 6], [10, 5, 6]]
    assert weights == [3.0, 2.0]
    assert d.candidates(1) == ([[8], [10]], [3.0, 2.0])


def test_candidates_most_recent_first():
    d = NGramDrafter(max_ngram=3, min_ngram=2)
    #         0  1  2  3  4  5  6  7
    d.propose(ctx([1, 2, 3, 1, 2, 4, 1, 2]))
    # (4, 1, 2) occurs only at the end; (1, 2) ends at 4 then 1 (most recent first)
    assert d.candidates(3) == ([[4, 1, 2], [3, 1, 2]], [2.0, 2.0])
    assert d.candidates(10) == ([[4, 1, 2], [3, 1, 2, 4, 1, 2]], [2.0, 2.0])  # cut at the end of the text


def test_candidates_min_ngram_one():
    d2, d1 = NGramDrafter(min_ngram=2), NGramDrafter(min_ngram=1)
    text = [9, 4, 9, 5, 4]  # the 2-gram (5, 4) never occurred before; the 1-gram (4,) ends at 1
    d2.propose(ctx(text))
    d1.propose(ctx(text))
    assert d2.candidates(3) == ([], [])
    assert d1.candidates(3) == ([[9, 5, 4]], [1.0])


def test_candidates_max_candidates():
    d = NGramDrafter(max_ngram=2, min_ngram=1, max_candidates=2)
    d.propose(ctx([3, 1, 3, 2, 3, 4, 3]))
    assert d.candidates(2) == ([[4, 3], [2, 3]], [1.0, 1.0])


def test_index_golden():
    d = NGramDrafter(max_ngram=2, min_ngram=1)
    d.propose(ctx([4, 5, 4, 5]))
    assert dict(d._index[1]) == {(4,): [0, 2], (5,): [1, 3]}
    assert dict(d._index[2]) == {(4, 5): [1, 3], (5, 4): [2]}


def test_tree_golden():
    d = NGramDrafter(max_ngram=3, min_ngram=2, max_depth=3)
    toks, parents = propose(d, THREE_GRAM_TEXT)
    assert toks == [7, 8, 9, 6, 10, 5, 6]  # root = last token; the weight-3 branch first
    assert parents == [-1, 0, 1, 2, 0, 4, 5]
    d.reset()
    assert propose(d, THREE_GRAM_TEXT, max_nodes=4) == ([7, 8, 9, 6], [-1, 0, 1, 2])
    d.reset()
    assert propose(d, THREE_GRAM_TEXT, max_depth=1) == ([7, 8, 10], [-1, 0, 0])


def test_no_match_is_root_only():
    d = NGramDrafter()
    assert propose(d, [3, 4, 5, 6, 7]) == ([7], [-1])
    d.reset()
    assert propose(d, [9]) == ([9], [-1])  # a one-token context
    d.reset()
    assert propose(d, THREE_GRAM_TEXT, max_nodes=1) == ([7], [-1])
    d.reset()
    assert propose(d, THREE_GRAM_TEXT, max_depth=0) == ([7], [-1])


def test_reset_forgets():
    d = NGramDrafter(max_ngram=3, min_ngram=2)
    propose(d, THREE_GRAM_TEXT)
    d.reset()
    assert d._tokens == [] and all(not index for index in d._index.values())
    # a new request whose text matches nothing: nothing from the previous one leaks into the tree
    assert propose(d, [40, 41, 6, 7]) == ([7], [-1])
    d.reset()
    assert propose(d, THREE_GRAM_TEXT) == propose(NGramDrafter(max_ngram=3, min_ngram=2), THREE_GRAM_TEXT)


def test_incremental_index_equals_fresh():
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, 9, (60,), generator=g).tolist()
    grown = NGramDrafter(min_ngram=1)
    for end in (5, 6, 9, 20, 21, 40, 60):
        got = propose(grown, text[:end])
        assert got == propose(NGramDrafter(min_ngram=1), text[:end])


def test_options_validated():
    with pytest.raises(ConfigError, match="min_ngram <= max_ngram"):
        NGramDrafter(min_ngram=0)
    with pytest.raises(ConfigError, match="min_ngram <= max_ngram"):
        NGramDrafter(max_ngram=2, min_ngram=3)
    with pytest.raises(ConfigError, match="max_depth >= 1"):
        NGramDrafter(max_depth=0)
    with pytest.raises(ConfigError, match="max_candidates >= 1"):
        NGramDrafter(max_candidates=0)
    with pytest.raises(ConfigError, match="one request at a time"):
        NGramDrafter().propose(DraftContext(torch.tensor([[1, 2], [3, 4]]), 2, 8, 4))


@given(
    text=st.lists(st.integers(3, 7), min_size=1, max_size=60),
    max_nodes=st.integers(1, 20),
    max_depth=st.integers(0, 10),
    own_depth=st.integers(1, 6),
    min_ngram=st.integers(1, 3),
)
def test_prop_tree_limits_and_paths_come_from_text(text, max_nodes, max_depth, own_depth, min_ngram):
    d = NGramDrafter(max_ngram=3, min_ngram=min_ngram, max_depth=own_depth)
    t = d.propose(ctx(text, max_nodes=max_nodes, max_depth=max_depth))
    toks, parents = t.tokens[0].tolist(), t.parents[0].tolist()
    assert toks[0] == text[-1]
    assert len(toks) <= max(max_nodes, 1)
    assert int(T.depths(t.parents).max()) <= min(max_depth, own_depth) or len(toks) == 1
    assert d.returns_probs is False and t.draft_probs is None
    # every drafted path continues an earlier occurrence of a suffix of at least min_ngram tokens
    last = len(text) - 1
    for i in range(1, len(toks)):
        path = [toks[j] for j in T.path_to(parents, i)[1:]]
        assert any(
            text[p - min_ngram + 1:p + 1] == text[last - min_ngram + 1:] and text[p + 1:p + 1 + len(path)] == path
            for p in range(min_ngram - 1, last)
        )
