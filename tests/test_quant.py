"""Weight-only int8 / int4 / bf16 targets: the kernel, the formats, GGUF files, losslessness, refusals.

The kernel's product equals the dequantized weights' up to float32 rounding and, what losslessness rests on, a
row's result is bitwise the same in a batch of any size. Speculative decoding over a quantized target is held to
that target's own greedy decoding (``model.generate`` on the same quantized modules) for every drafter, both
verifiers and batches, and its samples to the target's distribution (chi-square, as tests/test_sampling_e2e.py).
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch

import specdec
from specdec import SpecDecoder
from specdec.errors import ConfigError
from specdec.kernels import quant_gemm
from specdec.models import gguf, quantize
from specdec.models.quantize import QuantLinear
from tests.equality import assert_greedy_equal, greedy_ref
from tests.tiny import random_prompt, tiny_llama, tiny_tokenizer

_TOK = tiny_tokenizer()


def _check_built() -> None:
    assert quant_gemm.available(), quant_gemm.failure()


# ---------------------------------------------------------------- formats and kernel


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_follows_gguf_formulas(bits):
    w = torch.randn(40, 64)
    p = quant_gemm.quantize(w, bits)
    q, d, m = quant_gemm.unpacked(p)
    blocks = w.view(40, 2, 32)
    if bits == 8:  # Q8_0: d = max|w| / 127 in float16, q = round(w / d)
        assert torch.equal(d, (blocks.abs().amax(-1) / 127).half())
        assert int(q.abs().max()) <= 127 and m is None
    else:  # Q4_1: d = (max - min) / 15, m = min, q in 0..15
        assert torch.equal(m, blocks.amin(-1).half())
        assert torch.equal(d, ((blocks.amax(-1) - blocks.amin(-1)) / 15).half())
        assert int(q.min()) >= 0 and int(q.max()) <= 15
    err = (quant_gemm.dequantize(p) - w).abs().view(40, 2, 32).amax(-1)
    step = d.float() if bits == 4 else d.float()
    assert bool((err <= step * 0.5 + 1e-3).all())  # at most half a step from the weight (plus float16 rounding)


@pytest.mark.parametrize("bits", [8, 4])
def test_pack_and_unpack_are_inverse(bits):
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (45, 96), generator=g) if bits == 8 else torch.randint(0, 16, (45, 96), generator=g)
    d = torch.rand(45, 3, generator=g).half()
    m = torch.rand(45, 3, generator=g).half() if bits == 4 else None
    q2, d2, m2 = quant_gemm.unpacked(quant_gemm.pack(bits, q, d, m))
    assert torch.equal(q2.long(), q) and torch.equal(d2, d) and (m is None or torch.equal(m2, m))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n, k", [(50, 64), (96, 32), (200, 160)])
def test_kernel_matches_dequantized_product_and_rows_are_independent(bits, n, k):
    _check_built()
    g = torch.Generator().manual_seed(n + k)
    w, x, b = torch.randn(n, k, generator=g), torch.randn(19, k, generator=g), torch.randn(n, generator=g)
    p = quant_gemm.quantize(w, bits)
    y = quant_gemm.quant_linear(x, p, b)
    ref = quant_gemm.quantize_activations(x).double() @ quant_gemm.dequantize(p).double().T + b.double()
    assert y.shape == (19, n) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)
    exact = x.double() @ quant_gemm.dequantize(p).double().T + b.double()  # the activations' rounding: small
    assert float((y.double() - exact).abs().max()) < 0.02 * float(exact.abs().max())
    for rows in (1, 2, 3, 5, 8, 9, 17):  # every block size and sub-block split of the kernel
        part = torch.cat([quant_gemm.quant_linear(x[i:i + rows].contiguous(), p, b) for i in range(0, 19, rows)])
        assert torch.equal(part, y), rows


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n, k", [(50, 64), (96, 32), (200, 160)])
def test_every_path_gives_the_portable_loops_bits(bits, n, k):
    """This CPU's path (AVX-512 VNNI, AVX2 or portable: ``quant_gemm.isa()``) against the portable loop, bitwise,
    over the whole int8 range (-128 included, which GGUF files may hold) and every block size and split."""
    _check_built()
    g = torch.Generator().manual_seed(3 * n + k)
    t = -(-n // 32)
    q = torch.randint(-128, 128, (n, k), generator=g) if bits == 8 else torch.randint(0, 16, (n, k), generator=g)
    d = (torch.rand(n, k // 32, generator=g) * 0.02).half()
    m = (-torch.rand(n, k // 32, generator=g) * 0.1).half() if bits == 4 else None
    p = quant_gemm.pack(bits, q, d, m)
    assert p.q.shape[0] == t
    x, b = torch.randn(21, k, generator=g) * 3, torch.randn(n, generator=g)
    x[4] = 0  # a zero row: its scale is 0
    chosen = quant_gemm.int8_small_rows()
    try:
        for loop in ("avx2", "vnni") if chosen else (None,):  # both int8 loops at one or two rows on a VNNI build
            if loop:
                quant_gemm.set_int8_small_rows(loop)
            for rows in (21, 1, 2, 3, 4, 5, 7, 8, 9, 16):
                for bias in (b, None):
                    got = torch.cat([quant_gemm.quant_linear(x[i:i + rows].contiguous(), p, bias)
                                     for i in range(0, 21, rows)])
                    want = quant_gemm.quant_linear_portable(x, p, bias)
                    assert torch.equal(got, want), (quant_gemm.isa(), loop, rows, bias is None)
    finally:
        if chosen:
            quant_gemm.set_int8_small_rows(chosen)


@pytest.mark.parametrize("n, k", [(50, 64), (96, 32), (200, 160)])
def test_bf16_kernel_is_the_bfloat16_weights_times_float32_inputs_and_rows_are_independent(n, k):
    """bits 16: the weights rounded to bfloat16 (exactly what the panels hold), the activations not rounded."""
    _check_built()
    g = torch.Generator().manual_seed(n + k)
    w, x, b = torch.randn(n, k, generator=g), torch.randn(19, k, generator=g), torch.randn(n, generator=g)
    p = quant_gemm.quantize(w, 16)
    assert p.q.dtype == torch.bfloat16 and p.nbytes == -(-n // 32) * 32 * k * 2
    assert torch.equal(quant_gemm.dequantize(p), w.to(torch.bfloat16).float())
    y = quant_gemm.quant_linear(x, p, b)
    ref = x.double() @ w.to(torch.bfloat16).double().T + b.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)
    for rows in (1, 2, 3, 5, 6, 7, 8, 13):  # one row, each block size of AVX2 (2) and AVX-512 (6), odd last rows
        part = torch.cat([quant_gemm.quant_linear(x[i:i + rows].contiguous(), p, b) for i in range(0, 19, rows)])
        assert torch.equal(part, y), rows
    assert torch.equal(quant_gemm.quant_linear_portable(x, p, b), y)  # the portable loop's bits on every CPU
    both = quant_gemm.concat([p, quant_gemm.quantize(w[:7], 16)])
    assert torch.equal(quant_gemm.dequantize(both), torch.cat([w, w[:7]]).to(torch.bfloat16).float())


def test_bf16_torch_route_multiplies_the_inputs_as_they_are(monkeypatch):
    p = quant_gemm.quantize(torch.randn(64, 64), 16)
    x = torch.randn(3, 64)
    monkeypatch.setattr(quant_gemm, "available", lambda: False)
    torch.testing.assert_close(QuantLinear(p)(x), x @ quant_gemm.dequantize(p).T)


def test_quantized_layer_rows_are_independent_across_the_thread_pool():
    # 12 rows x 12 rotated heads is past the rotation's work grain (64): the rows run in ATen's thread pool and must
    # still come out bitwise as alone (a contracted multiply-add in the rotation once broke this, and with 8-bit
    # activations such a last-bit difference changed tokens on the default model)
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from specdec.kernels import cpu_decoder_layer
    if not cpu_decoder_layer.quant_available():
        pytest.skip("the quantized layer kernels are not built")
    g = torch.Generator().manual_seed(5)
    qkv = quant_gemm.quantize(torch.randn(14 * 64, 576, generator=g) * 0.05, 8)
    norm = LlamaRMSNorm(576)
    h = torch.randn(12, 576, generator=g)
    angle = (torch.arange(12.0)[:, None] * 7 + 3) / (10000 ** (torch.arange(64) % 32 / 32))[None]
    cos, sin = angle.cos().contiguous(), angle.sin().contiguous()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the suite runs on one thread: the pool must have a second
    try:
        with torch.inference_mode():
            together = cpu_decoder_layer.pre_attention(h, norm, qkv, cos, sin, 12, 64)
            alone = torch.cat([cpu_decoder_layer.pre_attention(h[i:i + 1].contiguous(), norm, qkv,
                                                               cos[i:i + 1].contiguous(), sin[i:i + 1].contiguous(),
                                                               12, 64) for i in range(12)])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(together, alone)


def test_kernel_refuses_mismatched_panels():
    _check_built()
    p = quant_gemm.quantize(torch.randn(64, 64), 4)
    with pytest.raises(RuntimeError, match="input size"):
        quant_gemm.quant_linear(torch.randn(2, 96), p)
    with pytest.raises(ValueError, match="multiple of 32"):
        quant_gemm.quantize(torch.randn(8, 40), 8)


def test_torch_route_without_the_kernel(monkeypatch):
    p = quant_gemm.quantize(torch.randn(64, 64), 4)
    x = torch.randn(3, 64)
    monkeypatch.setattr(quant_gemm, "available", lambda: False)
    layer = QuantLinear(p)
    torch.testing.assert_close(layer(x), quant_gemm.quantize_activations(x) @ quant_gemm.dequantize(p).T)


def test_activations_quantize_as_llama_cpp_q8():
    x = torch.tensor([[0.5, -1.0, 0.25, 0.0] * 8, [0.0] * 32])
    got = quant_gemm.quantize_activations(x)
    d = torch.tensor(1.0) / 127  # max|x| / 127 per row and group (float32); q = round(x / d): 63.5 -> 64
    want = torch.tensor([64.0, -127.0, 32.0, 0.0] * 8) * d
    assert torch.equal(got[0], want) and torch.equal(got[1], torch.zeros(32))


# ---------------------------------------------------------------- GGUF blocks


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_blocks_load_bit_for_bit(kind):
    """Our panels of a GGUF tensor's raw blocks hold exactly the values the gguf package dequantizes."""
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[kind]
    w = np.random.default_rng(0).standard_normal((40, 96)).astype(np.float32)
    raw = quants.quantize(w, qtype)
    panels = gguf.quant_blocks(kind, raw, 40, 96)
    assert panels.bits == (8 if kind == "Q8_0" else 4)
    assert torch.equal(quant_gemm.dequantize(panels), torch.from_numpy(quants.dequantize(raw, qtype)))


def test_gguf_refusals(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(Exception, match="not a readable GGUF file"):
        gguf.load_gguf(bad)
    with pytest.raises(ConfigError, match="no GGUF file"):
        gguf.load_gguf(tmp_path / "missing.gguf")
    import gguf as gg

    writer = gg.GGUFWriter(str(tmp_path / "other.gguf"), "rwkv6")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match="'rwkv6' is not served"):
        gguf.load_gguf(tmp_path / "other.gguf")
    writer = gg.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    raw = np.zeros((4, 210), np.uint8)  # one Q6_K block (256 values in 210 bytes) per row
    writer.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=gg.GGMLQuantizationType.Q6_K)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match=r"blk\.0\.attn_q\.weight \(Q6_K\).*llama-quantize"):
        gguf.load_gguf(tmp_path / "k.gguf")


def test_llama_q_k_rows_are_put_back_in_transformers_order():
    """llama.cpp's converter permutes q/k rows per head (interleaved rotary pairs); _unpermute undoes it."""
    heads, rows = 3, 12
    w = torch.arange(rows * 2).view(rows, 2)
    permuted = w.view(heads, 2, rows // heads // 2, 2).transpose(1, 2).reshape(rows, 2)  # as the converter writes
    assert torch.equal(permuted[gguf._unpermute(heads, rows)], w)


# ---------------------------------------------------------------- quantized targets


@functools.cache
def quantized_tiny(bits: str, seed: int = 0) -> torch.nn.Module:
    model = tiny_llama(seed, dtype=torch.float32)
    report = quantize.quantize_model(model, bits)
    assert report.quantized == 2 * 7 + 1 and not report.kept  # every linear of both layers, and the LM head
    return model


def test_quantize_model_swaps_every_linear_and_keeps_the_head_at_int8():
    model = quantized_tiny("int4")
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert model.lm_head.bits == 8 and model.model.layers[0].mlp.down_proj.bits == 4
    assert quantize.quantization_of(model) == "int4"
    bf16 = quantized_tiny("bf16")
    assert bf16.lm_head.bits == 16 and bf16.model.layers[0].mlp.down_proj.bits == 16
    float_model = tiny_llama(0, dtype=torch.float32)
    assert specdec.models.vocab_size(model) == specdec.models.vocab_size(float_model)
    with torch.no_grad():
        ids = random_prompt(0, 12)
        a, b = model(ids).logits, float_model(ids).logits
    assert (a - b).abs().max() < 0.2 * b.abs().max()  # near the float model, not equal to it


def test_quantization_refusals():
    with pytest.raises(ConfigError, match="unknown target.quantization 'int3'"):
        quantize.check_quantizable(tiny_llama(0, dtype=torch.float32), "int3")
    with pytest.raises(ConfigError, match="target.dtype=float32"):
        quantize.check_quantizable(tiny_llama(0, dtype=torch.bfloat16), "int8")
    from tests.families import tiny_family

    with pytest.raises(ConfigError, match="Conv1D"):
        quantize.check_quantizable(tiny_family("gpt2", dtype=torch.float32), "int8")
    with pytest.raises(ConfigError, match="quantize your model first"):
        SpecDecoder(tiny_llama(0, dtype=torch.float32), _TOK, quantization="int8")
    with pytest.raises(ConfigError, match="unknown quantization"):
        specdec.models.load_target("some/model", quantization="fp4")


@pytest.mark.parametrize("bits", ["int8", "int4", "bf16"])
@pytest.mark.parametrize("verifier", ["hf", "paged"])
def test_every_drafter_lossless_on_a_quantized_target(drafter_factory, bits, verifier):
    target = quantized_tiny(bits)
    prompt = random_prompt(700, 14, repeat=True)
    ref = greedy_ref(target, prompt, 24, eos_token_id=None)
    out = specdec.generate(target, prompt, tokenizer=_TOK, drafter=drafter_factory.build(target, _TOK),
                           verifier=verifier, max_new_tokens=24, eos_token_id=None)
    assert_greedy_equal(out, ref)


def test_quantized_batch_equals_each_request_alone():
    target = quantized_tiny("int4", seed=1)
    prompts = [random_prompt(800 + i, 6 + 3 * i, repeat=True)[0].tolist() for i in range(4)]
    refs = [greedy_ref(target, torch.tensor([p]), 20, eos_token_id=None) for p in prompts]
    outs = specdec.generate(target, prompts, tokenizer=_TOK, drafter="ngram", max_new_tokens=20, eos_token_id=None)
    for out, ref in zip(outs, refs):
        assert_greedy_equal(out, ref)


def test_quantized_target_samples_its_distribution():
    """Chi-square of the first two sampled tokens against the quantized target's exact joint distribution, with a
    draft-model tree (rejection sampling against draft probabilities)."""
    from drafters.draft_model import DraftModelDrafter
    from tests import test_sampling_e2e as e2e
    from tests.test_rejection import assert_matches

    target = tiny_llama(0, vocab_size=e2e.V, init=e2e.INIT, dtype=torch.float32)
    quantize.quantize_model(target, "int4")
    draft = copy.deepcopy(e2e.draft_model()).float()
    decoder = SpecDecoder(target, None, drafter=DraftModelDrafter(target, None, model=draft, depth=2, width=2))
    counts, drafted, accepted = e2e.first_two_counts(decoder, e2e.PROMPT, e2e.V, e2e.N_SAMPLES, 90_000)
    assert_matches(counts, e2e.exact_joint(target, e2e.PROMPT, e2e.params(False)), "int4 target")
    assert 0 < sum(accepted) < sum(drafted)


def test_quantized_llama_layers_run_fused(monkeypatch):
    """Inside fast_linears a quantized Llama layer runs as the two C++ calls around its attention (q/k/v and gate/up
    as one product each), with the outputs of the layer's own forward up to float rounding."""
    from specdec.kernels import cpu_decoder_layer, cpu_gemm

    assert cpu_decoder_layer.quant_available(), quant_gemm.failure()
    model = quantized_tiny("int8")
    layer = model.model.layers[0]
    assert cpu_decoder_layer.is_quant_llama_layer(layer)
    qkv, o, gu, down = cpu_decoder_layer.quant_weights(layer)
    assert qkv.out_features == sum(layer.self_attn.get_submodule(n).out_features for n in ("q_proj", "k_proj", "v_proj"))
    calls = []
    real = cpu_decoder_layer.post_attention
    monkeypatch.setattr(cpu_decoder_layer, "post_attention", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    ids = random_prompt(3, 9)
    with torch.inference_mode():
        want = model(ids).logits
        with cpu_gemm.fast_linears(model):
            got = model(ids).logits
    assert calls == [9] * model.config.num_hidden_layers
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
