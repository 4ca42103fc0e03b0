"""The Drafter and Verifier protocols, and the feedback a drafter observes after each verify step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from specdec.errors import CapabilityError
from specdec.types import Acceptance, DraftContext, DraftTree, VerifyOutput


@dataclass(frozen=True)
class Feedback:
    """What a drafter learns after a verify step.

    tree: the tree it proposed (as verified); acceptance: the rule's outcome;
    new_tokens: ``[B, k]`` tokens committed by this step (accepted drafts then the bonus/recovered token);
    hidden: ``[B, a+1, H]`` target hidden states along the accepted path (root first), or None.
    """

    tree: DraftTree
    acceptance: Acceptance
    new_tokens: torch.Tensor  # [B, k]
    hidden: torch.Tensor | None = None  # [B, a+1, H]


@runtime_checkable
class Drafter(Protocol):
    """Anything that proposes draft trees.

    Capabilities are declared as attributes and checked by the decode loop:
    ``needs_hidden_states`` (it reads target hidden states from the context) and ``returns_probs``
    (its trees carry ``draft_probs``, so sampling can use the chain/tree rejection rules).
    """

    needs_hidden_states: bool
    returns_probs: bool

    def reset(self) -> None:
        """Forget everything about the previous request (called before each new one)."""

    def propose(self, ctx: DraftContext) -> DraftTree:
        """A tree rooted at ``ctx.input_ids[:, -1]`` with at most ``ctx.max_nodes`` nodes, depth <= ``ctx.max_depth``."""

    def observe(self, feedback: Feedback) -> None:
        """Learn what was accepted: roll back own state (a KV cache), adapt."""


@runtime_checkable
class Verifier(Protocol):
    """Runs draft trees through the target and keeps the target's KV cache in step with the committed tokens."""

    def prefill(self, input_ids: torch.Tensor, output_hidden: bool = False) -> torch.Tensor | None:
        """Start a request: cache ``input_ids [B, T]`` (every prompt token except the root); with
        ``output_hidden``, return their last hidden states ``[B, T, H]``."""

    def score(self, tree: DraftTree, output_hidden: bool = False, greedy: bool = False) -> VerifyOutput:
        """One target forward over all tree nodes; logits ``[B, N, V]`` (and hidden ``[B, N, H]`` if asked).
        ``greedy``: only the argmax at each node is needed; a verifier may then return ``greedy [B, N]`` in place
        of the logits (exactly the logits' argmax)."""

    def commit(self, tree: DraftTree, acceptance: Acceptance) -> None:
        """Keep the accepted path's KV (root included) in the cache and drop every other node's."""

    @property
    def cached_length(self) -> int:
        """Number of tokens whose KV the cache holds."""


@runtime_checkable
class BatchVerifier(Protocol):
    """A verifier serving many requests at once, keyed by request id (driven by :mod:`specdec.serving.engine`).

    KV memory comes in blocks: ``num_blocks`` in all, ``num_free_blocks`` now, ``blocks_for(n)`` to hold n tokens.
    ``score_batch`` raises :class:`specdec.serving.block_allocator.KVBlocksExhausted` (with ``.request_id``) when a request's tree
    does not fit, having reserved nothing.
    """

    num_blocks: int

    @property
    def num_free_blocks(self) -> int: ...

    def blocks_for(self, num_tokens: int) -> int: ...

    def start(self, request_id, input_ids: torch.Tensor, output_hidden: bool = False) -> torch.Tensor | None:
        """Cache a new request's ``input_ids [1, T]``; hidden ``[1, T, H]`` if asked."""

    def score_batch(self, request_ids, trees, output_hidden: bool = False) -> VerifyOutput:
        """One forward over each request's tree; logits ``[B, N, V]`` padded to the largest tree."""

    def commit_request(self, request_id, keep) -> None:
        """Keep the accepted nodes (root first) of the request's last scored tree."""

    def release(self, request_id) -> None:
        """Free the request's KV (finished or preempted)."""


def check_capabilities(drafter: Drafter, *, verifier_gives_hidden: bool, rule_needs_probs: bool) -> None:
    """Fail early, naming the fix, when a drafter's declared needs are not met."""
    if getattr(drafter, "needs_hidden_states", False) and not verifier_gives_hidden:
        raise CapabilityError(
            f"{type(drafter).__name__} needs the target's hidden states but this verifier does not return them; "
            "use verifier=hf."
        )
    if rule_needs_probs and not getattr(drafter, "returns_probs", False):
        raise CapabilityError(
            f"{type(drafter).__name__} does not report draft probabilities, which this acceptance rule needs; "
            "use a rule for deterministic drafts instead."
        )
