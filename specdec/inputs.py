"""Requests as the decoder takes them: prompts (text, chats) or token ids -> checked ``[1, T]`` id tensors.

Every check runs before any decoding, so bad input fails with a message naming the fix and loses nothing.
"""

from __future__ import annotations

import torch

from specdec import models
from specdec.errors import PromptError


def is_batch(input_ids, prompt) -> bool:
    """True for several requests: a list of texts, of chats (lists of messages), of id lists or 1-D tensors, or a
    ``[B, T]`` tensor with B > 1 (a single chat is a list of message dicts, not a batch).

    >>> is_batch(None, ["a", "b"]), is_batch(None, [{"role": "user", "content": "a"}]), is_batch([[1, 2], [3]], None)
    (True, False, True)
    """
    if prompt is not None:
        return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and \
            all(isinstance(p, (str, list, tuple)) for p in prompt)
    if isinstance(input_ids, torch.Tensor):
        return input_ids.dim() == 2 and input_ids.shape[0] > 1
    return isinstance(input_ids, (list, tuple)) and len(input_ids) > 0 and \
        all(isinstance(x, (list, tuple, torch.Tensor)) for x in input_ids)


def request_ids(input_ids, prompt, *, tokenizer, chat: bool, device: torch.device) -> torch.Tensor:
    """One request's ids ``[1, T]`` on ``device``, from ``input_ids`` (``[T]``, ``[1, T]`` or a list) or ``prompt``
    (text, or chat messages: the chat template is applied when ``chat`` and the tokenizer has one)."""
    if (input_ids is None) == (prompt is None):
        raise PromptError("pass exactly one of input_ids (token ids) or prompt (text or chat messages).")
    if prompt is not None:
        if tokenizer is None:
            raise PromptError("a text prompt needs a tokenizer: pass tokenizer=... or input_ids instead.")
        if isinstance(prompt, str) and not prompt.strip():
            raise PromptError("the prompt is empty; pass some text.")
        return models.encode_prompt(tokenizer, prompt, chat=chat).to(device)
    try:
        ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(input_ids, device="cpu")
    except (TypeError, ValueError, RuntimeError) as e:
        raise PromptError(f"input_ids must be token ids (ints): {e}") from None
    if ids.numel() == 0:
        raise PromptError("the prompt is empty (0 tokens); pass at least one token.")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise PromptError(f"input_ids must be integer token ids; got a {ids.dtype} tensor (convert with .long() "
                          "only if the values are ids).")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise PromptError(
            f"input_ids must be [1, T] for one request; got shape {tuple(ids.shape)}. For a batch pass a list "
            "of id lists (any lengths) or a [B, T] tensor."
        )
    if ids.shape[1] == 0:
        raise PromptError("the prompt is empty (0 tokens); pass at least one token.")
    return ids.long().to(device)  # the target's device: every tensor the loop makes follows these ids


def batch_ids(input_ids, prompt, *, tokenizer, chat: bool, device: torch.device) -> list[torch.Tensor]:
    """Each request's ids ``[1, T_i]``: from a list of texts or chats (``prompt``), or of id lists / 1-D tensors,
    or a ``[B, T]`` tensor (``input_ids``)."""
    if (input_ids is None) == (prompt is None):
        raise PromptError("pass exactly one of input_ids (token ids) or prompt (texts or chats).")
    if prompt is not None:
        return [request_ids(None, p, tokenizer=tokenizer, chat=chat, device=device) for p in prompt]
    if isinstance(input_ids, torch.Tensor):
        input_ids = list(input_ids) if input_ids.dim() == 2 else [input_ids]
    if not input_ids:
        raise PromptError("the batch is empty; pass at least one prompt.")
    return [request_ids(ids, None, tokenizer=tokenizer, chat=chat, device=device) for ids in input_ids]


def check_ids(target, ids: torch.Tensor) -> None:
    """Every id of ``ids [1, T]`` must be in the target's vocabulary ``0 .. V - 1``."""
    v = models.vocab_size(target)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= v:
        bad = lo if lo < 0 else hi
        raise PromptError(f"input_ids holds token id {bad}, outside the target's vocabulary (0 .. {v - 1}); "
                          "encode the prompt with the target's tokenizer.")


def unpad(input_ids, attention_mask, target):
    """Padded ``input_ids [B, T]`` with ``attention_mask [B, T]`` (1 = token, 0 = pad; left or right padding, as
    ``model.generate`` takes them) -> each row's tokens: ``[1, T_0]`` for one row, a list of 1-D tensors for
    several. Without a mask, a ``[B, T]`` tensor holding the target's pad id (which is not its EOS) is unpadded
    on ``input_ids != pad``, as ``model.generate`` infers it. Anything else is returned as it is."""
    if attention_mask is None:
        pad = getattr(getattr(target, "generation_config", None), "pad_token_id", None)
        eos = getattr(getattr(target, "generation_config", None), "eos_token_id", None)
        eos = set(eos) if isinstance(eos, (list, tuple)) else {eos}
        if not (isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[0] > 1
                and isinstance(pad, int) and pad not in eos and bool((input_ids == pad).any())):
            return input_ids
        attention_mask = input_ids != pad
    if input_ids is None or not isinstance(input_ids, torch.Tensor):
        raise PromptError("attention_mask goes with padded input_ids, a [B, T] tensor; a list of id lists needs "
                          "no padding (or mask).")
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    mask = torch.as_tensor(attention_mask, device=ids.device)
    mask = mask if mask.dim() == 2 else mask[None]
    if mask.shape != ids.shape:
        raise PromptError(f"attention_mask {tuple(mask.shape)} must have input_ids' shape {tuple(ids.shape)}.")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise PromptError("attention_mask must hold 1 (token) and 0 (padding) only.")
    rows = [row[m.bool()] for row, m in zip(ids, mask)]
    for i, row in enumerate(rows):
        if row.numel() == 0:
            raise PromptError(f"row {i} of attention_mask masks every token; each prompt needs at least one.")
    return rows[0][None] if len(rows) == 1 else rows


def check_length(target, ids: torch.Tensor, max_new_tokens: int) -> None:
    """The prompt plus ``max_new_tokens`` must fit in the target's context."""
    ctx = models.context_length(target)
    if ctx is not None and ids.shape[1] + max_new_tokens > ctx:
        if ids.shape[1] >= ctx:
            raise PromptError(
                f"the prompt has {ids.shape[1]} tokens but the target's context holds {ctx}; shorten the prompt."
            )
        raise PromptError(
            f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the target's context "
            f"of {ctx} tokens; lower max_new_tokens to at most {ctx - ids.shape[1]} or shorten the prompt."
        )
