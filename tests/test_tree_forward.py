"""Tree forward == per-path causal forward: the logits at every node equal a plain forward of prefix + path."""

from __future__ import annotations

import pytest
import torch

from specdec.algorithms import tree as T
from specdec.models import hf_cache
from specdec.models.hf_forward import forward_tokens
from specdec.types import DEAD
from tests.conftest import get_tiny
from tests.tiny import VOCAB, tiny_llama

TOL = {torch.float64: 1e-9, torch.float32: 1e-5}
# eager attention computes its softmax in float32 whatever the model dtype, and rows of different lengths (tree vs
# causal run) round differently there; so float64 only holds to float32-softmax precision under eager
EAGER_TOL = {torch.float64: 1e-6, torch.float32: 1e-5}

_ATTN_MODELS: dict = {}


def model_for(dtype: torch.dtype, attn: str, seed: int = 0):
    if attn == "sdpa":
        return get_tiny(seed, dtype)
    key = (seed, dtype, attn)
    if key not in _ATTN_MODELS:
        m = tiny_llama(seed, dtype=dtype)
        m.set_attn_implementation(attn)
        _ATTN_MODELS[key] = m
    return _ATTN_MODELS[key]


def random_parents(g: torch.Generator, n: int, dead_frac: float = 0.2) -> list[int]:
    """A random valid parent row of n nodes; some subtrees dead."""
    row = [-1]
    for i in range(1, n):
        p = int(torch.randint(0, i, (1,), generator=g))
        dead = row[p] == DEAD or float(torch.rand(1, generator=g)) < dead_frac
        row.append(DEAD if dead else p)
    return row


@torch.inference_mode()
def causal_logits(model, ids: list[int]) -> torch.Tensor:
    """``[T, V]`` logits of a plain causal forward over ``ids`` (no cache, no mask)."""
    return model(input_ids=torch.tensor([ids])).logits[0]


def prefill(model, ids: torch.Tensor):
    cache = hf_cache.new_cache()
    if ids.shape[1]:
        forward_tokens(model, cache, ids, logits_to_keep=1)
    return cache


def check_against_paths(model, prefixes: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor,
                        logits: torch.Tensor, tol: float) -> int:
    """Compare every live node's logits with the causal run of its root-to-leaf path; returns nodes checked."""
    checked = 0
    for b, row in enumerate(parents.tolist()):
        for path in T.root_to_leaf_paths(parents[b:b + 1])[0]:
            ref = causal_logits(model, prefixes[b].tolist() + tokens[b, path].tolist())
            ref_nodes = ref[prefixes.shape[1]:]  # the path's positions
            got = logits[b, path]
            torch.testing.assert_close(got, ref_nodes, atol=tol, rtol=tol)
            checked += len(path)
    return checked


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("seed", range(4))
def test_tree_logits_equal_per_path_forward(dtype, attn, seed):
    model = model_for(dtype, attn)
    g = torch.Generator().manual_seed(seed)
    prefix_len = [7, 1, 0, 13][seed]
    n = [6, 9, 12, 16][seed]
    prefix = torch.randint(3, VOCAB, (1, prefix_len), generator=g)
    tokens = torch.randint(3, VOCAB, (1, n), generator=g)
    parents = torch.tensor([random_parents(g, n)])
    cache = prefill(model, prefix)
    out = forward_tokens(model, cache, tokens, parents, output_hidden=True)
    assert out.logits.shape == (1, n, VOCAB) and out.logits.dtype == dtype
    assert out.hidden.shape == (1, n, model.config.hidden_size)
    assert hf_cache.cache_length(cache) == prefix_len + n
    tol = (TOL if attn == "sdpa" else EAGER_TOL)[dtype]
    assert check_against_paths(model, prefix, tokens, parents, out.logits, tol) >= 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tree_logits_batch_of_two(dtype):
    model = model_for(dtype, "sdpa", seed=1)
    g = torch.Generator().manual_seed(42)
    prefix = torch.randint(3, VOCAB, (2, 5), generator=g)
    tokens = torch.randint(3, VOCAB, (2, 8), generator=g)
    parents = torch.tensor([random_parents(g, 8, 0.0), random_parents(g, 8, 0.3)])
    cache = prefill(model, prefix)
    out = forward_tokens(model, cache, tokens, parents)
    check_against_paths(model, prefix, tokens, parents, out.logits, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tree_hidden_states_equal_per_path_forward(dtype):
    model = model_for(dtype, "sdpa")
    prefix = torch.tensor([[5, 6, 7, 8]])
    tokens = torch.tensor([[8, 10, 11, 12, 13]])
    parents = torch.tensor([[-1, 0, 0, 2, 1]])
    out = forward_tokens(model, prefill(model, prefix), tokens, parents, output_hidden=True)
    for path in T.root_to_leaf_paths(parents)[0]:
        ids = torch.tensor([prefix[0].tolist() + tokens[0, path].tolist()])
        with torch.inference_mode():
            ref = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, prefix.shape[1]:]
        torch.testing.assert_close(out.hidden[0, path], ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("prefix_len", [0, 1, 9])
def test_chain_fast_path(dtype, prefix_len):
    """A chain skips the custom mask (mask=None) and must still match the plain forward."""
    model = model_for(dtype, "sdpa")
    g = torch.Generator().manual_seed(prefix_len)
    prefix = torch.randint(3, VOCAB, (1, prefix_len), generator=g)
    root = int(torch.randint(3, VOCAB, (1,), generator=g))
    chain = T.chain(root, torch.randint(3, VOCAB, (5,), generator=g).tolist())
    assert T.is_chain(chain.parents)
    out = forward_tokens(model, prefill(model, prefix), chain.tokens, chain.parents)
    ref = causal_logits(model, prefix[0].tolist() + chain.tokens[0].tolist())[prefix_len:]
    torch.testing.assert_close(out.logits[0], ref, atol=TOL[dtype], rtol=TOL[dtype])
    # parents=None means a chain too
    out2 = forward_tokens(model, prefill(model, prefix), chain.tokens, None)
    torch.testing.assert_close(out2.logits, out.logits, atol=0, rtol=0)


def test_logits_to_keep():
    model = model_for(torch.float64, "sdpa")
    ids = torch.tensor([[4, 5, 6, 7]])
    out = forward_tokens(model, hf_cache.new_cache(), ids, logits_to_keep=1)
    assert out.logits.shape == (1, 1, VOCAB)
    torch.testing.assert_close(out.logits[0, 0], causal_logits(model, ids[0].tolist())[-1], atol=1e-9, rtol=1e-9)


class Spy:
    """Wraps a model and records the keyword arguments of each call."""

    def __init__(self, model):
        self.model, self.dtype, self.config, self.calls = model, model.dtype, model.config, []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.model(**kwargs)


def test_chain_uses_the_models_causal_mask_and_trees_an_additive_one():
    spy = Spy(model_for(torch.float64, "sdpa"))
    cache = prefill(spy.model, torch.tensor([[4, 5, 6]]))
    forward_tokens(spy, cache, torch.tensor([[6, 7, 8]]), torch.tensor([[-1, 0, 1]]))
    call = spy.calls[-1]
    assert call["attention_mask"] is None
    assert call["position_ids"].tolist() == [[3, 4, 5]]
    forward_tokens(spy, cache, torch.tensor([[8, 9, 10]]), torch.tensor([[-1, 0, 0]]))
    call = spy.calls[-1]
    mask = call["attention_mask"]
    assert mask.dtype == torch.float64 and mask.shape == (1, 1, 3, 6 + 3)
    assert call["position_ids"].tolist() == [[6, 7, 7]]
