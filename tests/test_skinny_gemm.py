"""The skinny linear kernel (specdec.kernels.skinny_gemm): F.linear's products for a few rows, several weights side by
side, each row's result independent of the others bitwise, and fast_linears' use of it (siblings included) up to
MAX_ROWS rows, oneDNN beyond, F.linear without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from specdec.kernels import cpu_gemm, skinny_gemm
from tests.tiny import tiny_llama

needs_kernel = pytest.mark.skipif(not skinny_gemm.available(), reason=f"no skinny kernel: {skinny_gemm.failure()}")


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 16, 19])
@pytest.mark.parametrize("k", [1, 15, 16, 17, 40])
def test_equals_linear_for_several_weights(rows, k):
    g = torch.Generator().manual_seed(rows * 100 + k)
    x = torch.randn(rows, k, generator=g)
    weights = [torch.randn(n, k, generator=g) for n in (3, 64, 1, 130)]  # one tile never lines up with another
    biases = [torch.randn(3, generator=g), None, torch.randn(1, generator=g), None]
    y = skinny_gemm.skinny_linear(x, weights, biases)
    want = torch.cat([F.linear(x, w, b) for w, b in zip(weights, biases)], dim=-1)
    assert y.shape == (rows, 198) and y.is_contiguous()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_result_does_not_depend_on_the_other_rows(dtype):
    """Bitwise: a tree's node gets the products a one-token step computes, in any block of eight rows."""
    if dtype == torch.bfloat16 and not skinny_gemm.bf16_available():
        pytest.skip("no bfloat16 path here")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(skinny_gemm.MAX_ROWS, 45, generator=g).to(dtype)
    packed = skinny_gemm.pack([torch.randn(70, 45, generator=g).to(dtype)], [torch.randn(70, generator=g).to(dtype)])
    whole = skinny_gemm.panel_linear(x, packed)
    for start, rows in [(0, 1), (3, 1), (9, 1), (2, 5), (5, 11)]:
        assert torch.equal(skinny_gemm.panel_linear(x[start:start + rows].contiguous(), packed),
                           whole[start:start + rows])


@needs_kernel
def test_fast_linears_repacks_a_changed_weight():
    model = tiny_llama(2, dtype=torch.float32)
    ids = torch.tensor([[3, 4, 5]])
    with torch.inference_mode(), cpu_gemm.fast_linears(model):
        before = model(ids).logits
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(2)
        model.model.layers[1].self_attn.k_proj.weight.mul_(2)
    with torch.inference_mode():
        want = model(ids).logits
        with cpu_gemm.fast_linears(model):
            got = model(ids).logits
    assert not torch.allclose(before, want)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_bad_shapes_are_refused():
    with pytest.raises(RuntimeError, match="input's K"):
        skinny_gemm.skinny_linear(torch.randn(1, 8), [torch.randn(4, 7)], [None])
    with pytest.raises(RuntimeError, match="float32"):
        skinny_gemm.skinny_linear(torch.randn(1, 8, dtype=torch.float64), [torch.randn(4, 8)], [None])
    packed = skinny_gemm.pack([torch.randn(40, 8)], [None])
    with pytest.raises(RuntimeError, match="another input size"):
        skinny_gemm.panel_linear(torch.randn(2, 9), packed)
    with pytest.raises(RuntimeError, match="dtype"):
        skinny_gemm.panel_linear(torch.randn(2, 8).bfloat16(), packed)


@needs_kernel
@pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="this torch build has no oneDNN")
@pytest.mark.parametrize("rows", [1, 3, skinny_gemm.MAX_ROWS, skinny_gemm.MAX_ROWS + 1])
def test_fast_linears_takes_it_up_to_max_rows(rows, monkeypatch):
    calls = []
    real = skinny_gemm.panel_linear
    monkeypatch.setattr(skinny_gemm, "panel_linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    model = tiny_llama(2, dtype=torch.float32)
    ids = torch.arange(3, 3 + rows)[None]
    with torch.inference_mode():
        want = model(ids).logits
        with cpu_gemm.fast_linears(model, decoder_layers=False):  # fused layers call the kernel from C++
            got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if rows <= skinny_gemm.MAX_ROWS:
        # per layer: q/k/v as one call, o, gate/up as one call, down; then the LM head
        assert calls == [rows] * (4 * model.config.num_hidden_layers + 1)
    else:
        assert calls == []


@pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="this torch build has no oneDNN")
def test_without_the_kernel_fast_linears_uses_onednn(monkeypatch):
    monkeypatch.setattr(skinny_gemm._KERNEL, "_failed", "no compiler (simulated)")
    assert not skinny_gemm.available()
    assert skinny_gemm.failure() in ("no compiler (simulated)", "this CPU has no AVX-512")
    model = tiny_llama(2, dtype=torch.float32)
    ids = torch.tensor([[3, 4]])
    with torch.inference_mode():
        want = model(ids).logits
        with cpu_gemm.fast_linears(model):
            torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 5, 9])
@pytest.mark.parametrize("k", [7, 32, 33, 96])
def test_bfloat16_is_float32_accumulation_rounded_once(rows, k):
    g = torch.Generator().manual_seed(rows * 10 + k)
    x = torch.randn(rows, k, generator=g).bfloat16()
    weights = [torch.randn(n, k, generator=g).bfloat16() for n in (3, 70)]
    biases = [torch.randn(3, generator=g).bfloat16(), None]
    y = skinny_gemm.skinny_linear(x, weights, biases)
    exact = torch.cat([F.linear(x.double(), w.double(), None if b is None else b.double())
                       for w, b in zip(weights, biases)], dim=-1)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 73)
    # one bfloat16 rounding of a float32 sum: within a bfloat16 unit (2**-8 relative) plus float32 summation error
    assert bool(((y.double() - exact).abs() <= 2 ** -8 * exact.abs() + 1e-5 * k).all())


@pytest.mark.skipif(not skinny_gemm.bf16_available(), reason="no skinny kernel with a bfloat16 path here")
def test_a_bfloat16_model_takes_the_kernel_for_few_rows_only(monkeypatch):
    calls = []
    real = skinny_gemm.panel_linear
    monkeypatch.setattr(skinny_gemm, "panel_linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    model = tiny_llama(2, dtype=torch.bfloat16)
    assert cpu_gemm.wanted(model) and cpu_gemm.kernel(model) == "panels-bf16"
    with torch.inference_mode():
        for rows in (2, skinny_gemm.MAX_ROWS_BF16 + 3):
            ids = torch.arange(3, 3 + rows)[None]
            want = model(ids).logits.float()
            calls.clear()
            with cpu_gemm.fast_linears(model):
                got = model(ids).logits.float()
            taken = rows <= skinny_gemm.MAX_ROWS_BF16
            assert calls == ([rows] * (4 * model.config.num_hidden_layers + 1) if taken else [])
            torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)  # bfloat16 rounding of another sum order


def test_without_avx2_a_bfloat16_model_keeps_f_linear(monkeypatch):
    """A CPU with neither AVX-512 nor AVX2 + FMA would run the kernel's scalar loops, slower than F.linear: the
    kernel is not taken, for bfloat16 or float32."""
    monkeypatch.setattr(skinny_gemm, "cpu_flags", lambda: " fpu sse2 ")
    assert skinny_gemm.isa() is None and not skinny_gemm.available() and not skinny_gemm.bf16_available()
    assert "neither AVX-512 nor AVX2" in skinny_gemm.failure()
    model = tiny_llama(2, dtype=torch.bfloat16)
    assert not cpu_gemm.wanted(model) and cpu_gemm.kernel(model) == "off"
    calls = []
    monkeypatch.setattr(skinny_gemm, "panel_linear", lambda *a: calls.append(a) or None)
    with torch.inference_mode(), cpu_gemm.fast_linears(model):
        model(torch.tensor([[3, 4]]))
    assert calls == []
