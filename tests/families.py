"""Tiny seeded random models of many transformers families (the support matrix's targets; no download).

Every model shares :data:`tests.tiny.VOCAB` and the word-level tokenizer, so any drafter built for the tiny Llama
works on all of them. Sliding windows are :data:`WINDOW` positions, so a prompt of a few dozen tokens crosses them;
Gemma 2's attention softcapping is set low enough to change its outputs.
"""

from __future__ import annotations

import functools

import torch
import transformers as tf

from tests.tiny import VOCAB

WINDOW = 12  # sliding window of the tiny configs (prompts in the tests are longer)
INIT = {"phi": 0.4}  # weight scale where the default (0.15) gives a greedy loop of two tokens
_COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2)
_LLAMA_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, **_COMMON)

# name -> (config class, config kwargs); the names are the support matrix's rows
SERVED: dict[str, tuple[type, dict]] = {
    "llama": (tf.LlamaConfig, _LLAMA_LIKE),
    "llama-tied": (tf.LlamaConfig, {**_LLAMA_LIKE, "tie_word_embeddings": True}),
    "qwen2": (tf.Qwen2Config, _LLAMA_LIKE),
    "qwen2-sliding": (tf.Qwen2Config, {**_LLAMA_LIKE, "num_hidden_layers": 3, "use_sliding_window": True,
                                       "sliding_window": WINDOW, "max_window_layers": 1}),
    "qwen3": (tf.Qwen3Config, {**_LLAMA_LIKE, "head_dim": 8}),
    "mixtral": (tf.MixtralConfig, {**_LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2,
                                   "sliding_window": None}),
    "qwen2-moe": (tf.Qwen2MoeConfig, {**_LLAMA_LIKE, "num_experts": 4, "num_experts_per_tok": 2,
                                      "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32}),
    "mistral": (tf.MistralConfig, {**_LLAMA_LIKE, "sliding_window": WINDOW}),
    "gemma": (tf.GemmaConfig, {**_LLAMA_LIKE, "head_dim": 8}),
    "gemma2": (tf.Gemma2Config, {**_LLAMA_LIKE, "num_hidden_layers": 3, "head_dim": 8, "sliding_window": WINDOW,
                                 "attn_logit_softcapping": 0.5, "final_logit_softcapping": 3.0,
                                 "query_pre_attn_scalar": 12}),
    "gemma3": (tf.Gemma3TextConfig, {**_LLAMA_LIKE, "num_hidden_layers": 3, "head_dim": 8, "sliding_window": WINDOW,
                                     "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
                                     "query_pre_attn_scalar": 8}),
    "phi3": (tf.Phi3Config, {**_LLAMA_LIKE, "sliding_window": None, "pad_token_id": 2}),
    "phi": (tf.PhiConfig, {**_LLAMA_LIKE, "partial_rotary_factor": 0.5}),
    "stablelm": (tf.StableLmConfig, _LLAMA_LIKE),
    "olmo2": (tf.Olmo2Config, _LLAMA_LIKE),
    "olmo3": (tf.Olmo3Config, {**_LLAMA_LIKE, "num_hidden_layers": 3, "sliding_window": WINDOW,
                               "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]}),
    "olmoe": (tf.OlmoeConfig, {**_LLAMA_LIKE, "num_experts": 4, "num_experts_per_tok": 2}),
    "qwen3-moe": (tf.Qwen3MoeConfig, {**_LLAMA_LIKE, "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2,
                                      "moe_intermediate_size": 32}),
    "cohere": (tf.CohereConfig, _LLAMA_LIKE),
    "granite": (tf.GraniteConfig, _LLAMA_LIKE),
    "starcoder2": (tf.Starcoder2Config, {**_LLAMA_LIKE, "sliding_window": WINDOW}),
    "smollm3": (tf.SmolLM3Config, {**_LLAMA_LIKE, "num_hidden_layers": 4}),
    "gpt2": (tf.GPT2Config, dict(n_embd=32, n_layer=2, n_head=4, n_positions=512, **_COMMON)),
    "opt": (tf.OPTConfig, dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=512, word_embed_proj_dim=32, **_COMMON)),
    "gpt-neox": (tf.GPTNeoXConfig, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=512, **_COMMON)),
    "gptj": (tf.GPTJConfig, dict(n_embd=32, n_layer=2, n_head=4, n_positions=512, rotary_dim=4, **_COMMON)),
    "falcon": (tf.FalconConfig, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **_COMMON)),
    "bloom": (tf.BloomConfig, dict(hidden_size=32, n_layer=2, n_head=4, **_COMMON)),
}


@functools.cache
def _build(name: str, seed: int, dtype: torch.dtype, vocab_size: int | None, window: int | None) -> torch.nn.Module:
    cls, kwargs = SERVED[name]
    torch.manual_seed(seed)
    kwargs = dict(kwargs)
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    if window is not None:
        kwargs["sliding_window"] = window
    config = cls(**kwargs)
    # Gemma 2: softcapping needs eager (transformers' sdpa refuses it); Bloom has no sdpa
    config._attn_implementation = "eager" if name in ("gemma2", "bloom") else "sdpa"
    moe = "moe" in name or name in ("mixtral", "olmoe")
    extra = {"experts_implementation": "eager"} if moe else {}  # grouped_mm takes no float64
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation=config._attn_implementation, **extra)
    with torch.no_grad():  # a wider init than the default 0.02 gives varied greedy text (n-grams repeat, no loops)
        for name_, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3 if "emb" in name_ or "wte" in name_ else INIT.get(name, 0.15))
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 2
    return model


def tiny_family(name: str, seed: int = 0, dtype: torch.dtype = torch.float64, vocab_size: int | None = None,
                window: int | None = None) -> torch.nn.Module:
    """A seeded random model of family ``name`` (a key of :data:`SERVED`), cached per arguments; ``vocab_size``
    and ``window`` override the config's (the chi-square tests use a vocabulary of 8)."""
    return _build(name, seed, dtype, vocab_size, window)
