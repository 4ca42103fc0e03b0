"""Run a draft tree through a transformers causal LM with its supported hooks (no copied model code).

The tree goes in as one forward: ``input_ids`` = the tree's tokens, ``position_ids`` = cached length + node depth,
and a 4D **additive** mask in the model's dtype (cached prefix visible, tree part = ancestor mask). A chain needs
no custom mask: the model's own causal mask is exactly the ancestor mask then, and its fast path is kept.

A 4D mask is taken as it is by transformers' masking utilities, so a sliding-window layer would see its whole
context: for a model with sliding layers (:func:`specdec.models.families.attention_spec`) the window is applied
here, by **position** (a tree node's is the prefix length + its depth, not its slot), and a model whose layers
differ gets transformers' mapping from layer type to mask.
Used by the reference verifier and by drafters that run a causal LM (the draft model).
"""

from __future__ import annotations

import torch

from specdec.algorithms import tree as tree_ops
from specdec.kernels.greedy_head import ScreenedArgmax
from specdec.models import hf_cache
from specdec.models.families import FULL, SLIDING, attention_spec
from specdec.models.gqa_attention import gqa_attention_on
from specdec.types import HiddenSpec, VerifyOutput


def select_hidden(spec: HiddenSpec, last: torch.Tensor, layers: tuple | None) -> torch.Tensor | None:
    """The hidden states ``spec`` asks for, from a forward's ``last`` hidden state and its per-layer ``layers``."""
    if not spec:
        return None
    if spec is True:
        return last
    return torch.cat([layers[i] for i in spec], dim=-1)


def hidden_width(config, spec: HiddenSpec) -> int:
    """Feature width of ``spec``'s hidden states for a target with ``config`` (0 when none are asked)."""
    if not spec:
        return 0
    return int(config.hidden_size) * (1 if spec is True else len(spec))


@torch.inference_mode()
def forward_tokens(model, cache, tokens: torch.Tensor, parents: torch.Tensor | None = None,
                   output_hidden: HiddenSpec = False, logits_to_keep: int = 0,
                   greedy_head: ScreenedArgmax | None = None) -> VerifyOutput:
    """Forward ``tokens [B, N]`` after the cached prefix; ``parents [B, N]`` makes it a tree (None: a chain).

    Returns logits ``[B, N, V]`` (only the last ``logits_to_keep`` positions when > 0: a prefill needs none of
    them, and the LM head is a large part of a small model's cost) and, if asked, hidden states ``[B, N, H]`` (or
    the layers :data:`HiddenSpec` names).
    With ``greedy_head`` (a target :func:`specdec.kernels.greedy_head.screenable` says it fits) it returns the greedy
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
    key_pos = None if mask is None else torch.cat([torch.arange(past, device=pos.device).expand(pos.shape[0], past),
                                                   pos], dim=1)
    return forward_masked(model, cache, tokens, mask, pos, output_hidden, logits_to_keep, greedy_head, key_pos)


def layer_masks(model, mask: torch.Tensor | None, pos: torch.Tensor, key_pos: torch.Tensor | None):
    """The attention mask ``model`` should get for an additive ``mask [B, 1, n, K]`` over keys at positions
    ``key_pos [B, K]`` (None: slot k is position k) from queries at ``pos [B, n]``: the mask itself without
    sliding layers; with them, the mask with each window applied (a key is visible when its position is
    ``> query position - window``), as one tensor when every layer has the same window, else as
    ``{layer type: mask}``. None stays None (the model builds its own causal, windowed masks)."""
    if mask is None:
        return None
    spec = attention_spec(model.config)
    if not spec.sliding:
        return mask
    if key_pos is None:
        key_pos = torch.arange(mask.shape[-1], device=mask.device).expand(mask.shape[0], -1)
    gap = pos.to(mask.device)[:, None, :, None] - key_pos.to(mask.device)[:, None, None, :]  # [B, 1, n, K]
    windowed = mask.masked_fill(gap >= spec.window, torch.finfo(mask.dtype).min)
    return windowed if spec.uniform else {FULL: mask, SLIDING: windowed}


@torch.inference_mode()
def forward_masked(model, cache, tokens: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor,
                   output_hidden: HiddenSpec = False, logits_to_keep: int = 0,
                   greedy_head: ScreenedArgmax | None = None, key_pos: torch.Tensor | None = None) -> VerifyOutput:
    """Forward ``tokens [B, n]`` with an explicit additive mask ``[B, 1, n, cached + n]`` (None: causal) and
    ``position_ids [B, n]``; ``key_pos [B, cached + n]``: the positions of the keys the mask covers (None: slot
    k holds position k), which sliding-window layers need (:func:`layer_masks`); the building block for tree segments whose ancestors are already cached. Attention
    runs as :func:`specdec.models.gqa_attention.gqa_sdpa_attention` (no K/V copies for grouped heads on a CPU).
    ``greedy_head``: run the decoder alone and return the greedy tokens ``[B, n]`` from its last hidden states
    instead of the logits (see :func:`forward_tokens`)."""
    mask = layer_masks(model, mask, pos, key_pos)
    with gqa_attention_on(model):
        if greedy_head is not None:
            decoder = model.get_decoder()
            per_layer = isinstance(output_hidden, tuple)
            dec = decoder(input_ids=tokens, attention_mask=mask, position_ids=pos, use_cache=True,
                          output_hidden_states=per_layer, **hf_cache.cache_kwargs(decoder, cache))
            h = dec.last_hidden_state  # [B, n, H]
            return VerifyOutput(logits=None, hidden=select_hidden(output_hidden, h, dec.hidden_states),
                                greedy=greedy_head(h))
        out = model(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **hf_cache.cache_kwargs(model, cache),
            output_hidden_states=bool(output_hidden),
            logits_to_keep=logits_to_keep,
        )
    hidden = select_hidden(output_hidden, out.hidden_states[-1], out.hidden_states) if output_hidden else None
    return VerifyOutput(logits=out.logits, hidden=hidden)
