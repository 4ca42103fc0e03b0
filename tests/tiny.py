"""Tiny seeded random models and a word-level tokenizer, so tests run in seconds without any download."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 96
SPECIAL = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2; EOS = 2


def tiny_config(vocab_size: int = VOCAB, layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2,
                max_positions: int = 512, init: float = 0.1) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=init,
        # untied: a tied random head makes every token predict itself; init 0.02-0.3 gives greedy text with
        # repeats (n-grams match), EOS now and then, and no degenerate loops of one token
        tie_word_embeddings=False,
    )


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float64, **cfg) -> LlamaForCausalLM:
    """A random Llama (default float64, so argmax ties never flip between tree and sequential forwards)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**cfg)).to(dtype).eval()
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 2
    return model


def tiny_tokenizer(vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: id i <-> word ``w{i}`` (ids 0-2 special), words joined by spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for i in range(len(SPECIAL), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def save_tiny(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32, **cfg) -> Path:
    """Write a tiny model + tokenizer checkpoint directory (for code that loads by path, e.g. the bench)."""
    path = Path(path)
    tiny_llama(seed, dtype=dtype, **cfg).save_pretrained(path)
    tiny_tokenizer(cfg.get("vocab_size", VOCAB)).save_pretrained(path)
    return path


def random_prompt(seed: int, length: int, vocab_size: int = VOCAB, repeat: bool = True) -> torch.Tensor:
    """``[1, length]`` prompt ids (no special ids); with ``repeat`` it re-uses a short motif so n-grams match."""
    g = torch.Generator().manual_seed(seed)
    if repeat:
        motif = torch.randint(3, vocab_size, (max(2, length // 3),), generator=g)
        ids = motif.repeat(length // len(motif) + 1)[:length]
    else:
        ids = torch.randint(3, vocab_size, (length,), generator=g)
    return ids[None].long()
