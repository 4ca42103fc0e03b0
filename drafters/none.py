"""The empty drafter: every tree is just the root, so each verify step is one plain decoding step (tau = 1)."""

from __future__ import annotations

from specdec.protocols import Feedback
from specdec.types import DraftContext, DraftTree


class NoDrafter:
    """Proposes no draft tokens; the decode loop then does plain greedy decoding."""

    needs_hidden_states = False
    returns_probs = False
    vocab_size = None  # proposes no tokens

    def __init__(self, target=None, tokenizer=None) -> None:
        pass

    def modules(self) -> list:
        return []

    def reset(self) -> None:
        pass

    def propose(self, ctx: DraftContext) -> DraftTree:
        root = ctx.input_ids[:, -1:]
        return DraftTree(tokens=root, parents=root.new_full(root.shape, -1))

    def observe(self, feedback: Feedback) -> None:
        pass
