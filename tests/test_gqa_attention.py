"""The GQA attention route: same result as transformers' sdpa (repeat_kv) path, switched on only inside the block."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from specdec.algorithms import tree as tree_ops
from specdec.models import gqa_attention, hf_cache
from specdec.models.gqa_attention import ATTENTION_NAME, gqa_attention_on, gqa_sdpa_attention
from specdec.models.hf_forward import forward_tokens
from tests.tiny import tiny_llama


class Attn(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


@pytest.mark.parametrize("groups, n, t", [(3, 8, 40), (2, 1, 17), (1, 5, 5), (4, 3, 3)])
def test_equals_transformers_sdpa_with_a_tree_mask(groups, n, t):
    g = torch.Generator().manual_seed(groups * 100 + n)
    kv = 2
    q = torch.randn(1, kv * groups, n, 16, generator=g)
    k, v = torch.randn(2, 1, kv, t, 16, generator=g)
    visible = torch.rand(n, t, generator=g) < 0.7
    visible[:, 0] = True  # every query sees something
    mask = torch.zeros(1, 1, n, t).masked_fill(~visible, torch.finfo(torch.float32).min)
    module = Attn(groups)
    ours, _ = gqa_sdpa_attention(module, q, k, v, mask, scaling=0.25)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    assert ours.shape == (1, n, kv * groups, 16) and ours.is_contiguous()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    causal, _ = gqa_sdpa_attention(module, q[:, :, :t], k, v, None, scaling=0.25)  # no mask: transformers' path
    torch.testing.assert_close(causal, sdpa_attention_forward(module, q[:, :, :t], k, v, None, scaling=0.25)[0])


def test_switched_only_inside_and_only_for_sdpa_models():
    model = tiny_llama(0, dtype=torch.float32)
    assert model.config._attn_implementation == "sdpa"
    with gqa_attention_on(model, torch.nn.Linear(2, 2)):  # a module without a config is left alone
        assert model.config._attn_implementation == ATTENTION_NAME
        with gqa_attention_on(model):  # nested: still on, and the outer block restores
            assert model.config._attn_implementation == ATTENTION_NAME
        assert model.config._attn_implementation == ATTENTION_NAME
    assert model.config._attn_implementation == "sdpa"
    eager = tiny_llama(0, dtype=torch.float32)
    eager.config._attn_implementation = "eager"
    with gqa_attention_on(eager):
        assert eager.config._attn_implementation == "eager"
    assert gqa_attention.route(model).startswith("gqa_sdpa") and gqa_attention.route(eager) == "eager"


def test_tree_forward_equals_plain_sdpa_forward(monkeypatch):
    """A verify forward (tree mask, cached prefix) runs our route and gives the logits transformers' own sdpa path
    gives."""
    from transformers import AttentionInterface
    calls = []
    monkeypatch.setitem(AttentionInterface._global_mapping, ATTENTION_NAME,
                        lambda *a, **k: calls.append(1) or gqa_sdpa_attention(*a, **k))
    model = tiny_llama(3, dtype=torch.float32)
    prompt = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    tree = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(1))
    parents = torch.tensor([[-1, 0, 0, 1, 2, 2]])
    ours_cache = hf_cache.new_cache()
    forward_tokens(model, ours_cache, prompt)
    ours = forward_tokens(model, ours_cache, tree, parents).logits
    assert len(calls) == 2 * model.config.num_hidden_layers  # the prefill and the tree, every layer
    ref_cache = DynamicCache()
    with torch.inference_mode():
        model(input_ids=prompt, use_cache=True, **hf_cache.cache_kwargs(model, ref_cache))
        ref = model(input_ids=tree, attention_mask=tree_ops.verify_mask(parents, 12, model.dtype),
                    position_ids=tree_ops.position_ids(parents, 12), use_cache=True,
                    **hf_cache.cache_kwargs(model, ref_cache)).logits
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"
