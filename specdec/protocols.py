"""The contracts between the parts: the Drafter and Verifier protocols, their declared capabilities, and the
feedback a drafter observes after each verify step.

A drafter or verifier says what it needs and what it gives as attributes the protocol declares; the decoder reads
them (never ``getattr`` with a default) and fails early, naming the fix, when they do not fit. Whether an object is a
drafter or a verifier is checked with the protocol itself (``isinstance(v, Verifier)``); whether a verifier serves
batches, with its declared ``capabilities.batching``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from specdec.errors import CapabilityError, ConfigError
from specdec.types import Acceptance, DraftContext, DraftTree, HiddenSpec, VerifyOutput


@dataclass(frozen=True)
class Successors:
    """What the target predicted after each node of a verified tree: ``tokens [n]`` the live nodes' tokens (root
    first) and ``topk [n, k]`` the target's k most likely next tokens after each of them, in the context of that
    node's path, most likely first. Every node's prediction is valid, accepted or not (its path's context is real)."""

    tokens: torch.Tensor  # [n]
    topk: torch.Tensor  # [n, k]


@dataclass(frozen=True)
class Feedback:
    """What a drafter learns after a verify step.

    tree: the tree it proposed (as verified); acceptance: the rule's outcome;
    new_tokens: ``[B, k]`` tokens committed by this step (accepted drafts then the bonus/recovered token);
    hidden: ``[B, a+1, H]`` target hidden states along the accepted path (root first), or None;
    successors: the target's top-k next tokens at every node of the tree that was verified (the step's tree, which
    a budget may have cut from ``tree``, merged with other parts' in a hybrid), for a
    :class:`SuccessorDrafter`; None for other drafters.
    """

    tree: DraftTree
    acceptance: Acceptance
    new_tokens: torch.Tensor  # [B, k]
    hidden: torch.Tensor | None = None  # [B, a+1, H]
    successors: Successors | None = None


@runtime_checkable
class Drafter(Protocol):
    """Anything that proposes draft trees.

    Declared capabilities: ``needs_hidden_states`` (it reads the target's hidden states from the context; the
    verifier must give them: True for the last hidden state, a tuple of layer indices for those layers'
    concatenated, see :data:`specdec.types.HiddenSpec`), ``returns_probs`` (its trees can carry ``draft_probs``, which the chain/tree rejection
    rules use when sampling), ``vocab_size`` (the size of the vocabulary its token ids come from, checked against the
    target's; None when its ids are the target's own by construction, e.g. copied from the context).
    """

    needs_hidden_states: HiddenSpec
    returns_probs: bool
    vocab_size: int | None

    def reset(self) -> None:
        """Forget everything about the previous request (called when a request ends and before each new one: it
        must be cheap to call twice)."""

    def propose(self, ctx: DraftContext) -> DraftTree:
        """A tree rooted at ``ctx.input_ids[:, -1]``, at most ``ctx.max_nodes`` nodes, depth <= ``ctx.max_depth``."""

    def observe(self, feedback: Feedback) -> None:
        """Learn what was accepted: roll back own state (a KV cache), adapt."""

    def modules(self) -> Sequence[nn.Module]:
        """The torch modules its forwards run (the decoder switches their linear layers to the fast CPU kernel);
        empty for a drafter without a model."""


@runtime_checkable
class BatchDrafter(Drafter, Protocol):
    """A drafter that drafts for several requests in one forward (one per draft level for the whole batch), declared
    by implementing these members; ``batched`` says whether it should (an option, e.g. to compare the two). The
    batching engine (:mod:`specdec.serving.engine`) gives each running request a drafter made with ``spawn`` and, for
    greedy batches whose drafters all ``batches_with`` the first, calls ``propose_batch`` once a step in place of each
    request's ``propose``.
    """

    batched: bool

    def spawn(self) -> BatchDrafter:
        """A drafter for another request that shares this one's weights (and so can draft in the same forwards)."""

    def batches_with(self, other: Drafter) -> bool:
        """Whether ``other`` can draft in this drafter's batched forwards (it shares its weights)."""

    def propose_batch(self, drafters: Sequence[BatchDrafter], ctxs: Sequence[DraftContext]) -> list[DraftTree]:
        """One tree per request (``drafters[i]`` holds the state of the request ``ctxs[i]`` describes; all spawned
        from one drafter), each within its context's ``max_nodes`` / ``max_depth``, for greedy requests."""


@runtime_checkable
class SuccessorDrafter(Drafter, Protocol):
    """A drafter that reads what the target predicted at every verified node (token recycling), declared by
    ``needs_successors``: how many of the target's most likely next tokens per node its :meth:`Drafter.observe`
    wants in ``Feedback.successors`` (0: none, e.g. a hybrid without such a part). The decode driver then asks the
    verifier for the logits (not only the greedy tokens) and takes their top-k: no extra target forward."""

    needs_successors: int


def successors_wanted(drafter: Drafter) -> int:
    """The top-k ``drafter`` reads after each verify step (0 unless it is a :class:`SuccessorDrafter`)."""
    return int(drafter.needs_successors) if isinstance(drafter, SuccessorDrafter) else 0


@dataclass(frozen=True)
class VerifierCapabilities:
    """What a verifier gives, declared on its class (readable before one is built, e.g. to check a config).

    hidden_states: ``score(..., output_hidden=...)`` returns the target's hidden states (drafters that read
    features need them). greedy_scoring: ``score(..., greedy=True)`` may return only the argmax tokens, computed
    more cheaply than the logits. batching: it holds many live requests at once and scores their trees in one
    forward (continuous batching); without it, one request at a time.
    """

    hidden_states: bool
    greedy_scoring: bool
    batching: bool


@runtime_checkable
class Verifier(Protocol):
    """Runs draft trees through the target and keeps each request's KV cache in step with its committed tokens.

    One set of request operations, keyed by request id, serves one request and many alike (the batching engine,
    :mod:`specdec.serving.engine`, drives both): ``start`` a request, ``score`` the trees of some live requests in one
    forward, ``commit`` each one's accepted path, ``release`` it when it ends. A verifier without
    ``capabilities.batching`` holds one live request at a time.

    KV memory is counted in blocks: ``num_blocks`` in all, ``num_free_blocks`` now, ``blocks_for(n)`` to hold n
    tokens. A verifier whose cache grows with its request (no block pool) counts 0 of each: every request fits.
    ``score`` raises :class:`specdec.serving.block_allocator.KVBlocksExhausted` (with ``.request_id``) when a
    request's tree does not fit, having reserved nothing.
    """

    capabilities: ClassVar[VerifierCapabilities]

    def start(self, request_id: Hashable, input_ids: torch.Tensor,
              output_hidden: HiddenSpec = False) -> torch.Tensor | None:
        """Cache a new request's ``input_ids [1, T]`` (every prompt token but the root; T may be 0); with
        ``output_hidden``, return their hidden states ``[1, T, H]``."""

    def score(self, request_ids: Sequence[Hashable], trees: Sequence[DraftTree], output_hidden: HiddenSpec = False,
              greedy: bool = False) -> VerifyOutput:
        """One target forward over each request's tree (``trees[i]`` is ``[1, n_i]``): logits ``[B, N, V]`` padded
        to the largest tree (and hidden ``[B, N, H]`` if asked). ``greedy``: only the argmax at each node is
        needed; a verifier with ``greedy_scoring`` may then return ``greedy [B, N]`` in place of the logits
        (exactly the logits' argmax)."""

    def commit(self, request_id: Hashable, keep: Sequence[int]) -> None:
        """Keep the accepted nodes ``keep`` (root first) of the request's last scored tree; drop the others'."""

    def release(self, request_id: Hashable) -> None:
        """The request is over (finished, stopped early, failed or preempted): free its KV cache or blocks."""

    def cached_length(self, request_id: Hashable) -> int:
        """Number of the request's tokens whose KV the cache holds (0 for a request it does not hold)."""

    @property
    def num_blocks(self) -> int: ...

    @property
    def num_free_blocks(self) -> int: ...

    def blocks_for(self, num_tokens: int) -> int: ...

    def cost_key(self) -> dict:
        """What decides this verifier's step cost besides the model, dtype, device and threads (its KV layout, how
        it computes greedy tokens): part of the key a cost profile is cached under."""


def check_drafter(drafter) -> Drafter:
    """``drafter`` if it implements :class:`Drafter`, else an error naming what is missing."""
    if not isinstance(drafter, Drafter):
        members = ("needs_hidden_states", "returns_probs", "vocab_size", "reset", "propose", "observe", "modules")
        missing = [m for m in members if m not in dir(drafter)]
        raise ConfigError(f"{type(drafter).__name__} is not a drafter: it lacks {missing} of the Drafter protocol "
                          "(specdec.protocols.Drafter); pass a drafter name, a checkpoint directory, or an object "
                          "that implements it.")
    return drafter


def check_verifier(verifier) -> Verifier:
    """``verifier`` if it implements :class:`Verifier`, else an error naming the protocol's members."""
    if not isinstance(verifier, Verifier):
        members = ("capabilities", "start", "score", "commit", "release", "cached_length", "num_blocks",
                   "num_free_blocks", "blocks_for", "cost_key")
        missing = [m for m in members if m not in dir(verifier)]
        raise ConfigError(f"{type(verifier).__name__} is not a verifier: it lacks {missing} of the Verifier "
                          "protocol (specdec.protocols.Verifier).")
    return verifier


def check_capabilities(drafter: Drafter, verifier: VerifierCapabilities, *, rule_needs_probs: bool = False) -> None:
    """Fail early, naming the fix, when a drafter's declared needs are not met by the verifier or the rule."""
    if drafter.needs_hidden_states and not verifier.hidden_states:
        raise CapabilityError(
            f"{type(drafter).__name__} needs the target's hidden states but this verifier does not return them; "
            "use a verifier whose capabilities include hidden_states (the reference verifier, hf, does)."
        )
    if rule_needs_probs and not drafter.returns_probs:
        raise CapabilityError(
            f"{type(drafter).__name__} does not report draft probabilities, which this acceptance rule needs; "
            "use a rule for deterministic drafts instead."
        )
