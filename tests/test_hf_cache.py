"""The cache helper and the reference verifier: after commit, the cache equals plain decoding's cache."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from specdec.algorithms import tree as T
from specdec.errors import SpecdecError
from specdec.models import hf_cache
from specdec.types import Acceptance, DraftTree
from tests.conftest import get_tiny
from tests.tiny import VOCAB
from verifiers.hf import HFVerifier

# ---------------------------------------------------------------- keep_positions / crop on a synthetic cache


def synthetic_cache(length: int, layers: int = 2) -> DynamicCache:
    """A cache whose key at position t of layer l is the constant 100 * l + t (values: the negatives)."""
    cache = DynamicCache()
    for layer in range(layers):
        k = (100.0 * layer + torch.arange(length, dtype=torch.float64)).reshape(1, 1, length, 1).expand(1, 2, length, 3)
        cache.update(k.clone(), -k.clone(), layer)
    return cache


def positions(cache: DynamicCache, layer: int = 0) -> list[int]:
    keys = cache.layers[layer].keys
    return [int(x) - 100 * layer for x in keys[0, 0, :, 0].tolist()]


def test_cache_length_and_crop():
    cache = synthetic_cache(10)
    assert hf_cache.cache_length(cache) == 10
    hf_cache.crop(cache, 12)  # longer than held: nothing happens
    assert hf_cache.cache_length(cache) == 10
    hf_cache.crop(cache, 6)
    assert hf_cache.cache_length(cache) == 6 and positions(cache) == [0, 1, 2, 3, 4, 5]
    assert hf_cache.cache_length(hf_cache.new_cache()) == 0


@pytest.mark.parametrize("keep, expected_tail", [
    ([0], [4]),
    ([0, 1, 2], [4, 5, 6]),  # contiguous: a plain crop
    ([0, 2, 5], [4, 6, 9]),
    ([0, 1, 3], [4, 5, 7]),
    ([0, 5], [4, 9]),
])
def test_keep_positions(keep, expected_tail):
    cache = synthetic_cache(10)  # 4 cached prefix positions + a 6-node tree
    hf_cache.keep_positions(cache, 4, keep)
    assert hf_cache.cache_length(cache) == 4 + len(keep)
    for layer in range(2):
        assert positions(cache, layer) == [0, 1, 2, 3] + expected_tail
        assert torch.equal(cache.layers[layer].values, -cache.layers[layer].keys)
        assert cache.layers[layer].keys.shape == (1, 2, 4 + len(keep), 3)


def test_keep_positions_then_grow():
    cache = synthetic_cache(10)
    hf_cache.keep_positions(cache, 4, [0, 3])
    k = torch.full((1, 2, 2, 3), 77.0, dtype=torch.float64)
    for layer in range(2):
        cache.update(k, -k, layer)
    assert hf_cache.cache_length(cache) == 8
    assert positions(cache) == [0, 1, 2, 3, 4, 7, 77, 77]


def test_new_cache_appends_in_place_and_grows_by_doubling():
    cache = hf_cache.new_cache()
    assert isinstance(cache, DynamicCache)
    k = torch.zeros(1, 2, 100, 3)
    cache.update(k, -k, 0)
    layer = cache.layers[0]
    assert isinstance(layer, hf_cache.GrowingLayer) and layer._buffers[0].shape[-2] == hf_cache.MIN_CAPACITY
    base = layer.keys.data_ptr()
    cache.update(torch.ones(1, 2, 50, 3), -torch.ones(1, 2, 50, 3), 0)  # fits the first buffer: in place
    assert layer.keys.data_ptr() == base and layer.keys.shape == (1, 2, 150, 3)
    hf_cache.crop(cache, 140)  # a shorter view; the next update overwrites the dropped slots
    cache.update(torch.full((1, 2, 10, 3), 5.0), torch.full((1, 2, 10, 3), -5.0), 0)
    assert layer.keys.data_ptr() == base and hf_cache.cache_length(cache) == 150
    assert layer.keys[0, 0, :, 0].tolist() == [0.0] * 100 + [1.0] * 40 + [5.0] * 10
    cache.update(torch.full((1, 2, 130, 3), 7.0), torch.full((1, 2, 130, 3), -7.0), 0)  # 280 > 256: doubled
    assert layer.keys.data_ptr() != base and layer._buffers[0].shape[-2] == 560
    assert layer.keys[0, 0, :, 0].tolist() == [0.0] * 100 + [1.0] * 40 + [5.0] * 10 + [7.0] * 130
    assert torch.equal(layer.values, -layer.keys)


def test_growing_layer_adopts_replaced_tensors():
    """transformers' batch helpers replace keys/values with new tensors: the next update copies them into a new
    buffer instead of writing into the stale one."""
    cache = hf_cache.new_cache()
    k = torch.arange(2 * 4.0).reshape(2, 1, 4, 1)
    cache.update(k, -k, 0)
    cache.batch_select_indices(torch.tensor([1]))
    cache.update(torch.full((1, 1, 1, 1), 9.0), torch.full((1, 1, 1, 1), -9.0), 0)
    assert cache.layers[0].keys[0, 0, :, 0].tolist() == [4.0, 5.0, 6.0, 7.0, 9.0]
    assert torch.equal(cache.layers[0].values, -cache.layers[0].keys)


def test_keep_positions_in_place_outside_inference_mode():
    """A verify forward fills the buffers under inference mode; commit runs outside it."""
    cache = hf_cache.new_cache()
    with torch.inference_mode():
        k = torch.arange(10.0).reshape(1, 1, 10, 1)
        cache.update(k, -k, 0)
    base = cache.layers[0].keys.data_ptr()
    hf_cache.keep_positions(cache, 4, [0, 2, 5])
    assert cache.layers[0].keys[0, 0, :, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 9.0]
    assert cache.layers[0].keys.data_ptr() == base


# ---------------------------------------------------------------- HFVerifier vs plain decoding


@torch.inference_mode()
def plain_cache(model, ids: list[int]) -> DynamicCache:
    cache = DynamicCache()
    model(input_ids=torch.tensor([ids]), use_cache=True, **hf_cache.cache_kwargs(model, cache))
    return cache


def test_cache_kwargs_follow_the_forward_signature():
    """transformers renamed ``past_key_values`` to ``cache``; the keyword is read off each forward's signature."""

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, **kwargs): ...

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None, **kwargs): ...

    class Opaque(torch.nn.Module):  # a wrapper that takes anything: the name every 5.x release accepts
        def forward(self, *args, **kwargs): ...

    assert hf_cache.cache_kwargs(Old(), "c") == {"past_key_values": "c"}
    assert hf_cache.cache_kwargs(New(), "c") == {"cache": "c"}
    assert hf_cache.cache_kwargs(Opaque(), "c") == {"past_key_values": "c"}

    class Callable:  # not a module at all: its __call__ is what runs
        def __call__(self, cache=None, **kwargs): ...

    assert hf_cache.cache_kwargs(Callable(), "c") == {"cache": "c"}


def test_verify_forward_raises_no_cache_deprecation(recwarn):
    from specdec.models import hf_forward

    model = get_tiny()
    cache = DynamicCache()
    hf_forward.forward_tokens(model, cache, torch.tensor([[1, 2, 3]]))
    hf_forward.forward_tokens(model, cache, torch.tensor([[4, 5, 6]]), parents=torch.tensor([[-1, 0, 0]]))
    assert hf_cache.cache_length(cache) == 6
    assert not [w for w in recwarn if "past_key_values" in str(w.message)]


def assert_caches_equal(got: DynamicCache, ref: DynamicCache, tol: float) -> None:
    assert len(got.layers) == len(ref.layers)
    for i, (a, b) in enumerate(zip(got.layers, ref.layers)):
        assert a.keys.shape == b.keys.shape, f"layer {i} keys"
        torch.testing.assert_close(a.keys, b.keys, atol=tol, rtol=tol, msg=f"layer {i} keys")
        torch.testing.assert_close(a.values, b.values, atol=tol, rtol=tol, msg=f"layer {i} values")


# each step: (tree parents, accepted path). Trees have 6 nodes; tokens are random.
STEPS = [
    ([-1, 0, 0, 1, 2, 4], [0, 2, 4, 5]),  # non-contiguous: second branch
    ([-1, 0, 1, 2, 3, 4], [0, 1, 2]),  # contiguous chain prefix (a crop)
    ([-1, 0, 0, 0, 3, -2], [0, 3, 4]),  # with a dead node
    ([-1, 0, 0, 1, 1, 2], [0]),  # nothing accepted
    ([-1, 0, 0, 2, 1, 3], [0, 2, 3, 5]),
    ([-1, 0, 1, 0, 3, 4], [0, 3, 4, 5]),
]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("prompt_len", [1, 6])
def test_cache_after_commit_equals_plain_decoding(dtype, tol, prompt_len):
    model = get_tiny(2, dtype)
    g = torch.Generator().manual_seed(prompt_len)
    prompt = torch.randint(3, VOCAB, (1, prompt_len), generator=g)
    verifier = HFVerifier(model)
    verifier.start(0, prompt[:, :-1])
    assert verifier.cached_length(0) == prompt_len - 1
    committed = prompt[0].tolist()  # the last one is the next tree's root, not yet cached
    for parents, path in STEPS:
        tokens = [committed[-1]] + torch.randint(3, VOCAB, (5,), generator=g).tolist()
        tree = DraftTree(torch.tensor([tokens]), torch.tensor([parents]))
        out = verifier.score([0], [tree])
        # the scored logits along the accepted path are what plain decoding would compute there
        with torch.inference_mode():
            plain = model(input_ids=torch.tensor([committed + [tokens[i] for i in path[1:]]])).logits[0]
        torch.testing.assert_close(out.logits[0, path], plain[len(committed) - 1:], atol=tol, rtol=tol)
        bonus = int(torch.randint(3, VOCAB, (1,), generator=g))
        acc = Acceptance(path=torch.tensor([path]), num_accepted=torch.tensor([len(path) - 1]),
                         next_token=torch.tensor([bonus]))
        verifier.commit(0, acc.accepted_nodes(0))
        committed += [tokens[i] for i in path[1:]] + [bonus]
        assert verifier.cached_length(0) == len(committed) - 1
        assert_caches_equal(verifier.cache, plain_cache(model, committed[:-1]), tol)


def test_commit_without_score_fails():
    verifier = HFVerifier(get_tiny(0))
    verifier.start(0, torch.tensor([[4, 5]]))
    with pytest.raises(SpecdecError, match="without a score"):
        verifier.commit(0, [0])
    verifier.score([0], [T.chain(6, [])])
    with pytest.raises(SpecdecError, match="without a score"):
        verifier.commit(1, [0])  # another request than the one scored


def test_start_rejects_batches_and_a_second_live_request():
    verifier = HFVerifier(get_tiny(0))
    with pytest.raises(SpecdecError, match="one request at a time"):
        verifier.start(0, torch.tensor([[4, 5], [6, 7]]))
    verifier.start(0, torch.tensor([[4, 5, 6]]))
    assert verifier.cached_length(0) == 3 and verifier.cached_length(1) == 0
    with pytest.raises(SpecdecError, match="one request at a time.*release it"):
        verifier.start(1, torch.tensor([[4, 5, 6]]))
    with pytest.raises(SpecdecError, match="one live request"):
        verifier.score([1], [T.chain(6, [])])
    verifier.release(0)
    assert verifier.cached_length(0) == 0
    verifier.start(1, torch.zeros(1, 0, dtype=torch.long))  # a one-token prompt has nothing to prefill
    assert verifier.cached_length(1) == 0
    assert verifier.num_blocks == verifier.num_free_blocks == verifier.blocks_for(10_000) == 0  # no block pool


@pytest.mark.parametrize("seed", [0, 3])
def test_cache_after_real_decode_equals_plain_decoding(seed):
    """Through the decode driver (ngram trees, greedy rule): after every step the cache is plain decoding's, and
    the request's cache is released when it ends."""
    from drafters.ngram import NGramDrafter
    from specdec.algorithms.acceptance import greedy
    from specdec.serving.engine import decode
    from tests.tiny import random_prompt

    model = get_tiny(seed)
    prompt = random_prompt(seed, 12)
    verifier = HFVerifier(model)
    committed = prompt[0].tolist()
    non_contiguous = 0
    for step in decode(verifier, NGramDrafter(min_ngram=1), greedy, prompt, max_new_tokens=40, max_nodes=12):
        committed += step.new_tokens
        path = step.acceptance.accepted_nodes(0)
        non_contiguous += path != list(range(len(path)))
        if len(committed) - prompt.shape[1] < 40:  # the request goes on (at 40 it ends and is released)
            assert verifier.cached_length(0) == len(committed) - 1
            assert_caches_equal(verifier.cache, plain_cache(model, committed[:-1]), 1e-9)
    assert verifier.cached_length(0) == 0 and verifier.request_id is None
    assert non_contiguous >= 1  # the gather path of keep_positions was exercised
