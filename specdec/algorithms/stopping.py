"""Stopping as ``model.generate`` does it: EOS (kept in the output), stop strings, ``max_new_tokens`` exactly.

A verify step can commit several tokens at once; :class:`Stopper` feeds them one at a time, so the output is cut at
exactly the token where ``model.generate`` would have stopped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specdec.errors import SpecdecError


class Stopper:
    """Decides, token by token, where generation ends.

    eos_token_id: an id, a list of ids, or None. stop_strings: strings matched exactly like transformers'
    ``StopStringCriteria`` (which it uses, so token-boundary "overhangs" behave identically); needs a tokenizer.
    """

    def __init__(self, prompt_ids: Sequence[int], max_new_tokens: int, eos_token_id=None,
                 stop_strings: str | Sequence[str] | None = None, tokenizer=None) -> None:
        if isinstance(eos_token_id, int):
            eos_token_id = [eos_token_id]
        self.eos = frozenset(int(e) for e in (eos_token_id or []))
        self.max_new_tokens = max_new_tokens
        self.produced = 0
        self.criteria = None
        if stop_strings:
            if tokenizer is None:
                raise SpecdecError("stop_strings need a tokenizer: pass tokenizer=... to generate().")
            from transformers.generation.stopping_criteria import StopStringCriteria

            self.criteria = StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings)
            self.window = list(prompt_ids)[-self.criteria.maximum_token_len:]

    def cut(self, new_tokens: Sequence[int]) -> tuple[list[int], str | None]:
        """The prefix of ``new_tokens`` to emit, and why generation finished (None: it goes on)."""
        kept: list[int] = []
        for t in new_tokens:
            kept.append(int(t))
            self.produced += 1
            if int(t) in self.eos:
                return kept, "eos"
            if self.criteria is not None and self._stop_string_hit(int(t)):
                return kept, "stop_string"
            if self.produced >= self.max_new_tokens:
                return kept, "length"
        return kept, None

    def _stop_string_hit(self, token: int) -> bool:
        self.window.append(token)
        self.window = self.window[-self.criteria.maximum_token_len:]
        return bool(self.criteria(torch.tensor([self.window], device="cpu"), None)[0])
