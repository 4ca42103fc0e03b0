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
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(input_ids, device="cpu")
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
