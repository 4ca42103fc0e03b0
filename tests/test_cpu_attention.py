"""The few-row attention kernel (specdec.kernels.cpu_attention): SDPA's result for every mask kind, grouped heads,
strided K/V views of a larger cache, each row independent of the others, and the routes that keep SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from specdec.kernels import cpu_attention
from specdec.models import gqa_attention
from tests.tiny import tiny_llama

needs_kernel = pytest.mark.skipif(not cpu_attention.available(), reason=f"no kernel: {cpu_attention.failure()}")


def _sdpa(q, k, v, mask, scale, causal=False):
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=causal,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2)


def _inputs(b, h, hkv, n, t, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g).to(dtype)
    cache_k = torch.randn(b, hkv, t + 7, d, generator=g).to(dtype)  # a cache with spare room: strided views
    cache_v = torch.randn(b, hkv, t + 7, d, generator=g).to(dtype)
    return q, cache_k[:, :, :t], cache_v[:, :, :t]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind", ["additive", "bool", "none"])
@pytest.mark.parametrize("shape", [(1, 9, 3, 1, 40, 64), (2, 4, 4, 5, 23, 16), (1, 6, 2, 16, 70, 8)])
def test_equals_sdpa(dtype, kind, shape):
    b, h, hkv, n, t, d = shape
    q, k, v = _inputs(b, h, hkv, n, t, d, dtype, seed=sum(shape))
    g = torch.Generator().manual_seed(1)
    allowed = torch.rand(b, 1, n, t, generator=g) < 0.7
    allowed[..., 0] = True  # every row sees a key
    mask = {"additive": torch.zeros(b, 1, n, t, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min),
            "bool": allowed, "none": None}[kind]
    got = cpu_attention.attention(q, k, v, mask, scaling=0.3)
    want = _sdpa(q, k, v, mask, 0.3)
    assert got.shape == (b, n, h, d) and got.is_contiguous()
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@needs_kernel
def test_causal_prefill_and_default_scale():
    q, k, v = _inputs(1, 4, 2, 12, 12, 16, torch.float32, seed=3)
    got = cpu_attention.attention(q, k, v, None, is_causal=True)
    torch.testing.assert_close(got, _sdpa(q, k, v, None, None, causal=True), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_a_rows_result_does_not_depend_on_the_other_rows():
    q, k, v = _inputs(1, 6, 3, 11, 50, 32, torch.float32, seed=4)
    mask = torch.zeros(1, 1, 11, 50)
    mask[..., 45:] = torch.finfo(torch.float32).min
    whole = cpu_attention.attention(q, k, v, mask)
    for i in (0, 4, 10):
        alone = cpu_attention.attention(q[:, :, i:i + 1], k, v, mask[:, :, i:i + 1])
        assert torch.equal(alone[:, 0], whole[:, i])


@needs_kernel
@pytest.mark.parametrize("visible", [64, 67, 61])
def test_masked_keys_do_not_change_a_row(visible):
    # a tree row sees the prefix plus masked siblings; it must equal the one-token step over the visible keys alone,
    # bitwise (the softmax's exp once took another route for the last keys, so the count of keys mattered)
    g = torch.Generator().manual_seed(visible)
    q, k, v = torch.randn(1, 6, 1, 16, generator=g), torch.randn(1, 2, 96, 16, generator=g), torch.randn(1, 2, 96, 16,
                                                                                                          generator=g)
    alone = cpu_attention.attention(q, k[:, :, :visible].contiguous(), v[:, :, :visible].contiguous(), None, 0.25)
    for extra in (1, 5, 8, 13):
        mask = torch.zeros(1, 1, 1, visible + extra)
        mask[..., visible:] = torch.finfo(torch.float32).min
        got = cpu_attention.attention(q, k[:, :, :visible + extra].contiguous(), v[:, :, :visible + extra].contiguous(),
                                      mask, 0.25)
        assert torch.equal(got, alone), extra


@needs_kernel
def test_routes(monkeypatch):
    """Few rows take the kernel; a long prefill, dropout, gradients, a position bias or softcapping keep SDPA; a
    prefill without a mask is causal."""
    calls = []
    real = cpu_attention.attention
    monkeypatch.setattr(cpu_attention, "attention", lambda *a, **k: calls.append(a[0].shape[2]) or real(*a, **k))
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    q, k, v = _inputs(1, 4, 2, 2, 2, 16, torch.float32, seed=5)
    with torch.inference_mode():
        out, _ = gqa_attention.gqa_sdpa_attention(module, q, k, v, None, scaling=0.25)
    torch.testing.assert_close(out, _sdpa(q, k, v, None, 0.25, causal=True), rtol=1e-5, atol=1e-5)
    assert calls == [2]
    long_q, long_k, long_v = _inputs(1, 4, 2, cpu_attention.MAX_QUERIES + 1, 40, 16, torch.float32, seed=6)
    mask = torch.zeros(1, 1, cpu_attention.MAX_QUERIES + 1, 40)
    with torch.inference_mode():
        gqa_attention.gqa_sdpa_attention(module, long_q, long_k, long_v, mask)
        gqa_attention.gqa_sdpa_attention(module, q, k, v, None, dropout=0.1)
        gqa_attention.gqa_sdpa_attention(module, q, k, v, torch.zeros(1, 1, 2, 2), position_bias=torch.zeros(1))
    gqa_attention.gqa_sdpa_attention(module, q, k, v, torch.zeros(1, 1, 2, 2))  # gradients on
    assert calls == [2]


@needs_kernel
def test_a_decode_step_takes_it_and_matches_sdpa(monkeypatch):
    model = tiny_llama(2, dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.inference_mode():
        past = model(ids[:, :4], use_cache=True).past_key_values
        want = model(ids[:, 4:], past_key_values=past, use_cache=True).logits
        past = model(ids[:, :4], use_cache=True).past_key_values
        calls = []
        real = cpu_attention.attention
        monkeypatch.setattr(cpu_attention, "attention", lambda *a, **k: calls.append(a[0].shape[2]) or real(*a, **k))
        with gqa_attention.gqa_attention_on(model):
            got = model(ids[:, 4:], past_key_values=past, use_cache=True).logits
    assert calls == [1] * model.config.num_hidden_layers
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_without_the_kernel_sdpa_serves(monkeypatch):
    monkeypatch.setattr(cpu_attention._KERNEL, "_failed", "no compiler (simulated)")
    model = tiny_llama(2, dtype=torch.float32)
    assert gqa_attention.route(model) == "gqa_sdpa"
    ids = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        want = model(ids).logits
        with gqa_attention.gqa_attention_on(model):
            torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
