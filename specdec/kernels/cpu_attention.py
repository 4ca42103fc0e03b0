"""Attention of one decode step's query over a cached K/V in one C++ call on a CPU (kernel choice only).

A plain decode step asks for attention of one query row over hundreds of cached keys, per layer. torch's CPU
``scaled_dot_product_attention`` takes ~45-90 us a call on SmolLM2-135M's shapes for work of a few microseconds (its
flash kernel is blocked for long queries and sets up per call); :func:`attention` takes ~33 us, which saves ~1.2 ms of a
~30 ms step over 30 layers (docs/history/10-packed-panels.md). Each (batch, query row, KV head) is one work item: its
grouped query heads read each key and value once in place (no ``repeat_kv``), with the scores over the keys its mask
lets it see, a two-pass softmax in float32 (float64 for a float64 model) and the weighted values. Its per-key dot
products (one horizontal sum each) make it slower than SDPA's blocked kernel from about four rows, so a verify step's
tree keeps SDPA.

Used by :func:`specdec.models.gqa_attention.gqa_sdpa_attention` for inputs of at most :data:`MAX_QUERIES` rows with
an additive or boolean mask, or none (full attention for one row; causal for a prefill with as many queries as
keys, as transformers' ``sdpa`` path asks); anything else (longer prefills, dropout, a position bias, softcapping,
another device) keeps torch's SDPA. A row's result does not depend on the other rows. Results differ from SDPA's by
float rounding only (the order of the sums, Sleef's ``exp`` within 1 ULP).
"""

from __future__ import annotations

import math

import torch

from specdec.kernels.build import Kernel

MAX_QUERIES = 2  # query rows this kernel takes: from 4 rows SDPA is as fast (docs/history/10-packed-panels.md)


_KERNEL = Kernel("cpu_attention", "a decode step's attention")


def available() -> bool:
    """Whether the kernel is built (building it now if it was not; False where that fails or is turned off)."""
    return _KERNEL.available()


def failure() -> str | None:
    """Why the kernel is not used (None when it is, or was not tried)."""
    return _KERNEL.failure()


def takes(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float,
          is_causal: bool, any_rows: bool = False) -> bool:
    """Whether :func:`attention` serves this call: a CPU input of at most :data:`MAX_QUERIES` rows (any number with
    ``any_rows``: where rows must be bitwise independent) without gradients or dropout; a 4D mask of the input's
    dtype or boolean, or none (then one row, or causal with as many rows as keys); the kernel built."""
    n, t = query.shape[2], key.shape[2]
    if not (query.device.type == "cpu" and (any_rows or n <= MAX_QUERIES) and not dropout
            and not torch.is_grad_enabled()):
        return False
    if attention_mask is None:
        ok = n == 1 or (is_causal and n == t)
    else:
        ok = attention_mask.dim() == 4 and attention_mask.dtype in (torch.bool, query.dtype)
    return ok and query.dtype in (torch.float32, torch.bfloat16, torch.float64) and available()


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
              scaling: float | None = None, is_causal: bool = False) -> torch.Tensor:
    """``query [B, H, n, D]``, ``key``/``value [B, H_kv, T, D]``, an additive or boolean ``attention_mask
    [B|1, H|1, n, T]`` or None (``is_causal``: a causal prefill, n == T) -> ``[B, n, H, D]`` contiguous."""
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    return _KERNEL.module.dense_attention(query, key, value, attention_mask, float(scale), bool(is_causal))
