"""Typed boundaries between drafter, verifier, acceptance rule and decode loop.

Shapes use B = batch, N = tree nodes (root included), V = vocabulary, H = hidden size.
Node 0 of every draft tree is the **root**: the last committed token, not yet in the target's KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specdec.errors import SpecdecError

HiddenSpec = bool | tuple[int, ...]
"""Which target hidden states a forward returns (a drafter's ``needs_hidden_states``, a verifier's ``output_hidden``):
False none, True the last one (after the final norm, so ``lm_head(hidden)`` = the logits), a tuple of layer
indices the concatenation of transformers' ``hidden_states[i]`` (the *input* of decoder layer ``i``; 0 = the
embeddings), ``[.., len(spec) * H]`` (EAGLE-3's features)."""


@dataclass(frozen=True)
class DraftTree:
    """A batch of draft trees with a fixed node budget N (dead nodes pad).

    Fields:
        tokens: ``[B, N]`` int64 token ids; ``tokens[:, 0]`` is the root (last committed token).
        parents: ``[B, N]`` int64; ``parents[:, 0] == -1``; every other parent index is < its own index.
            A dead (padding) node has parent ``-2`` and is never attended to or accepted.
        draft_probs: ``[B, N, V]`` float or ``None``. Row i is the drafter's distribution q *from which node i's
            children were drawn* (None for deterministic drafters such as n-gram lookup).
        scores: ``[B, N]`` float or ``None``. The drafter's confidence that node i is accepted (its whole path is),
            in [0, 1] and never larger than its parent's (the root's is 1); ``None`` when the drafter does not
            estimate it. An adaptive budget calibrates these against what is accepted and cuts each tree to the
            nodes that pay for their verify cost (:mod:`specdec.algorithms.adaptive`).

    Example: the chain ``root -> 5 -> 7`` is ``tokens=[[r, 5, 7]]``, ``parents=[[-1, 0, 1]]``;
    a root with two children ``5`` and ``9`` is ``tokens=[[r, 5, 9]]``, ``parents=[[-1, 0, 0]]``.
    """

    tokens: torch.Tensor  # [B, N]
    parents: torch.Tensor  # [B, N]
    draft_probs: torch.Tensor | None = None  # [B, N, V]
    scores: torch.Tensor | None = None  # [B, N]

    def __post_init__(self) -> None:
        validate_tree(self.tokens, self.parents, self.draft_probs)
        if self.scores is not None and self.scores.shape != self.tokens.shape:
            raise SpecdecError(f"DraftTree scores must be [B, N] matching tokens {tuple(self.tokens.shape)}; got "
                               f"{tuple(self.scores.shape)}.")

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]

    @property
    def num_draft_nodes(self) -> torch.Tensor:
        """``[B]`` number of live non-root nodes per tree."""
        return (self.parents[:, 1:] >= 0).sum(dim=1)


DEAD = -2  # parent index of a padding node


def validate_tree(tokens: torch.Tensor, parents: torch.Tensor, draft_probs: torch.Tensor | None) -> None:
    """Check a tree's contract; raise :class:`SpecdecError` naming the broken rule."""
    if tokens.dim() != 2 or parents.shape != tokens.shape:
        raise SpecdecError(
            f"DraftTree needs tokens and parents of one shape [B, N]; got {tuple(tokens.shape)} and "
            f"{tuple(parents.shape)}. Add a batch dimension with .unsqueeze(0) for a single tree."
        )
    if tokens.shape[1] < 1:
        raise SpecdecError("DraftTree needs at least the root node (the last committed token).")
    if tokens.dtype != torch.long or parents.dtype != torch.long:
        raise SpecdecError("DraftTree tokens and parents must be int64 (torch.long) tensors.")
    if bool((parents[:, 0] != -1).any()):
        raise SpecdecError("DraftTree node 0 is the root: parents[:, 0] must be -1.")
    n = tokens.shape[1]
    idx = torch.arange(n, device=parents.device)
    rest = parents[:, 1:]
    live = rest >= 0
    if bool((~live & (rest != DEAD)).any()):
        raise SpecdecError("DraftTree parents must be >= 0 for live nodes or -2 for dead (padding) nodes.")
    if bool((live & (rest >= idx[1:])).any()):
        raise SpecdecError("DraftTree parents must be topologically ordered: parent index < own index.")
    if n > 1 and bool(live.any()):
        safe = rest.clamp(min=0)
        parent_alive = (safe == 0) | (parents.gather(1, safe) >= 0)
        if bool((live & ~parent_alive).any()):
            raise SpecdecError("DraftTree: a live node has a dead parent; mark its whole subtree dead (-2).")
    if draft_probs is not None and (draft_probs.dim() != 3 or draft_probs.shape[:2] != tokens.shape):
        raise SpecdecError(
            f"DraftTree draft_probs must be [B, N, V] matching tokens [B, N]; got {tuple(draft_probs.shape)}."
        )


@dataclass(frozen=True)
class VerifyOutput:
    """What one verify step returns for a tree.

    logits: ``[B, N, V]`` target logits at every node (the distribution of that node's next token), or None when
    the verifier was asked for greedy tokens and gave only those.
    hidden: ``[B, N, H]`` target last-layer hidden states, or None when no drafter asked for them.
    greedy: ``[B, N]`` the target's argmax at every node, when the verifier computed it without the logits
    (:mod:`specdec.kernels.greedy_head`); None otherwise.
    topk: ``[B, N, k]`` the target's k most likely next tokens at every node, most likely first (the decode driver
    takes them from the logits for a drafter that reads them, :class:`specdec.protocols.SuccessorDrafter`); None
    otherwise.
    """

    logits: torch.Tensor | None  # [B, N, V]
    hidden: torch.Tensor | None = None  # [B, N, H]
    greedy: torch.Tensor | None = None  # [B, N]
    topk: torch.Tensor | None = None  # [B, N, k]


@dataclass(frozen=True)
class Acceptance:
    """The outcome of an acceptance rule for one tree (batch size 1 views are used by the decode loop).

    path: ``[B, D+1]`` node indices of the accepted path, root first, padded with -1 after ``num_accepted + 1``.
    num_accepted: ``[B]`` draft tokens accepted (root excluded).
    next_token: ``[B]`` the bonus token (all drafts accepted) or recovered token (after a rejection).
    """

    path: torch.Tensor  # [B, D+1]
    num_accepted: torch.Tensor  # [B]
    next_token: torch.Tensor  # [B]

    @classmethod
    def from_paths(cls, paths: list[list[int]], next_tokens: list[int], device=None) -> Acceptance:
        """Build from per-request accepted paths (node indices, root first) and next tokens."""
        width = max(len(p) for p in paths)
        return cls(
            path=torch.tensor([p + [-1] * (width - len(p)) for p in paths], dtype=torch.long, device=device),
            num_accepted=torch.tensor([len(p) - 1 for p in paths], dtype=torch.long, device=device),
            next_token=torch.tensor(next_tokens, dtype=torch.long, device=device),
        )

    def accepted_nodes(self, b: int = 0) -> list[int]:
        """Node indices of request b's accepted path, root included."""
        return self.path[b, : int(self.num_accepted[b]) + 1].tolist()


@dataclass
class DraftContext:
    """What a drafter sees when it proposes.

    input_ids: ``[B, T]`` every committed token (prompt + generated); the last one is the tree's root.
    prompt_len: length of the prompt inside ``input_ids``.
    max_nodes: node budget for the next tree, root included.
    max_depth: deepest useful draft (the tokens still allowed, minus the bonus token).
    hidden: ``[B, T', H]`` the target's last hidden states (after its final norm; or the layers the drafter's
        ``needs_hidden_states`` lists, concatenated: ``[B, T', k H]``) that the drafter has not seen
        yet: at the first proposal those of every prompt token but the root (``T' = T - 1``), then those along the
        path the last verify step accepted, root first (``T' = a + 1``). The last row is always the state of the
        token just before the root. None unless the drafter declared ``needs_hidden_states``.
    sampling: the request's :class:`specdec.algorithms.sampling.SamplingParams` (a drafter that samples warps its own
        distribution the same way and reports it as ``draft_probs``); generator: the request's RNG.
    """

    input_ids: torch.Tensor  # [B, T]
    prompt_len: int
    max_nodes: int
    max_depth: int
    hidden: torch.Tensor | None = None  # [B, T', H]
    sampling: object | None = None  # SamplingParams
    generator: torch.Generator | None = None


@dataclass
class GenerationStats:
    """Per-call statistics, filled by :func:`specdec.generate`."""

    verify_steps: int = 0
    drafted: list[int] = field(default_factory=list)  # per verify step
    accepted: list[int] = field(default_factory=list)  # per verify step
    accepted_by_depth: list[int] = field(default_factory=list)  # [d] how often depth d+1 was accepted
    new_tokens: int = 0
    wall_time_s: float = 0.0
    prefill_time_s: float = 0.0
    finish_reason: str | None = None

    @property
    def tau(self) -> float:
        """Mean tokens produced per verify step, bonus included (plain decoding: 1.0)."""
        return self.new_tokens / self.verify_steps if self.verify_steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / drafted tokens."""
        d = sum(self.drafted)
        return sum(self.accepted) / d if d else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    def acceptance_by_depth(self) -> list[float]:
        """Fraction of verify steps whose accepted path reached depth d (d = 1, 2, ...)."""
        s = max(self.verify_steps, 1)
        return [c / s for c in self.accepted_by_depth]

    def record(self, drafted: int, accepted: int) -> None:
        self.verify_steps += 1
        self.drafted.append(drafted)
        self.accepted.append(accepted)
        while len(self.accepted_by_depth) < accepted:
            self.accepted_by_depth.append(0)
        for d in range(accepted):
            self.accepted_by_depth[d] += 1

    def as_dict(self) -> dict:
        return {
            "verify_steps": self.verify_steps,
            "new_tokens": self.new_tokens,
            "tau": self.tau,
            "acceptance_rate": self.acceptance_rate,
            "acceptance_by_depth": self.acceptance_by_depth(),
            "drafted_per_step": self.drafted,
            "accepted_per_step": self.accepted,
            "wall_time_s": self.wall_time_s,
            "tokens_per_s": self.tokens_per_s,
            "finish_reason": self.finish_reason,
        }


@dataclass(frozen=True)
class GenerationOutput:
    """What :func:`specdec.generate` returns.

    sequences: ``[1, T_prompt + T_new]`` prompt followed by the new tokens (like ``model.generate``).
    new_tokens: the generated token ids only.
    """

    sequences: torch.Tensor  # [1, T]
    new_tokens: list[int]
    stats: GenerationStats
    text: str | None = None  # decoded new tokens, when a tokenizer was available
    error: str | None = None  # why a batched request was cut short (finish_reason "kv_exhausted"), else None
