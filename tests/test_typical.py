"""Typical acceptance (Medusa's posterior threshold): LOSSY, labelled so, and golden values.

Rule under test (:mod:`specdec.algorithms.typical`): with p the target's distribution at a node (temperature applied), a
child with token x is accepted when its parent is accepted and ``p(x) > min(0.09, 0.3 * exp(-H(p)))``; the
deepest accepted node ends the path (ties: the path the target finds most likely, as in Medusa's
``evaluate_posterior``); the next token is the target's argmax there (greedy) or a sample from it.
"""

from __future__ import annotations

import math

import pytest
import torch

import specdec.algorithms.typical as typical_module
from specdec import SpecDecoder
from specdec.algorithms import acceptance as A
from specdec.algorithms.sampling import SamplingParams
from specdec.algorithms.typical import (
    POSTERIOR_ALPHA,
    POSTERIOR_THRESHOLD,
    typical,
    typical_threshold,
)
from specdec.errors import SpecdecError
from specdec.types import DraftTree
from tests.conftest import get_tiny

V = 8
# root distribution: entropy 1.5036 nats -> threshold 0.3 * exp(-1.5036) = 0.0667: tokens 0-3 pass, 4-7 do not
ROOT = [0.5, 0.2, 0.1, 0.08, 0.05, 0.04, 0.02, 0.01]
UNIFORM = [1 / V] * V


def logits_rows(rows) -> torch.Tensor:
    """``[1, N, V]`` logits (log-probabilities) whose softmax is each given row."""
    p = torch.tensor(rows, dtype=torch.float64)
    return torch.log(p / p.sum(-1, keepdim=True))[None]


def tree(tokens, parents) -> DraftTree:
    return DraftTree(torch.tensor([tokens]), torch.tensor([parents]))


# ---------------------------------------------------------------- labelled LOSSY


def test_typical_is_listed_and_documented_as_lossy():
    assert "typical" in A.LOSSY
    assert "rejection" not in A.LOSSY and "greedy" not in A.LOSSY
    assert A.RULES["typical"] is A.typical
    assert "LOSSY" in typical_module.__doc__
    assert "LOSSY" in A.typical.__doc__ and "LOSSY" in typical.__doc__


def test_generate_warns_lossy_when_sampling_with_typical():
    decoder = SpecDecoder(get_tiny(0), None, drafter="ngram", acceptance="typical")
    with pytest.warns(UserWarning, match="LOSSY"):
        out = decoder.generate(torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]]), max_new_tokens=4, do_sample=True, seed=0,
                               eos_token_id=None)
    assert len(out.new_tokens) == 4


def test_generate_greedy_rule_with_sampling_names_rejection():
    decoder = SpecDecoder(get_tiny(0), None, drafter="ngram", acceptance="greedy")
    with pytest.raises(SpecdecError, match="rejection"):
        decoder.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=True, seed=0)


def test_typical_really_is_lossy():
    """A plausible-but-unlikely draft (p = 0.1, above the threshold 0.0667) is accepted every time, so the first
    token is that draft with probability 1, not 0.1: the output distribution is not the target's."""
    t = tree([9, 2], [-1, 0])
    logits = logits_rows([ROOT, UNIFORM])
    g = torch.Generator().manual_seed(0)
    firsts = [typical(t, logits, SamplingParams(do_sample=True), g).num_accepted.item() for _ in range(200)]
    assert firsts == [1] * 200


# ---------------------------------------------------------------- golden values


def test_typical_threshold_golden():
    assert typical_threshold(torch.tensor(ROOT)).item() == pytest.approx(0.3 * math.exp(-1.50356), rel=1e-4)
    assert typical_threshold(torch.tensor([0.25] * 4)).item() == pytest.approx(0.075)  # 0.3 / 4
    assert typical_threshold(torch.tensor([1.0 / 8] * 8)).item() == pytest.approx(0.0375)  # 0.3 / 8
    assert typical_threshold(torch.tensor([1.0, 0, 0, 0])).item() == pytest.approx(POSTERIOR_THRESHOLD)  # H = 0
    assert typical_threshold(torch.tensor([0.5, 0.5, 0, 0])).item() == pytest.approx(0.09)  # 0.15 capped at 0.09
    assert typical_threshold(torch.tensor([0.25] * 4), threshold=0.05).item() == pytest.approx(0.05)
    assert typical_threshold(torch.tensor([0.25] * 4), alpha=0.1).item() == pytest.approx(0.025)
    assert (POSTERIOR_THRESHOLD, POSTERIOR_ALPHA) == (0.09, 0.3)  # Medusa's defaults
    batch = torch.tensor([[[0.25] * 4, [1.0, 0, 0, 0], [0.5, 0.5, 0, 0]]])  # [1, 3, 4] -> [1, 3]
    assert typical_threshold(batch).shape == (1, 3)
    assert typical_threshold(batch)[0].tolist() == pytest.approx([0.075, 0.09, 0.09])


def test_siblings_above_threshold_and_the_deepest_path():
    #   node:      0     1    2    3    4    5    6    7
    tokens = [9, 3, 0, 4, 1, 2, 6, 5]
    parents = [-1, 0, 0, 0, 1, 2, 3, 4]
    rows = [
        ROOT,                                        # 0: 3 (0.08) ok, 0 (0.5) ok, 4 (0.05) rejected
        [.05, .6, .05, .05, .05, .1, .05, .05],      # 1 (token 3): child 1 (0.6) ok
        [.3, .3, .02, .1, .1, .1, .04, .04],         # 2 (token 0): child 2 (0.02) rejected
        [.01, .01, .01, .01, .01, .01, .93, .01],    # 3 (token 4, rejected): child 6 would pass, parent failed
        [.1, .1, .1, .1, .1, .4, .05, .05],          # 4 (token 1): child 5 (0.4) ok -> depth 3
        UNIFORM, UNIFORM,
        [.05, .05, .05, .05, .05, .05, .6, .1],      # 7 (token 5): argmax 6 = the bonus
    ]
    acc = typical(tree(tokens, parents), logits_rows(rows), SamplingParams())
    # the deepest accepted node wins, not the most likely first sibling (node 2, a dead end at depth 1)
    assert acc.accepted_nodes(0) == [0, 1, 4, 7]
    assert acc.next_token.tolist() == [6]


def test_equal_depth_paths_ties_broken_by_likelihood():
    """Two accepted depth-2 paths: 0.5 * 0.3 = 0.15 via token 0, 0.2 * 0.86 = 0.172 via token 1 -> the latter."""
    tokens = [9, 0, 1, 2, 3]
    parents = [-1, 0, 0, 1, 2]
    rows = [ROOT,
            [.1, .1, .3, .1, .1, .1, .1, .1],          # 1 (token 0): child token 2 at 0.3
            [.02, .02, .02, .86, .02, .02, .02, .02],  # 2 (token 1): child token 3 at 0.86
            UNIFORM,
            [.05, .05, .65, .05, .05, .05, .05, .05]]  # 4: argmax 2
    acc = typical(tree(tokens, parents), logits_rows(rows), SamplingParams())
    assert acc.accepted_nodes(0) == [0, 2, 4]
    assert acc.next_token.tolist() == [2]


def test_nothing_accepted_gives_the_target_token():
    acc = typical(tree([9, 5, 7], [-1, 0, 0]), logits_rows([ROOT, UNIFORM, UNIFORM]), SamplingParams())
    assert acc.accepted_nodes(0) == [0] and acc.num_accepted.tolist() == [0]
    assert acc.next_token.tolist() == [0]  # argmax of ROOT


def test_temperature_changes_the_threshold():
    """At temperature 2 the root distribution flattens (threshold 0.0443) and token 4 (0.0925 there) passes;
    at temperature 1 it has 0.05 < 0.0667 and is rejected. The next token is sampled from the tempered p."""
    t = tree([9, 4], [-1, 0])
    last = [0.0] * V
    last[7] = 1.0  # the bonus row: all mass on token 7 whatever the temperature
    logits = logits_rows([ROOT, last])
    g = torch.Generator().manual_seed(0)
    hot = typical(t, logits, SamplingParams(do_sample=True, temperature=2.0), g)
    assert hot.accepted_nodes(0) == [0, 1] and hot.next_token.tolist() == [7]
    cold = typical(t, logits, SamplingParams(do_sample=True, temperature=1.0), g)
    assert cold.accepted_nodes(0) == [0]
    greedy = typical(t, logits, SamplingParams(do_sample=False, temperature=2.0))  # greedy ignores temperature
    assert greedy.accepted_nodes(0) == [0] and greedy.next_token.tolist() == [0]


def test_sampled_next_token_is_reproducible_and_respects_top_k():
    t = tree([9, 7], [-1, 0])
    logits = logits_rows([ROOT, UNIFORM])
    params = SamplingParams(do_sample=True, top_k=2)
    draws = [typical(t, logits, params, torch.Generator().manual_seed(s)).next_token.item() for s in range(60)]
    again = [typical(t, logits, params, torch.Generator().manual_seed(s)).next_token.item() for s in range(60)]
    assert draws == again
    assert set(draws) == {0, 1}  # top_k=2 of ROOT: only tokens 0 and 1 can be sampled


def test_dead_nodes_are_never_accepted():
    t = DraftTree(torch.tensor([[9, 0, 1]]), torch.tensor([[-1, 0, -2]]))
    acc = typical(t, logits_rows([ROOT, [.05, .65, .05, .05, .05, .05, .05, .05], UNIFORM]), SamplingParams())
    assert acc.accepted_nodes(0) == [0, 1] and acc.next_token.tolist() == [1]
