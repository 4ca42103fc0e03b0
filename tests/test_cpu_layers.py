"""Whole-layer CPU kernels (specdec.kernels.cpu_layers): each listed class's forward gives its own result up to float32
rounding, only listed classes are replaced, fallbacks for other inputs, and a whole model stays lossless."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from specdec.kernels import cpu_gemm, cpu_layers
from tests.tiny import tiny_llama

needs_kernel = pytest.mark.skipif(not cpu_layers.available(), reason=f"not built: {cpu_layers.failure()}")

# one tiny config per model type whose RMSNorm / MLP classes are listed
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "phi3"]


def tiny(model_type: str) -> torch.nn.Module:
    cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=10, max_position_embeddings=64,
                               num_local_experts=2, num_experts_per_tok=1, pad_token_id=0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@needs_kernel
@pytest.mark.parametrize("model_type", FAMILIES)
def test_listed_layers_match_their_own_forward(model_type):
    model = tiny(model_type)
    norms = [m for m in model.modules() if cpu_layers.is_rms_norm(m)]
    assert norms, f"{model_type}: its RMSNorm class should be listed"
    x = torch.randn(3, 5, model.config.hidden_size)
    with torch.inference_mode():
        for m in norms:
            if m.weight.shape[0] == x.shape[-1]:
                torch.testing.assert_close(cpu_layers.rms_norm(x, m.weight, m.variance_epsilon), m(x),
                                           rtol=1e-6, atol=1e-6)
        ids = torch.tensor([[5, 9, 3, 7, 11, 2]])
        want = model(ids).logits
        with cpu_gemm.fast_linears(model):
            patched = [m for m in model.modules() if isinstance(m.__dict__.get("forward"), (
                cpu_gemm._NormForward, cpu_gemm._MLPForward))]
            got = model(ids).logits
    assert len(patched) >= len(norms)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not any("forward" in m.__dict__ for m in model.modules())  # restored


@needs_kernel
def test_silu_mul_matches_torch():
    g = torch.Generator().manual_seed(0)
    gu = torch.randn(4, 2, 2 * 37, generator=g) * 6
    gate, up = gu.chunk(2, dim=-1)
    torch.testing.assert_close(cpu_layers.silu_mul(gu), torch.nn.functional.silu(gate) * up, rtol=1e-6, atol=1e-6)


def test_unlisted_layers_are_left_alone():
    gemma = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gemma", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16))  # (1 + w) RMSNorm, GELU MLP
    assert not any(cpu_layers.is_rms_norm(m) or cpu_layers.is_gated_silu_mlp(m) for m in gemma.modules())


@needs_kernel
def test_gradients_and_other_dtypes_take_the_model_code():
    model = tiny_llama(1, dtype=torch.float32)
    ids = torch.tensor([[3, 4, 5]])
    with cpu_gemm.fast_linears(model):
        loss = model(ids).logits.sum()  # gradients on: the model's own forwards
    loss.backward()
    assert model.model.norm.weight.grad is not None
    norm = model.model.norm
    x = torch.randn(2, model.config.hidden_size, dtype=torch.float64)
    with torch.inference_mode():
        want = type(norm).forward(norm, x)
        with cpu_gemm.fast_linears(model):
            assert torch.equal(norm(x), want)
