"""Grouped-query attention without copying K/V, for our forwards on a CPU (kernel choice only; same model code).

transformers' ``sdpa`` attention repeats each K/V head for its query heads (``repeat_kv``: a copy of the whole cached
K/V per layer per forward) whenever a mask is passed with more than one query — exactly a verify step's tree. torch's
CPU ``scaled_dot_product_attention`` takes ``enable_gqa=True`` with a mask and gives the same result (bit for bit in our
tests) without that copy, which grows with the cached length (docs/history/07-kv-copies.md has the saving on the default
target). A decode or verify step (at most :data:`specdec.kernels.cpu_attention.MAX_QUERIES` query rows) takes
:mod:`specdec.kernels.cpu_attention`'s kernel instead, which also reads grouped K/V in place.

:data:`ATTENTION_NAME` is registered with transformers' ``AttentionInterface`` (and its mask with the ``sdpa``
mask function), and :func:`gqa_attention_on` switches a model's ``config._attn_implementation`` from ``sdpa`` to it
only while one of our forwards runs: the model behaves as before outside. Off a CPU, for a model that does not
use ``sdpa``, or for a family not declared to call attention only through ``AttentionInterface``
(:func:`specdec.models.families.renames_safely`: Falcon picks its code path by the implementation's name), nothing
changes.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from specdec.kernels import cpu_attention
from specdec.kernels.quant_gemm import QuantLinear
from specdec.models.families import renames_safely

ATTENTION_NAME = "specdec_gqa_sdpa"
_BEYOND_SDPA = ("position_bias", "softcap", "s_aux", "sinks")  # attention kwargs only transformers' paths handle


def gqa_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """``query [B, H, n, D]``, ``key``/``value [B, H_kv, T, D]``, additive or boolean ``attention_mask
    [B, 1, n, T]`` -> ``[B, n, H, D]``. A decode or verify step on a CPU (few query rows): one call of
    :func:`specdec.kernels.cpu_attention.attention`; a longer input with a mask on a CPU: one fused SDPA call with
    ``enable_gqa``; otherwise transformers' own ``sdpa`` path."""
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if not any(kwargs.get(k) is not None for k in _BEYOND_SDPA) and cpu_attention.takes(
            query, key, attention_mask, dropout, causal, any_rows=needs_exact_rows(module)):
        return cpu_attention.attention(query, key, value, attention_mask, scaling,
                                       is_causal=causal and attention_mask is None and query.shape[2] > 1), None
    groups = getattr(module, "num_key_value_groups", 1)
    if (attention_mask is None or groups == 1 or query.device.type != "cpu" or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def needs_exact_rows(module: torch.nn.Module) -> bool:
    """True for an attention module whose projections are int8 / int4 / bf16 (:class:`QuantLinear`): int8 / int4
    quantize their inputs, so a last-bit difference in attention can move a value across a rounding step and change a
    token at a close call. Every query row of such a model then takes the C++ kernel, whose rows are bitwise
    independent of the others (a tree's nodes get exactly what a one-token step gets); SDPA's blocked sums are not."""
    return type(getattr(module, "q_proj", None)) is QuantLinear


AttentionInterface.register(ATTENTION_NAME, gqa_sdpa_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


def route(model: torch.nn.Module) -> str:
    """The attention our forwards of ``model`` run (part of a cost profile's key): ``gqa_sdpa`` on a CPU for an
    ``sdpa`` model (``gqa_sdpa+cpu`` with :mod:`specdec.kernels.cpu_attention`'s kernel for steps), else the model's
    own implementation."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    p = next(model.parameters(), None)
    if impl in ("sdpa", ATTENTION_NAME) and p is not None and p.device.type == "cpu" and renames_safely(model):
        return "gqa_sdpa+cpu" if cpu_attention.available() else "gqa_sdpa"
    return impl


@contextmanager
def gqa_attention_on(*modules: torch.nn.Module):
    """Inside the block, the ``sdpa`` attention of ``modules`` (each read through its ``config``) runs as
    :func:`gqa_sdpa_attention`; restored after. Modules without a config, using another attention, or of a
    family whose code branches on the implementation's name, are left alone."""
    switched = []
    for m in modules:
        cfg = getattr(m, "config", None)
        if cfg is not None and getattr(cfg, "_attn_implementation", None) == "sdpa" and renames_safely(m):
            cfg._attn_implementation = ATTENTION_NAME
            switched.append(cfg)
    try:
        yield
    finally:
        for cfg in switched:
            cfg._attn_implementation = "sdpa"
