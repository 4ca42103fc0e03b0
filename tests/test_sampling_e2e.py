"""End to end: specdec's sampled output has the target's distribution, for every drafter kind.

A tiny random float64 Llama with a SMALL vocabulary (V = 8, ``init=0.1``: its next-token distributions spread
over all 8 tokens, largest ~0.4) is the target. The exact joint distribution of its first two generated tokens
is computed analytically: ``P(a, b) = p1(a) * p2(b | a)`` with p1 the warped softmax of the prompt's last logits
and ``p2(. | a)`` from one batched forward over the V one-token continuations of the prompt.

Each case draws ``N_SAMPLES`` independent generations (``SpecDecoder.generate(do_sample=True, seed=i,
max_new_tokens=3, eos_token_id=None)``, seeds fixed, so the suite is deterministic) and compares the counts of
(token 1, token 2) over the V * V = 64 cells with the exact joint by Pearson's chi-square goodness of fit at
significance ``ALPHA = 1e-3`` (cells expecting < 5 counts merged; cells of probability 0 must stay empty; helpers
in tests/test_rejection.py). ``max_new_tokens=3`` rather than 2 lets the first draft tree reach depth 2, so the
first two tokens can both be accepted draft tokens (with 2 the loop limits the first tree to depth 1); any
prefix of a lossless output has the target's distribution.

The statistical power of this very test against wrong rules is shown in tests/test_rejection.py; here each case
uses ~2500 samples to keep the file under a minute single-threaded.
"""

from __future__ import annotations

import functools

import pytest
import torch

from drafters.draft_model import DraftModelDrafter
from specdec import SpecDecoder
from specdec.algorithms.sampling import SamplingParams, warp_probs
from tests.test_rejection import (
    ALPHA,
    assert_matches,
    chi2_critical,
    chi_square_gof,
    chi_square_homogeneity,
)
from tests.tiny import random_prompt, tiny_llama

V = 8
INIT = 0.1
N_SAMPLES = 2500
MAX_NEW_TOKENS = 3
# repetitive prompt (motif 5 3 5 5): the n-gram drafter proposes a two-branch tree at the first step,
# root 5 -> {5 -> 3, 3 -> 5}; the target gives token 3 probability ~0.37 there, token 5 ~0.04
PROMPT = random_prompt(10, 12, vocab_size=V)
WARPED = dict(temperature=0.7, top_k=5, top_p=0.9)


@functools.cache
def target():
    return tiny_llama(0, vocab_size=V, init=INIT)


@functools.cache
def draft_model():
    return tiny_llama(1234, vocab_size=V, init=INIT, layers=1)  # other weights than the target


def exact_joint(model, ids: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``[V, V]`` the target's exact distribution of its first two tokens after ``ids [1, T]``."""
    with torch.no_grad():
        p1 = warp_probs(model(ids).logits[0, -1], params).double()  # [V]
        ext = torch.cat([ids.repeat(V, 1), torch.arange(V)[:, None]], dim=1)  # [V, T + 1]
        p2 = warp_probs(model(ext).logits[:, -1], params).double()  # [V, V]: row a = p2(. | a)
    return p1[:, None] * p2


def build_drafter(kind: str):
    if kind == "ngram":
        return "ngram"
    if kind == "suffix":  # earlier samples' continuations of the same prompt (a cache of its own)
        from drafters.suffix import SuffixDrafter
        from drafters.suffix_cache import SuffixCache

        return SuffixDrafter(target(), None, min_share=0.0, suffix_cache=SuffixCache())
    if kind == "recycling":  # the target's own top-k after the prompt's tokens, then after each sample's nodes
        from drafters.recycling import RecyclingDrafter
        from drafters.successor_table import SuccessorTable

        table = SuccessorTable(k=4)
        with torch.no_grad():
            table.update(PROMPT[0].numpy(), target()(PROMPT).logits[0].topk(4).indices.numpy())
        return RecyclingDrafter(target(), None, k=4, min_score=0.0, successor_table=table, seeded_private=False)
    if kind == "hybrid":  # n-gram + a draft-model tree merged into one tree (deterministic candidates)
        from drafters.hybrid import HybridDrafter

        hybrid = HybridDrafter(target(), None, drafters=[{"name": "ngram", "min_ngram": 1}, "none"])
        hybrid.parts[1] = DraftModelDrafter(target(), None, model=draft_model(), depth=2, width=2)
        return hybrid
    if kind == "dynamic":  # EAGLE-2-style dynamic tree: top-k candidates chosen by draft probability, no q
        return DraftModelDrafter(target(), None, model=draft_model(), depth=2, dynamic=True, top_k=3)
    width = {"chain": 1, "tree": 2, "self": 1}[kind]
    model = target() if kind == "self" else draft_model()
    return DraftModelDrafter(target(), None, model=model, depth=2, width=width)


def first_two_counts(decoder, prompt: torch.Tensor, v: int, n: int, seed0: int, **params):
    """Counts ``[v, v]`` of (token 1, token 2) over ``n`` sampled generations of ``decoder`` after ``prompt``
    (seeds ``seed0 + i``, ``params`` on top); also (drafted, accepted) per verify step."""
    counts = torch.zeros(v, v, dtype=torch.long)
    drafted, accepted = [], []
    for i in range(n):
        out = decoder.generate(prompt, max_new_tokens=MAX_NEW_TOKENS, do_sample=True, seed=seed0 + i,
                               eos_token_id=None, **params)
        counts[out.new_tokens[0], out.new_tokens[1]] += 1
        drafted += out.stats.drafted
        accepted += out.stats.accepted
    return counts, drafted, accepted


@functools.cache
def specdec_samples(kind: str, warped: bool = False, seed0: int = 0):
    """Counts ``[V, V]`` of (token 1, token 2) over N_SAMPLES generations; also (drafted, accepted) per step."""
    decoder = SpecDecoder(target(), None, drafter=build_drafter(kind))
    return first_two_counts(decoder, PROMPT, V, N_SAMPLES, seed0, **(WARPED if warped else {}))


def params(warped: bool) -> SamplingParams:
    return SamplingParams(do_sample=True, **WARPED) if warped else SamplingParams(do_sample=True)


def test_target_distribution_is_not_degenerate():
    joint = exact_joint(target(), PROMPT, params(False))
    assert float(joint.sum()) == pytest.approx(1.0)
    p1 = joint.sum(dim=1)
    assert float(p1.max()) < 0.5 and float(p1.min()) > 0.02  # every token plausible, none dominant


@pytest.mark.parametrize("kind,seed0", [("ngram", 0), ("suffix", 80_000), ("recycling", 90_000), ("chain", 10_000),
                                        ("tree", 20_000), ("dynamic", 60_000), ("hybrid", 70_000)])
def test_first_two_tokens_have_the_target_distribution(kind, seed0):
    counts, drafted, accepted = specdec_samples(kind, seed0=seed0)
    assert_matches(counts, exact_joint(target(), PROMPT, params(False)), kind)
    assert sum(accepted) > N_SAMPLES // 10  # the drafts really were accepted now and then: the rule was exercised
    assert sum(accepted) < sum(drafted)  # ... and rejected now and then


def test_target_drafting_for_itself_accepts_everything():
    counts, drafted, accepted = specdec_samples("self", seed0=30_000)
    assert accepted == drafted and sum(drafted) >= 2 * N_SAMPLES
    assert_matches(counts, exact_joint(target(), PROMPT, params(False)), "self draft")


def test_temperature_top_k_top_p():
    """Temperature 0.7, top_k=5, top_p=0.9 on a width-2 draft-model tree: the warped target's distribution,
    and never a token that warping removes (checked cell by cell)."""
    counts, drafted, accepted = specdec_samples("tree", warped=True, seed0=40_000)
    expected = exact_joint(target(), PROMPT, params(True))
    assert int((expected == 0).sum()) >= 3 * V  # top-k alone removes 3 of 8 tokens everywhere
    assert_matches(counts, expected, "warped")
    assert sum(accepted) > 0


def test_same_distribution_as_transformers_generate():
    """``model.generate(do_sample=True, temperature, top_k, top_p)`` samples vs specdec's (the warped case):
    a two-sample chi-square homogeneity test at ALPHA; and transformers' samples fit the exact joint we use."""
    model = target()
    n = 4000
    torch.manual_seed(0)
    out = model.generate(PROMPT.repeat(n, 1), attention_mask=torch.ones(n, PROMPT.shape[1], dtype=torch.long),
                         do_sample=True, max_new_tokens=2, eos_token_id=None, **WARPED)
    new = out[:, PROMPT.shape[1]:]
    hf_counts = torch.bincount(new[:, 0] * V + new[:, 1], minlength=V * V).view(V, V)
    assert_matches(hf_counts, exact_joint(model, PROMPT, params(True)), "transformers' own sampling")
    ours, _, _ = specdec_samples("tree", warped=True, seed0=40_000)
    stat, df = chi_square_homogeneity(ours, hf_counts)
    assert stat <= chi2_critical(df), f"chi-square {stat:.1f} > {chi2_critical(df):.1f} (df={df}, alpha={ALPHA})"


def test_comparison_rejects_a_different_target():
    """Sanity of the comparison itself: the sampled counts do NOT fit a different (temperature 0.7) target."""
    counts, _, _ = specdec_samples("chain", seed0=10_000)
    stat, df = chi_square_gof(counts, exact_joint(target(), PROMPT, SamplingParams(do_sample=True, temperature=0.7)))
    assert stat > chi2_critical(df)


def test_same_seed_same_tokens():
    decoder = SpecDecoder(target(), None, drafter=build_drafter("tree"))
    runs = [decoder.generate(PROMPT, max_new_tokens=12, do_sample=True, seed=s, eos_token_id=None).new_tokens
            for s in (5, 5, 6, 7)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2] or runs[0] != runs[3]
