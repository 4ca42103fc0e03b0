"""The paged verifier and batched decoding.

Paged verifier logits == the reference verifier's; every drafter stays lossless through it; a batch's outputs ==
each request decoded alone (random arrival orders, continuous batching, sampling with per-request seeds);
preemption and refusal leave other requests' outputs unchanged; no block leaks.
"""

from __future__ import annotations

import random

import pytest
import torch

import specdec
from specdec import registry
from specdec.algorithms import tree as tree_ops
from specdec.algorithms.acceptance import get_rule
from specdec.algorithms.stopping import Stopper
from specdec.errors import ConfigError, PromptError, SpecdecError
from specdec.serving.engine import BatchEngine, DrafterPool
from specdec.types import Acceptance
from tests.conftest import DRAFTER_FACTORIES, get_tiny
from tests.equality import GreedyRef, assert_all_greedy_equal, assert_greedy_equal, assert_greedy_prefix, greedy_ref
from tests.tiny import random_prompt, tiny_tokenizer
from verifiers.hf import HFVerifier
from verifiers.paged import PagedVerifier

TOK = tiny_tokenizer()


def prompts_for(seed: int, n: int, lo: int = 2, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [random_prompt(seed * 100 + i, rng.randint(lo, hi), repeat=rng.random() < 0.5)[0].tolist()
            for i in range(n)]


def alone(model, prompt: list[int], max_new: int, eos=2) -> GreedyRef:
    return greedy_ref(model, torch.tensor([prompt]), max_new, eos_token_id=eos)


# ---------------------------------------------------------------- the verifier itself


@pytest.mark.parametrize("block_size", [1, 3, 16])
@pytest.mark.parametrize("seed", [0, 1])
def test_paged_logits_equal_reference_verifier(seed, block_size):
    """Same trees, same commits: the paged verifier's logits and hidden states match the HF verifier's."""
    model = get_tiny(seed, heads=6, kv_heads=2, hidden=48)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, 96, (1, 13), generator=g)
    ref, paged = HFVerifier(model), PagedVerifier(model, num_blocks=64, block_size=block_size)
    h_ref, h_paged = ref.start(0, prompt[:, :-1], output_hidden=True), paged.start(0, prompt[:, :-1], output_hidden=True)
    torch.testing.assert_close(h_paged, h_ref)
    root = int(prompt[0, -1])
    for step in range(4):
        parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, 7)]
        tokens = [root] + torch.randint(3, 96, (6,), generator=g).tolist()
        tree = specdec.DraftTree(torch.tensor([tokens]), torch.tensor([parents]))
        a, b = ref.score([0], [tree], output_hidden=True), paged.score([0], [tree], output_hidden=True)
        torch.testing.assert_close(b.logits, a.logits)
        torch.testing.assert_close(b.hidden, a.hidden)
        leaf = 1 + step % 6
        path = tree_ops.path_to(parents, leaf)
        acc = Acceptance.from_paths([path], [int(a.logits[0, leaf].argmax())])
        ref.commit(0, acc.accepted_nodes(0))
        paged.commit(0, acc.accepted_nodes(0))
        assert paged.cached_length(0) == ref.cached_length(0)
        root = int(acc.next_token[0])


def test_model_is_untouched_outside_paged_forwards():
    model = get_tiny(0)
    before = model.config._attn_implementation
    v = PagedVerifier(model, num_blocks=8, block_size=4)
    v.start(0, torch.tensor([[5, 6, 7]]))
    assert model.config._attn_implementation == before
    assert alone(model, [5, 6, 7, 8], 5) == alone(get_tiny(0), [5, 6, 7, 8], 5)


def test_bad_options_fail_clearly():
    with pytest.raises(ConfigError, match="kernel"):
        PagedVerifier(get_tiny(0), kernel="cuda")
    with pytest.raises(ConfigError, match="preemption"):  # the batching engine's option, given with the verifier's
        specdec.SpecDecoder(get_tiny(0), TOK, verifier="paged", verifier_kwargs={"preemption": "drop"})
    with pytest.raises(ConfigError, match="applies to batches"):
        specdec.SpecDecoder(get_tiny(0), TOK, verifier="hf", verifier_kwargs={"preemption": "refuse"})
    with pytest.raises(ConfigError, match="no option"):
        registry.build_verifier("paged", get_tiny(0), blocks=4)


# ---------------------------------------------------------------- lossless through the paged verifier (batch 1)


@pytest.mark.parametrize("kernel", ["auto", "sdpa"])  # auto: the C++ kernel where it builds
@pytest.mark.parametrize("seed, plen, max_new", [(0, 12, 40), (1, 1, 24), (4, 30, 40), (6, 120, 32)])
def test_every_drafter_lossless_with_paged_verifier(drafter_factory, seed, plen, max_new, kernel):
    target = get_tiny(seed)
    prompt = random_prompt(seed, plen, repeat=seed % 2 == 0)
    out = specdec.generate(target, prompt, tokenizer=TOK, drafter=drafter_factory.build(target, TOK),
                           verifier="paged", verifier_kwargs={"block_size": 4, "num_blocks": 64, "kernel": kernel},
                           max_new_tokens=max_new)
    assert_greedy_equal(out, alone(target, prompt[0].tolist(), max_new))


def test_cpu_default_is_the_cpp_kernel_and_falls_back_to_sdpa(monkeypatch):
    from verifiers.paged import cpu_kernel
    from verifiers.paged.kernels import paged_tree_attention_sdpa

    if cpu_kernel.available():
        assert PagedVerifier(get_tiny(0), num_blocks=8).kernel is cpu_kernel.paged_tree_attention_cpp
    monkeypatch.setattr(cpu_kernel._KERNEL, "_failed", "no compiler (simulated)")
    assert PagedVerifier(get_tiny(0), num_blocks=8).kernel is paged_tree_attention_sdpa
    with pytest.raises(ConfigError, match=r"kernel=cpp needs the C\+\+ kernel .*no compiler \(simulated\)\); "
                                          "use kernel=sdpa"):
        PagedVerifier(get_tiny(0), num_blocks=8, kernel="cpp")


def test_kv_exhaustion_single_request_is_a_clear_error():
    """A prompt that cannot run even alone (its prefill and one tree of max_nodes: the engine's admission formula)
    fails before any work, and the decoder serves the next request."""
    model = get_tiny(0)
    dec = specdec.SpecDecoder(model, TOK, drafter="none", verifier="paged", max_nodes=4,
                              verifier_kwargs={"num_blocks": 3, "block_size": 4})
    with pytest.raises(SpecdecError, match="KV blocks.*num_blocks"):
        dec.generate(torch.tensor([list(range(3, 20))]), max_new_tokens=8)
    assert dec.verifier.cache.num_free_blocks == 3
    out = dec.generate(torch.tensor([[5, 6]]), max_new_tokens=4, eos_token_id=None)  # the decoder still works
    assert_greedy_equal(out, alone(model, [5, 6], 4, eos=None))


# ---------------------------------------------------------------- batches


def engine_for(factory, target, *, num_blocks=256, block_size=4, max_batch_size=3, max_nodes=16,
               preemption="recompute", rule="greedy", sampling=None):
    verifier = PagedVerifier(target, num_blocks=num_blocks, block_size=block_size)
    first = factory.build(target, TOK)
    return BatchEngine(verifier, DrafterPool(lambda: factory.build(target, TOK), first), get_rule(rule),
                       max_nodes=max_nodes, max_batch_size=max_batch_size, sampling=sampling,
                       needs_hidden=first.needs_hidden_states, preemption=preemption)


def run_with_arrivals(engine, prompts, max_new, seed, eos=2):
    """Add the requests in a random order at random steps (continuous batching); returns outputs by prompt."""
    rng = random.Random(seed)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    ids = {}
    while order or not engine.done:
        while order and (engine.done or rng.random() < 0.4):
            i = order.pop()
            ids[i] = engine.add(torch.tensor([prompts[i]]), max_new_tokens=max_new,
                                stopper=Stopper(prompts[i], max_new, eos))
        engine.step()
    return [engine.requests[ids[i]] for i in range(len(prompts))]


@pytest.mark.parametrize("seed", [0, 1])
def test_batch_equals_each_request_alone(drafter_factory, seed):
    target = get_tiny(seed)
    prompts = prompts_for(seed, 6)
    engine = engine_for(drafter_factory, target, max_batch_size=3)
    done = run_with_arrivals(engine, prompts, 24, seed)
    for p, r in zip(prompts, done):
        assert_greedy_equal(r, alone(target, p, 24), f"request {r.request_id}")
    assert engine.verifier.cache.num_free_blocks == 256  # no leaks


def test_generate_batch_api_matches_alone_and_keeps_order():
    target = get_tiny(3)
    prompts = prompts_for(3, 5)
    outs = specdec.generate(target, prompts, tokenizer=TOK, drafter="ngram", max_new_tokens=20, max_batch_size=2,
                            verifier_kwargs={"num_blocks": 128, "block_size": 8})
    assert_all_greedy_equal(outs, [alone(target, p, 20) for p in prompts])
    assert all(o.sequences[0, :len(p)].tolist() == p for o, p in zip(outs, prompts))
    assert all(o.stats.verify_steps > 0 for o in outs)
    square = torch.tensor([p[:2] for p in prompts])  # a [B, T] tensor is a batch too
    outs = specdec.generate(target, square, drafter="none", max_new_tokens=6)
    assert_all_greedy_equal(outs, [alone(target, p[:2], 6) for p in prompts])


def test_batched_sampling_equals_each_request_alone_with_its_seed():
    """Request i samples with seed + i; its output is the one it gets decoded alone with that seed."""
    target = get_tiny(2)
    prompts = prompts_for(2, 4)
    dec = specdec.SpecDecoder(target, TOK, drafter="ngram", verifier="paged", max_batch_size=2,
                              verifier_kwargs={"num_blocks": 128, "block_size": 4})
    outs = dec.generate(prompts, max_new_tokens=16, do_sample=True, temperature=1.0, seed=7)
    single = specdec.SpecDecoder(target, TOK, drafter="ngram", verifier="paged")
    for i, (p, o) in enumerate(zip(prompts, outs)):
        assert o.new_tokens == single.generate(torch.tensor([p]), max_new_tokens=16, do_sample=True, temperature=1.0,
                                               seed=7 + i).new_tokens


def test_preemption_recomputes_and_changes_no_output():
    target = get_tiny(4)
    prompts = prompts_for(4, 6, lo=20, hi=40)
    # 30 blocks of 4: any one request fits (<= 40 + 32 + 16 positions) but three at once do not
    engine = engine_for(DRAFTER_FACTORIES[1], target, num_blocks=30, max_batch_size=4)
    done = run_with_arrivals(engine, prompts, 32, seed=4, eos=None)
    assert sum(r.preemptions for r in done) > 0
    for p, r in zip(prompts, done):
        assert_greedy_equal(r, alone(target, p, 32, eos=None), f"request {r.request_id}")  # finish reason "length"
    assert engine.verifier.cache.num_free_blocks == 30


def test_refuse_policy_cuts_only_the_request_that_ran_out():
    target = get_tiny(4)
    prompts = prompts_for(4, 6, lo=20, hi=40)
    engine = engine_for(DRAFTER_FACTORIES[1], target, num_blocks=30, max_batch_size=4, preemption="refuse")
    done = run_with_arrivals(engine, prompts, 32, seed=4, eos=None)
    refused = [r for r in done if r.finish_reason == "kv_exhausted"]
    assert refused and all("ran out of KV blocks" in r.error and "num_blocks" in r.error for r in refused)
    for p, r in zip(prompts, done):
        want = alone(target, p, 32, eos=None)
        if r.finish_reason == "kv_exhausted":  # cut short on purpose: what it made is kept and correct
            assert_greedy_prefix(r, want, "kv_exhausted", context=f"request {r.request_id}")
        else:
            assert_greedy_equal(r, want, f"request {r.request_id}")
    assert engine.verifier.cache.num_free_blocks == 30


def test_request_larger_than_the_pool_is_refused_at_admission():
    target = get_tiny(0)
    outs = specdec.generate(target, [[5, 6, 7], list(range(3, 60))], drafter="none", max_new_tokens=8,
                            verifier_kwargs={"num_blocks": 6, "block_size": 4}, eos_token_id=None)
    assert_greedy_equal(outs[0], alone(target, [5, 6, 7], 8, eos=None))
    assert_greedy_equal(outs[1], GreedyRef([], "kv_exhausted"))  # refused before it ran: nothing made
    assert "the cache has 6" in outs[1].error and "num_blocks" in outs[1].error


def test_shared_prompt_prefix_shares_blocks():
    target = get_tiny(5)
    system = prompts_for(5, 1, lo=24, hi=24)[0]
    prompts = [system + p for p in prompts_for(6, 3, lo=2, hi=6)]
    engine = engine_for(DRAFTER_FACTORIES[1], target, block_size=4, max_batch_size=3)
    for p in prompts:
        engine.add(torch.tensor([p]), max_new_tokens=12, stopper=Stopper(p, 12, 2))
    engine.step()  # admits all three: the later two reuse the first one's six full prompt blocks
    cache = engine.verifier.cache
    first = cache.seqs[0].blocks[:6]
    assert cache.seqs[1].blocks[:6] == first and cache.seqs[2].blocks[:6] == first
    assert all(cache.allocator.ref_count(b) == 3 for b in first)
    done = engine.run()
    assert_all_greedy_equal(done, [alone(target, p, 12) for p in prompts])
    assert cache.num_free_blocks == 256


def test_batch_input_errors_lose_nothing():
    target = get_tiny(0)
    with pytest.raises(SpecdecError, match="verifier='paged'"):
        specdec.SpecDecoder(target, TOK, drafter="none").generate([[5, 6], [7, 8]], max_new_tokens=4)
    dec = specdec.SpecDecoder(target, TOK, drafter="none", verifier="paged")
    with pytest.raises(PromptError, match="context"):  # checked before any request runs
        dec.generate([[5, 6], list(range(3, 90)) * 6], max_new_tokens=4)
    with pytest.raises(PromptError, match="empty"):
        dec.generate([[5, 6], []], max_new_tokens=4)
    obj = specdec.SpecDecoder(target, TOK, drafter=registry.build_drafter("ngram", target), verifier="paged",
                              max_batch_size=2)
    with pytest.raises(SpecdecError, match="by name or checkpoint path"):
        obj.generate([[5, 6], [7, 8]], max_new_tokens=4)
    assert_greedy_equal(obj.generate([[5, 6], [7, 8]], max_new_tokens=4, max_batch_size=1)[1], alone(target, [7, 8], 4))
