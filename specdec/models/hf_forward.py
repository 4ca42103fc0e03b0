"""Run a draft tree through a transformers causal LM with its supported hooks (no copied model code).

The tree goes in as one forward: ``input_ids`` = the tree's tokens, ``position_ids`` = cached length + node depth,
and a 4D **additive** mask in the model's dtype (cached prefix visible, tree part = ancestor mask). A chain needs
no custom mask: the model's own causal mask is exactly the ancestor mask then, and its fast path is kept.
Used by the reference verifier and by drafters that run a causal LM (the draft model).
"""

from __future__ import annotations

import torch

from specdec.algorithms import tree as tree_ops
from specdec.models import hf_cache
from specdec.models.gqa_attention import gqa_attention_on
from specdec.models.greedy_head import ScreenedArgmax
from specdec.types import VerifyOutput


@torch.inference_mode()
def forward_tokens(model, cache, tokens: torch.Tensor, parents: torch.Tensor | None = None,
                   output_hidden: bool = False, logits_to_keep: int = 0,
                   greedy_head: ScreenedArgmax | None = None) -> VerifyOutput:
    """Forward ``tokens [B, N]`` after the cached prefix; ``parents [B, N]`` makes it a tree (None: a chain).

    Returns logits ``[B, N, V]`` (only the last ``logits_to_keep`` positions when > 0: a prefill needs none of
    them, and the LM head is a large part of a small model's cost) and, if asked, hidden states ``[B, N, H]``.
    With ``greedy_head`` (a target :func:`specdec.models.greedy_head.screenable` says it fits) it returns the greedy
    tokens ``[B, N]`` instead of the logits. The cache grows by N.
    """
    past = hf_cache.cache_length(cache)
    n = tokens.shape[1]
    if parents is None or tree_ops.is_chain(parents):
        mask = None
        pos = torch.arange(past, past + n, device=tokens.device).expand(tokens.shape[0], n)
    else:
        mask = tree_ops.verify_mask(parents, past, model.dtype)
        pos = tree_ops.position_ids(parents, past)
    return forward_masked(model, cache, tokens, mask, pos, output_hidden, logits_to_keep, greedy_head)


@torch.inference_mode()
def forward_masked(model, cache, tokens: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor,
                   output_hidden: bool = False, logits_to_keep: int = 0,
                   greedy_head: ScreenedArgmax | None = None) -> VerifyOutput:
    """Forward ``tokens [B, n]`` with an explicit additive mask ``[B, 1, n, cached + n]`` (None: causal) and
    ``position_ids [B, n]``; the building block for tree segments whose ancestors are already cached. Attention
    runs as :func:`specdec.models.gqa_attention.gqa_sdpa_attention` (no K/V copies for grouped heads on a CPU).
    ``greedy_head``: run the decoder alone and return the greedy tokens ``[B, n]`` from its last hidden states
    instead of the logits (see :func:`forward_tokens`)."""
    with gqa_attention_on(model):
        if greedy_head is not None:
            decoder = model.get_decoder()
            h = decoder(input_ids=tokens, attention_mask=mask, position_ids=pos, use_cache=True,
                        **hf_cache.cache_kwargs(decoder, cache)).last_hidden_state  # [B, n, H]
            return VerifyOutput(logits=None, hidden=h if output_hidden else None, greedy=greedy_head(h))
        out = model(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **hf_cache.cache_kwargs(model, cache),
            output_hidden_states=output_hidden,
            logits_to_keep=logits_to_keep,
        )
    hidden = out.hidden_states[-1] if output_hidden else None
    return VerifyOutput(logits=out.logits, hidden=hidden)
