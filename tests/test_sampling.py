"""Sampling parameters and logit warping mean exactly what transformers means.

``warp_logits`` / ``warp_probs`` must equal transformers' own warpers (``TemperatureLogitsWarper``,
``TopKLogitsWarper``, ``TopPLogitsWarper``, applied in that order, each only when it is on, as
``model.generate`` builds them) bit for bit: same kept tokens, same values.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from specdec import SpecDecoder
from specdec.algorithms.sampling import SamplingParams, sample, uniform, warp_logits, warp_probs
from specdec.errors import SpecdecError
from tests.conftest import get_tiny

V = 32


def hf_warp(scores: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """transformers' warping of ``scores [B, V]``, built the way ``generate`` builds it."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p))
    return warpers(None, scores)


def random_logits(seed: int, rows: int = 64, vocab: int = V, ties: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: ties everywhere, also at the top-k and top-p cut points
        return torch.randint(0, 4, (rows, vocab), generator=g).float()
    return torch.randn(rows, vocab, generator=g) * 3


COMBOS = [
    (1.0, 0, 1.0),  # everything off
    (0.7, 0, 1.0),
    (1.5, 0, 1.0),
    (1.0, 1, 1.0),
    (1.0, 5, 1.0),
    (1.0, V, 1.0),  # top_k == V: off in effect
    (1.0, 100, 1.0),  # top_k > V
    (1.0, 0, 0.9),
    (1.0, 0, 0.5),
    (0.5, 10, 0.8),
    (1.3, 3, 0.95),
    (2.0, 20, 0.3),
    (0.9, 0, 1e-6),  # tiny top_p: the argmax only
]


@pytest.mark.parametrize("temperature,top_k,top_p", COMBOS)
@pytest.mark.parametrize("ties", [False, True])
def test_warp_equals_transformers(temperature, top_k, top_p, ties):
    logits = random_logits(int(temperature * 100) + 7 * top_k + int(top_p * 1000), ties=ties)
    params = SamplingParams(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    want = hf_warp(logits.clone(), temperature, top_k, top_p)
    got = warp_logits(logits, params)
    assert got.dtype == torch.float32
    assert torch.equal(torch.isinf(got), torch.isinf(want))  # the same tokens removed
    assert torch.equal(got, want)  # and the same values for the kept ones
    assert torch.equal(warp_probs(logits, params), want.softmax(dim=-1))


def test_warp_keeps_leading_dimensions():
    """``[..., V]`` in, ``[..., V]`` out: a [B, N, V] block warps like its rows one by one."""
    logits = random_logits(3, rows=12).view(2, 6, V)
    params = SamplingParams(do_sample=True, temperature=0.8, top_k=7, top_p=0.85)
    got = warp_probs(logits, params)
    assert got.shape == (2, 6, V)
    for b, n in itertools.product(range(2), range(6)):
        assert torch.equal(got[b, n], hf_warp(logits[b, n][None], 0.8, 7, 0.85).softmax(-1)[0])


def test_tiny_top_p_keeps_only_the_argmax():
    logits = random_logits(5)
    probs = warp_probs(logits, SamplingParams(do_sample=True, top_p=1e-6))
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), V).float())


def test_top_k_ties_keep_every_tied_token():
    logits = torch.tensor([[3.0, 1.0, 3.0, 3.0, 0.0]])
    kept = torch.isfinite(warp_logits(logits, SamplingParams(do_sample=True, top_k=2)))
    assert kept.tolist() == [[True, False, True, True, False]]  # like transformers: ties at the k-th value stay


def test_top_p_golden():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    kept = lambda top_p: torch.isfinite(warp_logits(logits, SamplingParams(do_sample=True, top_p=top_p))).tolist()
    assert kept(0.45) == [True, False, False, False]  # 0.5 alone reaches 0.45
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.85) == [True, True, True, False]  # the smallest set reaching 0.85
    assert kept(0.99) == [True, True, True, True]
    assert warp_probs(logits, SamplingParams(do_sample=True, top_p=0.6)).tolist() == pytest.approx([0.625, 0.375, 0, 0])


def test_float64_logits_warp_in_float32():
    logits = random_logits(7).double()
    params = SamplingParams(do_sample=True, temperature=0.6, top_k=9, top_p=0.9)
    assert torch.equal(warp_logits(logits, params), hf_warp(logits.float(), 0.6, 9, 0.9))


def test_default_params_are_greedy_and_unwarped():
    params = SamplingParams()
    assert (params.do_sample, params.temperature, params.top_k, params.top_p) == (False, 1.0, 0, 1.0)
    logits = random_logits(8)
    assert torch.equal(warp_logits(logits, params), logits)


# ---------------------------------------------------------------- validation: errors name the fix


@pytest.mark.parametrize("temperature", [0.0, -0.5, float("nan")])
def test_bad_temperature(temperature):
    with pytest.raises(SpecdecError, match=r"temperature must be > 0.*do_sample=False"):
        SamplingParams(do_sample=True, temperature=temperature)


@pytest.mark.parametrize("top_p", [0.0, -0.1, 1.5, float("nan")])
def test_bad_top_p(top_p):
    with pytest.raises(SpecdecError, match=r"top_p must be in \(0, 1\] \(1 turns it off\)"):
        SamplingParams(do_sample=True, top_p=top_p)


def test_bad_top_k():
    with pytest.raises(SpecdecError, match=r"top_k must be >= 0 \(0 turns it off\)"):
        SamplingParams(do_sample=True, top_k=-1)


def test_greedy_params_are_not_validated():
    """With do_sample=False the warping is unused, so e.g. temperature=0 (a common way to say greedy) is fine."""
    assert SamplingParams(do_sample=False, temperature=0.0).temperature == 0.0


def test_generate_validates_sampling_arguments():
    decoder = SpecDecoder(get_tiny(0), None, drafter="none")
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(SpecdecError, match="do_sample=False"):
        decoder.generate(ids, max_new_tokens=2, do_sample=True, temperature=0.0)
    with pytest.raises(SpecdecError, match="top_p"):
        decoder.generate(ids, max_new_tokens=2, do_sample=True, top_p=0.0)
    with pytest.raises(SpecdecError, match="top_k"):
        decoder.generate(ids, max_new_tokens=2, do_sample=True, top_k=-3)


# ---------------------------------------------------------------- draws


def test_sample_and_uniform_are_seeded():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    a = [sample(probs, torch.Generator().manual_seed(s)) for s in range(50)]
    b = [sample(probs, torch.Generator().manual_seed(s)) for s in range(50)]
    assert a == b and set(a) <= {0, 1, 2, 3} and len(set(a)) > 1
    u = [uniform(torch.Generator().manual_seed(s)) for s in range(50)]
    assert u == [uniform(torch.Generator().manual_seed(s)) for s in range(50)]
    assert all(0.0 <= x < 1.0 for x in u)
    assert sample(torch.tensor([0.0, 0.0, 1.0, 0.0]), torch.Generator().manual_seed(0)) == 2
