"""The fused Llama-style decoder layer (specdec.kernels.cpu_decoder_layer): each listed class gives its own forward's
result up to float32 rounding (sliding windows and q/k/v biases included), its rotary embedding is bitwise
transformers', only listed classes are fused, other inputs take the layer's own forward, and decoding stays lossless."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from specdec.kernels import cpu_decoder_layer, cpu_gemm, skinny_gemm
from specdec.kernels.cpu_decoder_layer import DecoderLayerForward
from specdec.models import hf_cache

needs_kernel = pytest.mark.skipif(not cpu_decoder_layer.available(), reason=f"not built: {cpu_decoder_layer.failure()}")

FUSED = ["llama", "mistral", "qwen2"]  # their decoder layer classes are listed
NOT_FUSED = ["qwen3", "phi3", "gemma"]  # q/k norms, a packed gate_up, Gemma's (1 + w) norm


def tiny(model_type: str, **extra) -> torch.nn.Module:
    cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=40, intermediate_size=56, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=10, max_position_embeddings=128,
                               pad_token_id=0, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # biases (Qwen2's q/k/v) away from their zero init, so they are tested
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.5)
    return model


def fused_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m.__dict__.get("forward"), DecoderLayerForward)]


@needs_kernel
@pytest.mark.parametrize("model_type,extra", [("llama", {}), ("mistral", {"sliding_window": 4}),
                                              ("qwen2", {"use_sliding_window": True, "sliding_window": 4,
                                                         "max_window_layers": 1})])
def test_listed_layers_match_their_own_forward(model_type, extra):
    model = tiny(model_type, **extra)
    prompt = torch.tensor([[5, 9, 3, 7, 11, 2, 8, 4, 6, 13]])
    steps = [torch.tensor([[17]]), torch.tensor([[21, 3, 30, 9]])]  # a decode step and a 4-token chain
    with torch.inference_mode():
        want, cache = [], hf_cache.new_cache()
        for ids in [prompt, *steps]:
            want.append(model(ids, **hf_cache.cache_kwargs(model, cache), use_cache=True).logits)
        with cpu_gemm.fast_linears(model):
            assert len(fused_layers(model)) == model.config.num_hidden_layers
            got, cache = [], hf_cache.new_cache()
            for ids in [prompt, *steps]:
                got.append(model(ids, **hf_cache.cache_kwargs(model, cache), use_cache=True).logits)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert not any("forward" in m.__dict__ for m in model.modules())  # restored


@needs_kernel
def test_the_fused_route_serves_steps_and_falls_back_for_prefills(monkeypatch):
    model = tiny("llama")
    served = []
    real = cpu_decoder_layer.pre_attention
    monkeypatch.setattr(cpu_decoder_layer, "pre_attention", lambda h, *a: served.append(h.shape[0]) or real(h, *a))
    with torch.inference_mode(), cpu_gemm.fast_linears(model):
        cache = hf_cache.new_cache()
        rows = skinny_gemm.MAX_ROWS + 4  # a prefill over the kernel's rows
        model((torch.arange(rows) % 50 + 1)[None], **hf_cache.cache_kwargs(model, cache), use_cache=True)
        assert served == []
        model(torch.tensor([[3]]), **hf_cache.cache_kwargs(model, cache), use_cache=True)
    assert served == [1] * model.config.num_hidden_layers


@needs_kernel
def test_rotary_embedding_is_bitwise_transformers():
    model = tiny("llama")
    layer = model.model.layers[0]
    g = torch.Generator().manual_seed(1)
    h = torch.randn(1, 6, 40, generator=g)
    pos = torch.tensor([[3, 4, 5, 9, 10, 40]])
    cos, sin = model.model.rotary_emb(h, pos)
    attn = layer.self_attn
    with torch.inference_mode():
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(1, 6, 4, 10).transpose(1, 2)
        k = attn.k_proj(x).view(1, 6, 2, 10).transpose(1, 2)
        want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
        with cpu_gemm.fast_linears(model):
            fwd = layer.__dict__["forward"]
            qkv_p = fwd.panels()[0]
            got = cpu_decoder_layer.pre_attention(h[0].contiguous(), layer.input_layernorm, qkv_p, cos[0].contiguous(),
                                                  sin[0].contiguous(), 6, 10).view(6, 8, 10)
    # the projections differ from torch's by summation order: compare the rotation on the kernel's own q and k
    with torch.inference_mode(), cpu_gemm.fast_linears(model):
        unrot = cpu_decoder_layer.pre_attention(h[0].contiguous(), layer.input_layernorm, qkv_p,
                                                torch.ones(6, 10), torch.zeros(6, 10), 6, 10).view(6, 8, 10)
    rq, rk = apply_rotary_pos_emb(unrot[None, :, :4].transpose(1, 2), unrot[None, :, 4:6].transpose(1, 2), cos, sin)
    assert torch.equal(got[:, :4], rq[0].transpose(0, 1)) and torch.equal(got[:, 4:6], rk[0].transpose(0, 1))
    assert torch.equal(got[:, 6:], unrot[:, 6:])  # v is not rotated
    torch.testing.assert_close(got[:, :4], want_q[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:, 4:6], want_k[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_rotary_embedding_rows_are_independent_across_the_thread_pool():
    # 24 rows x 6 rotated heads is past the kernel's work grain (64), so the rotation runs in ATen's thread pool;
    # each row must still come out bitwise as alone (a contracted multiply-add there once broke this)
    model = tiny("llama")
    layer = model.model.layers[0]
    g = torch.Generator().manual_seed(2)
    h = torch.randn(1, 24, 40, generator=g)
    cos, sin = model.model.rotary_emb(h, torch.arange(24)[None] * 3 + 5)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the suite runs on one thread: the pool must have a second
    with torch.inference_mode(), cpu_gemm.fast_linears(model):
        qkv_p = layer.__dict__["forward"].panels()[0]
        run = lambda rows: cpu_decoder_layer.pre_attention(  # noqa: E731
            h[0, rows].contiguous(), layer.input_layernorm, qkv_p, cos[0, rows].contiguous(),
            sin[0, rows].contiguous(), 6, 10)
        try:
            together = run(slice(0, 24))
            alone = torch.cat([run(slice(i, i + 1)) for i in range(24)])
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(together, alone)


@needs_kernel
@pytest.mark.parametrize("model_type", NOT_FUSED)
def test_unlisted_layers_keep_their_forward(model_type):
    model = tiny(model_type)
    with cpu_gemm.fast_linears(model):
        assert fused_layers(model) == []


@needs_kernel
def test_off_switch_and_bfloat16_keep_the_layers_own_forward():
    model = tiny("llama")
    with cpu_gemm.fast_linears(model, decoder_layers=False):
        assert fused_layers(model) == []
    with cpu_gemm.fast_linears(model.to(torch.bfloat16)):
        assert fused_layers(model) == []


@needs_kernel
def test_eager_attention_takes_the_layers_own_forward():
    model = tiny("llama")
    model.config._attn_implementation = "eager"
    ids = torch.tensor([[5, 9, 3]])
    with torch.inference_mode():
        want = model(ids).logits
        with cpu_gemm.fast_linears(model):
            assert fused_layers(model)
            got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("verifier", ["hf", "paged"])
def test_greedy_decoding_stays_lossless(verifier, monkeypatch):
    import specdec
    from tests.equality import assert_greedy_equal, greedy_ref
    from verifiers.paged import layer_kernel

    served = []
    real = cpu_decoder_layer.post_attention
    monkeypatch.setattr(cpu_decoder_layer, "post_attention", lambda h, *a: served.append("two calls") or real(h, *a))
    for name in ("run_layer", "run_layers"):  # a layer in one call, or every layer in one call
        whole = getattr(layer_kernel.PagedWholeLayer, name)
        monkeypatch.setattr(layer_kernel.PagedWholeLayer, name,
                            lambda self, *a, whole=whole: served.append("one call") or whole(self, *a))
    model = tiny("llama")
    prompt = torch.tensor([[5, 9, 3, 7, 11, 2, 8, 4, 5, 9, 3, 7]])
    with torch.inference_mode():
        want = greedy_ref(model, prompt, 24, pad_token_id=0)
    out = specdec.generate(model, prompt, drafter="ngram", verifier=verifier, max_new_tokens=24, fast_linears=True)
    assert_greedy_equal(out, want)
    # the paged verifier on its C++ kernel runs each layer whole; the HF verifier calls around SDPA
    assert set(served) == {"one call" if verifier == "paged" and layer_kernel.available() else "two calls"}


@needs_kernel
@pytest.mark.parametrize("model_type,extra", [("llama", {}), ("mistral", {"sliding_window": 4}),
                                              ("qwen2", {"use_sliding_window": True, "sliding_window": 4,
                                                         "max_window_layers": 1}),
                                              ("llama-int8", {}), ("llama-bf16", {})])
def test_paged_forward_without_the_model_loop_is_the_model_forward_bitwise(model_type, extra, monkeypatch):
    """verifiers.paged.whole_forward runs the fused layers of a paged forward without transformers' model loop: the
    logits, greedy tokens and hidden states are bitwise those of the model's own forward, for a batch of trees."""
    import specdec
    from specdec.models import quantize
    from tests.tiny import tiny_llama
    from verifiers.paged import layer_kernel, whole_forward
    from verifiers.paged.verifier import PagedVerifier

    if not layer_kernel.available():
        pytest.skip("the paged layer kernel is not built")
    if model_type.startswith("llama-"):
        model = tiny_llama(0, dtype=torch.float32)
        quantize.quantize_model(model, model_type.split("-")[1])
    else:
        model = tiny(model_type, **extra)
    trees = [specdec.DraftTree(torch.tensor([[7, 3, 9, 4, 2]]), torch.tensor([[-1, 0, 0, 1, 3]])),
             specdec.DraftTree(torch.tensor([[5, 8, 6]]), torch.tensor([[-1, 0, 1]]))]
    prompts = [torch.tensor([[5, 9, 3, 7, 11, 2, 8, 4, 6, 13]]), torch.tensor([[4, 6, 13, 2]])]
    served = []
    real = whole_forward.decoder_hidden

    def score(route: bool, **kw):
        monkeypatch.setattr(whole_forward, "decoder_hidden",
                            lambda *a: served.append(route) or (real(*a) if route else None))
        v = PagedVerifier(model, num_blocks=32, block_size=4)
        with torch.inference_mode(), cpu_gemm.fast_linears(model):
            for i, p in enumerate(prompts):
                v.start(i, p)
            return v.score([0, 1], trees, **kw)

    for kw in ({}, {"output_hidden": True}, {"greedy": True}):
        fast, slow = score(True, **kw), score(False, **kw)
        for name in ("logits", "hidden", "greedy"):
            a, b = getattr(fast, name), getattr(slow, name)
            assert (a is None and b is None) or torch.equal(a, b), (kw, name)
    assert served == [True, False] * 3
