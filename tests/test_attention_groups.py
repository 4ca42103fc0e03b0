"""Attention groups in a batched verify step: the plan (golden cases, a partition, never worse than one call) and
the outputs (the same logits and hidden states whatever the grouping, and batches equal to requests alone)."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import specdec
from tests.conftest import get_tiny
from tests.equality import assert_greedy_equal
from tests.test_paged_verifier import alone, engine_for, prompts_for, run_with_arrivals
from verifiers.paged import PagedVerifier
from verifiers.paged import verifier as paged
from verifiers.paged.groups import GROUP_OVERHEAD, group_cost, plan_groups

# ---------------------------------------------------------------- the plan


def test_golden_plans():
    # one-node trees beside eight-node trees, long prefixes: two calls
    assert plan_groups([8, 1, 1, 1, 8, 1], [400] * 6, block_size=16) == [[1, 2, 3, 5], [0, 4]]
    # short prefixes: the padding costs less than another call
    assert plan_groups([8, 1, 1, 1, 8, 1], [16] * 6, block_size=16) == [[0, 1, 2, 3, 4, 5]]
    # same tree sizes, very different prefixes: split by prefix length
    assert plan_groups([1] * 4 + [1] * 4, [2000] * 4 + [16] * 4, block_size=16, overhead=100) == [[4, 5, 6, 7],
                                                                                                    [0, 1, 2, 3]]
    # no overhead: every distinct (size, prefix) its own group
    assert plan_groups([3, 1, 3], [32, 32, 32], block_size=16, overhead=0) == [[1], [0, 2]]
    assert plan_groups([], [], block_size=16) == []
    assert plan_groups([4], [0], block_size=16) == [[0]]


@given(st.lists(st.tuples(st.integers(1, 32), st.integers(0, 3000)), min_size=1, max_size=24),
       st.sampled_from([1, 16]), st.integers(0, 20000))
def test_plan_is_a_partition_no_worse_than_one_call(reqs, block_size, overhead):
    nodes, prefixes = [r[0] for r in reqs], [r[1] for r in reqs]
    plan = plan_groups(nodes, prefixes, block_size, overhead)
    assert sorted(i for g in plan for i in g) == list(range(len(reqs)))
    assert all(g == sorted(g) and g for g in plan)

    def total(groups):
        return sum(group_cost([nodes[i] for i in g], [prefixes[i] for i in g], block_size) + overhead
                   for g in groups)

    assert total(plan) <= total([list(range(len(reqs)))])
    assert total(plan) <= total([[i] for i in range(len(reqs))])


def test_default_overhead_is_positive():
    assert GROUP_OVERHEAD > 0


# ---------------------------------------------------------------- the outputs


def one_per_request(nodes, prefixes, block_size):
    return [[i] for i in range(len(nodes))]


def shuffled_pairs(nodes, prefixes, block_size):
    """Arbitrary groups (not sorted by anything): requests paired in a random order."""
    order = list(range(len(nodes)))
    random.Random(len(nodes)).shuffle(order)
    return [sorted(order[i:i + 2]) for i in range(0, len(order), 2)]


PLANS = {"one_group": None, "one_per_request": one_per_request, "shuffled_pairs": shuffled_pairs,
         "planned": plan_groups}


@pytest.mark.parametrize("kernel", ["sdpa", "torch"])
@pytest.mark.parametrize("plan", list(PLANS))
def test_grouping_does_not_change_logits(monkeypatch, plan, kernel):
    """Four requests with different prompt lengths and tree sizes (one a single node, dead padding in the others)
    score the same logits and hidden states in one call and in any grouping."""
    model = get_tiny(3, heads=6, kv_heads=2, hidden=48)
    g = torch.Generator().manual_seed(3)
    lens, sizes = [5, 23, 2, 40], [1, 6, 3, 1]
    trees = []
    for n in sizes:
        parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]
        trees.append(specdec.DraftTree(torch.randint(3, 96, (1, n), generator=g), torch.tensor([parents])))

    def score(group_attention):
        v = PagedVerifier(model, num_blocks=64, block_size=4, kernel=kernel, group_attention=group_attention)
        for rid, n in enumerate(lens):
            v.start(rid, torch.randint(3, 96, (1, n), generator=torch.Generator().manual_seed(rid)))
        return v.score(list(range(len(lens))), trees, output_hidden=True)

    ref = score(False)
    if PLANS[plan] is not None:
        monkeypatch.setattr(paged, "plan_groups", PLANS[plan])
    out = score(plan != "one_group")
    for i, n in enumerate(sizes):
        torch.testing.assert_close(out.logits[i, :n], ref.logits[i, :n])
        torch.testing.assert_close(out.hidden[i, :n], ref.hidden[i, :n])


@pytest.mark.parametrize("plan", ["one_per_request", "shuffled_pairs"])
def test_batch_with_forced_groups_equals_each_request_alone(monkeypatch, drafter_factory, plan):
    monkeypatch.setattr(paged, "plan_groups", PLANS[plan])
    target = get_tiny(0)
    prompts = prompts_for(5, 6)
    engine = engine_for(drafter_factory, target, max_batch_size=4)
    done = run_with_arrivals(engine, prompts, 20, 5)
    for p, r in zip(prompts, done):
        assert_greedy_equal(r, alone(target, p, 20), f"request {r.request_id}")
    assert engine.verifier.cache.num_free_blocks == 256
