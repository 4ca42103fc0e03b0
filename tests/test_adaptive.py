"""The cost model (golden budget choices), acceptance statistics, the per-request adaptive budget, the profile cache,
and losslessness with adaptive budgets (greedy, batched, and the sampling distribution)."""

from __future__ import annotations

import json

import pytest
import torch

import specdec
from specdec.algorithms import tree as tree_ops
from specdec.algorithms.adaptive import AcceptanceStats, AdaptiveBudget, Calibrator, uncut
from specdec.algorithms.cost import CostProfile, chain_node_values, choose_budget
from specdec import profiler
from specdec.types import Acceptance, DraftTree
from tests.conftest import DRAFTER_FACTORIES, get_tiny
from tests.equality import assert_all_greedy_equal, assert_greedy_equal, greedy_ref
from tests.tiny import random_prompt, tiny_tokenizer

TOK = tiny_tokenizer()
# a CPU-like profile: 2-4 nodes cost little more than 1, 16 cost 2x, 64 cost 5x
CPU = CostProfile(key={}, verify_ms={1: 50.0, 2: 52.0, 4: 55.0, 8: 65.0, 16: 100.0, 32: 150.0, 64: 250.0},
                  draft_ms={"ngram": 0.5, "draft_model": 15.0})

# ---------------------------------------------------------------- cost profile and budget choice (golden)


def test_verify_interpolates_and_is_monotone():
    p = CostProfile(key={}, verify_ms={1: 50.0, 2: 60.0, 4: 55.0, 8: 80.0})  # 2 measured above 4: noise
    assert [round(p.verify(n), 2) for n in (1, 2, 3, 4, 6, 8, 16)] == [50.0, 55.0, 55.0, 55.0, 67.5, 80.0, 160.0]


@pytest.mark.parametrize("values, drafter, cap, base_rows, nodes", [
    ([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], "ngram", 32, 0, 8),  # good drafts: a mid-size chain pays
    ([0.05, 0.02, 0.01], "ngram", 32, 0, 1),  # drafts never accepted: plain decoding
    ([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], "ngram", 4, 0, 4),  # capped
    ([0.2, 0.05], "draft_model", 32, 0, 1),  # a 15 ms drafter call is not worth 0.25 expected tokens
    ([0.2, 0.05], "ngram", 32, 0, 3),  # ... a 0.5 ms one is
    # in a batch of 8 the extra rows must earn the batch's own rate (8 tokens / 65 ms): good drafts still do here
    ([0.9, 0.8, 0.7, 0.6], "ngram", 32, 7, 5),
    ([0.5, 0.3], "ngram", 32, 7, 1),
])
def test_choose_budget_golden(values, drafter, cap, base_rows, nodes):
    assert choose_budget(CPU, values, drafter, cap, base_rows=base_rows).nodes == nodes


def test_choose_budget_maximises_tokens_per_second():
    values = [0.8, 0.6, 0.5, 0.2, 0.1]
    best = choose_budget(CPU, values, "ngram")
    for n in range(1, len(values) + 2):
        tokens = 1 + sum(values[:n - 1])
        ms = CPU.verify(n) + (CPU.draft("ngram") if n > 1 else 0)
        assert best.tokens_per_s >= 1000 * tokens / ms - 1e-9


def test_chain_node_values_and_stats():
    assert chain_node_values([0.5, 0.5]) == [0.5, 0.25]
    s = AcceptanceStats(decay=0.5, prior=0.5)
    s.update(drafted_depth=2, accepted=2)  # both depths hit
    s.update(drafted_depth=3, accepted=0)  # depth 1 missed; depths 2, 3 never reached: no evidence
    assert s.rates == [0.375, 0.75] and s.rate(5) == 0.5 and s.steps == 2


def _step(budget: AdaptiveBudget, depth: int, accepted: int) -> None:
    tree = tree_ops.chain(5, [6] * depth)
    budget.observe(tree, Acceptance.from_paths([list(range(accepted + 1))], [7]), draft_ms=0.5)


def test_budget_grows_with_acceptance_and_switches_off_then_probes():
    b = AdaptiveBudget(CPU, "ngram", max_nodes=16, probe_every=3, probe_nodes=2)
    for _ in range(20):
        _step(b, depth=b.nodes() - 1, accepted=b.history[-1] - 1)  # everything accepted
    assert b.history[0] == 4 and b.history[-1] == 8  # prior 0.5 -> 4 nodes; ~all accepted -> 8 (16 cost 2x)
    for _ in range(40):
        n = b.nodes()
        _step(b, depth=n - 1, accepted=0)  # nothing accepted
    tail = b.history[-9:]
    assert tail.count(1) == 6 and tail.count(2) == 3  # off, with a 2-node probe every third step


# ---------------------------------------------------------------- per-step cuts of scored trees


def _scored(parents: list[int], scores: list[float]) -> DraftTree:
    return DraftTree(torch.arange(len(parents))[None] + 10, torch.tensor([parents]), scores=torch.tensor([scores]))


# root -> a (0.9) -> b (0.8) -> c (0.7) -> d (0.2); root -> e (0.05)
DEEP = ([-1, 0, 1, 2, 3, 0], [1.0, 0.9, 0.8, 0.7, 0.2, 0.05])


@pytest.mark.parametrize("scores, base_rows, kept", [
    (DEEP[1], 0, [0, 1, 2, 3, 4]),  # a confident chain is kept deep (5 nodes cost 1.15x one)
    ([1.0, 0.3, 0.1, 0.05, 0.02, 0.3], 0, [0, 1, 2, 5]),  # unsure: both likely first tokens, then one more
    ([1.0, 0.04, 0.03, 0.02, 0.01, 0.01], 0, [0]),  # nothing worth its cost: the root alone
    (DEEP[1], 7, [0, 1, 2, 3]),  # in a batch of 8 the 0.2 node no longer earns the batch's rate
])
def test_cut_keeps_the_nodes_that_pay_golden(scores, base_rows, kept):
    # a calibrator that trusts the raw scores (no observations, prior only)
    b = AdaptiveBudget(CPU, "ngram", max_nodes=16, calibrator=Calibrator(prior_weight=1.0))
    tree = _scored(DEEP[0], scores)
    cut, keep = b.cut(tree, batch_rows=base_rows)
    assert (keep or list(range(tree.num_nodes))) == kept
    assert cut.tokens[0].tolist() == [10 + i for i in kept]
    assert cut.scores[0].tolist() == pytest.approx([scores[i] for i in kept])


def test_cut_leaves_sampled_and_unscored_trees_alone():
    b = AdaptiveBudget(CPU, "ngram", max_nodes=16)
    unscored = tree_ops.chain(5, [6, 7])
    assert b.cut(unscored) == (unscored, None)
    sampled = DraftTree(torch.tensor([[5, 6]]), torch.tensor([[-1, 0]]), torch.full((1, 2, 4), 0.25),
                        scores=torch.tensor([[1.0, 0.01]]))
    assert b.cut(sampled) == (sampled, None)  # cutting drawn siblings would bias the rejection rule


def test_uncut_renumbers_the_accepted_path_to_the_proposed_tree():
    acc = Acceptance.from_paths([[0, 1, 2]], [42])
    back = uncut(acc, [0, 2, 5, 7])
    assert back.accepted_nodes(0) == [0, 2, 5] and int(back.next_token[0]) == 42


def test_calibrator_learns_overconfident_scores_and_cuts_follow():
    c = Calibrator(prior_weight=2.0, decay=1.0)
    for i in range(200):  # scores claim 0.9 at depth 1, but only one node in fifty is accepted
        c.update([1.0, 0.9], [0, 1], [True, i % 50 == 0])
    assert c.value(0.9, 1) == pytest.approx((4 + 1.8) / 202)
    assert c.value(0.9, 2) == pytest.approx(0.9)  # depth 2 never observed: the prior (the raw score)
    assert c.values([1.0, 0.9, 0.9], [0, 1, 2], [-1, 0, 1])[2] == pytest.approx(c.value(0.9, 1))  # <= its parent
    trusting = AdaptiveBudget(CPU, "draft_model", max_nodes=16, calibrator=Calibrator())
    learned = AdaptiveBudget(CPU, "draft_model", max_nodes=16, calibrator=c)
    tree = _scored([-1, 0], [1.0, 0.9])
    # the call is spent when the tree is cut: a node is kept if it pays for its own verify cost (52 vs 50 ms)
    assert trusting.cut(tree)[1] is None and learned.cut(tree)[1] == [0]  # 0.03 tokens do not
    # whether drafting paid, its 15 ms call included, decides whether the next steps draft: 1.9 tokens in 67 ms
    # beat 1 in 50, 1.03 do not (one step toward switching the drafter off)
    assert (trusting._unpaid, learned._unpaid) == (0, 1)


def test_scored_drafter_is_switched_off_then_probed_with_a_small_tree():
    b = AdaptiveBudget(CPU, "ngram", max_nodes=16, probe_every=3, probe_nodes=2, off_after=2,
                       calibrator=Calibrator(prior_weight=1.0, decay=1.0))
    hopeless = _scored([-1, 0, 1], [1.0, 0.01, 0.01])
    sizes = []
    for _ in range(10):
        cap = b.nodes()
        tree, _ = b.cut(hopeless) if cap > 1 else (tree_ops.chain(5, []), None)
        b.observe(tree, Acceptance.from_paths([[0]], [7]))
        sizes.append((cap, tree.num_nodes))
    # (the first step, before the budget has seen a scored tree, uses the acceptance statistics' budget: 4)
    # two steps cut to the root, then off (no drafting) with a forced 2-node probe every third step
    assert sizes == [(4, 1), (16, 1), (1, 1), (1, 1), (16, 2), (1, 1), (1, 1), (16, 2), (1, 1), (1, 1)]
    assert b.history == [n for _, n in sizes]


# ---------------------------------------------------------------- the profile cache


def test_profile_is_cached_and_invalidated_when_the_setting_changes(tmp_path):
    model = get_tiny(0, dtype=torch.float32)
    kw = {"root": tmp_path, "sizes": (1, 2, 4), "reps": 1}
    p1, path1, measured = profiler.load_or_measure(model, **kw)
    assert measured and path1.exists() and set(p1.verify_ms) == {1, 2, 4}
    assert json.loads(path1.read_text())["key"]["threads"] == torch.get_num_threads()
    p2, path2, measured = profiler.load_or_measure(model, **kw)
    assert not measured and path2 == path1 and p2 == p1
    threads = torch.get_num_threads()
    try:  # another thread count: another key, a new measurement
        torch.set_num_threads(threads + 1)
        _, path3, measured = profiler.load_or_measure(model, **kw)
        assert measured and path3 != path1
    finally:
        torch.set_num_threads(threads)
    _, path4, measured = profiler.load_or_measure(get_tiny(0, dtype=torch.float64), **kw)  # another dtype
    assert measured and path4 != path1
    _, path5, measured = profiler.load_or_measure(get_tiny(1, dtype=torch.float32), **kw)  # another model
    assert measured and path5 != path1
    # the plain F.linear kernel instead of the fast one (specdec.kernels.cpu_gemm): verify costs differ
    _, path6, measured = profiler.load_or_measure(model, fast_linears=False, **kw)
    assert measured and path6 != path1
    assert profiler.load_or_measure(model, fast_linears=False, **kw)[1:] == (path6, False)
    # a file whose key says another device is not used for this one (e.g. copied from a GPU machine)
    data = json.loads(path1.read_text())
    data["key"]["device"] = "cuda"
    path1.write_text(json.dumps(data))
    assert profiler.load(path1, profiler.profile_key(model)) is None
    path1.write_text("{not json")
    assert profiler.load(path1, profiler.profile_key(model)) is None
    assert "nodes" in profiler.format_profile(p1)


# ---------------------------------------------------------------- lossless with adaptive budgets


@pytest.mark.parametrize("seed", [0, 4])
def test_adaptive_greedy_is_lossless(drafter_factory, seed):
    target = get_tiny(seed)
    prompt = random_prompt(seed, 24, repeat=True)
    dec = specdec.SpecDecoder(target, TOK, drafter=drafter_factory.build(target, TOK), adaptive=True,
                              cost_profile=CPU, max_nodes=16)
    out = dec.generate(prompt, max_new_tokens=40)
    assert_greedy_equal(out, greedy_ref(target, prompt, 40))


def test_adaptive_batch_is_lossless_and_budgets_differ_per_request():
    target = get_tiny(2)
    prompts = [random_prompt(i, 20, repeat=i % 2 == 0)[0].tolist() for i in range(5)]
    dec = specdec.SpecDecoder(target, TOK, drafter="ngram", verifier="paged", adaptive=True, cost_profile=CPU,
                              max_batch_size=3)
    budgets = []
    make = dec._budget
    dec._budget = lambda *a: budgets.append(make(*a)) or budgets[-1]
    outs = dec.generate(prompts, max_new_tokens=30)
    assert_all_greedy_equal(outs, [greedy_ref(target, p, 30) for p in prompts])
    assert len(budgets) == 5 and len({tuple(b.history) for b in budgets}) > 1


@pytest.mark.parametrize("kind", ["chain", "dynamic"])
def test_sampling_with_adaptive_budgets_keeps_the_target_distribution(kind):
    """History-dependent tree sizes (the budget after a rejection differs from the one after an acceptance) must
    not bias the sampled tokens: same chi-square check as tests/test_sampling_e2e.py. ``chain``: sampled drafts
    (budgeted by the acceptance statistics); ``dynamic``: scored deterministic candidates, cut every step by the
    calibrated confidences (the calibration is shared across samples, so it changes as they run)."""
    from tests.test_sampling_e2e import (
        N_SAMPLES,
        PROMPT,
        assert_matches,
        build_drafter,
        exact_joint,
        params,
        target,
    )

    profile = CostProfile(key={}, verify_ms={1: 50.0, 2: 50.5, 3: 75.0}, draft_ms={})
    dec = specdec.SpecDecoder(target(), None, drafter=build_drafter(kind), adaptive=True, cost_profile=profile,
                              max_nodes=3)
    histories = set()
    make = dec._budget

    def recording(*a):
        b = make(*a)
        b.stats.decay = 0.3
        histories.add(id(b))
        recording.last = b
        return b

    dec._budget = recording
    counts = torch.zeros(8, 8, dtype=torch.long)
    shapes = set()
    for i in range(N_SAMPLES):
        out = dec.generate(PROMPT, max_new_tokens=4, do_sample=True, seed=50_000 + i, eos_token_id=None)
        counts[out.new_tokens[0], out.new_tokens[1]] += 1
        shapes.add(tuple(recording.last.history))
    assert len(shapes) > 1  # the budget really followed each sample's own history
    assert_matches(counts, exact_joint(target(), PROMPT, params(False)), "adaptive")


def test_adaptive_needs_no_profile_argument(tmp_path, monkeypatch):
    """Without cost_profile the decoder measures one (cached under $SPECDEC_CACHE) and uses it."""
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    monkeypatch.setattr(profiler, "SIZES", (1, 2))
    target = get_tiny(0, dtype=torch.float32)
    dec = specdec.SpecDecoder(target, TOK, drafter="ngram", adaptive=True)
    assert list((tmp_path / "profiles").glob("cost-*.json"))
    prompt = random_prompt(0, 12, repeat=True)
    assert_greedy_equal(dec.generate(prompt, max_new_tokens=10), greedy_ref(target, prompt, 10))
    assert DRAFTER_FACTORIES  # the lossless test above covers every registered drafter
