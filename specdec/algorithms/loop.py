"""The decode loop: one generator, read top to bottom.

prefill -> (propose -> score -> accept -> commit -> observe -> yield step)*

Greedy and sampling share it; only the acceptance rule differs. Stopping on EOS and stop strings lives in
:mod:`specdec.generate`, which consumes this generator; the loop only stops itself at ``max_new_tokens``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from specdec.algorithms import tree as tree_ops
from specdec.algorithms.acceptance import AcceptanceRule, accept_matching, is_argmax
from specdec.algorithms.adaptive import AdaptiveBudget, uncut
from specdec.algorithms.sampling import SamplingParams
from specdec.protocols import Drafter, Feedback, Verifier
from specdec.types import Acceptance, DraftContext, DraftTree


@dataclass(frozen=True)
class Drafted:
    """One request's draft for a step: the drafter's tree and the one that is verified.

    proposed: the drafter's tree (depth-limited); tree: what is verified (the adaptive budget's cut of it, or the
    same tree); kept: the cut's nodes in ``proposed`` (None: not cut); draft_ms: the ``propose`` call's time when
    it was asked to draft (a budget above 1 node), else None.
    """

    proposed: DraftTree
    tree: DraftTree
    kept: list[int] | None
    draft_ms: float | None

    def own(self, acceptance: Acceptance) -> Acceptance:
        """``acceptance`` (over ``tree``) as the drafter must hear it: over its own ``proposed`` tree."""
        return acceptance if self.kept is None else uncut(acceptance, self.kept)


def draft(drafter: Drafter, ctx: DraftContext, budget: AdaptiveBudget | None = None, batch_rows: int = 0) -> Drafted:
    """Propose (timed), limit to ``ctx.max_depth``, and let ``budget`` (if any) cut the tree to what pays;
    ``batch_rows``: rows the batch's other requests put in the same verify step."""
    start = time.perf_counter()
    proposed = tree_ops.limit_depth(drafter.propose(ctx), ctx.max_depth)
    draft_ms = 1000 * (time.perf_counter() - start) if ctx.max_nodes > 1 else None
    tree, kept = budget.cut(proposed, batch_rows=batch_rows) if budget is not None else (proposed, None)
    return Drafted(proposed, tree, kept, draft_ms)


@dataclass(frozen=True)
class Step:
    """One verify step: the tree, the rule's outcome and the tokens it committed (``[k]``, bonus last)."""

    tree: DraftTree
    acceptance: Acceptance
    new_tokens: list[int]


def decode(
    verifier: Verifier,
    drafter: Drafter,
    rule: AcceptanceRule,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    max_nodes: int,
    sampling: SamplingParams | None = None,
    generator: torch.Generator | None = None,
    budget: AdaptiveBudget | None = None,
) -> Iterator[Step]:
    """Speculatively decode from ``input_ids [1, T]`` until ``max_new_tokens`` tokens are committed.

    The last prompt token is the first tree's root; the cache holds every committed token but the current root.
    ``budget`` (optional) re-decides the node budget before each step from measured costs and this request's
    acceptance so far (:mod:`specdec.algorithms.adaptive`); otherwise every tree gets ``max_nodes``.
    Yields one :class:`Step` per verify step; a caller may stop iterating at any time.
    """
    sampling = sampling or SamplingParams()
    needs_hidden = bool(getattr(drafter, "needs_hidden_states", False))
    argmax_only = is_argmax(rule, sampling)  # the rule reads only the logits' argmax: the verifier may skip them
    drafter.reset()
    hidden = verifier.prefill(input_ids[:, :-1], output_hidden=needs_hidden)  # [B, T-1, H] or None
    committed = input_ids
    produced = 0
    while produced < max_new_tokens:
        remaining = max_new_tokens - produced
        nodes = budget.nodes() if budget is not None else max_nodes
        ctx = DraftContext(input_ids=committed, prompt_len=input_ids.shape[1], max_nodes=nodes,
                           max_depth=remaining - 1, hidden=hidden, sampling=sampling, generator=generator)
        drafted = draft(drafter, ctx, budget)
        tree = drafted.tree
        out = verifier.score(tree, output_hidden=needs_hidden, greedy=argmax_only)
        acceptance = accept_matching(tree, out.greedy) if out.logits is None else \
            rule(tree, out.logits, sampling, generator)
        verifier.commit(tree, acceptance)
        if budget is not None:
            budget.observe(tree, acceptance, drafted.draft_ms)

        path = acceptance.accepted_nodes(0)
        new_tokens = tree.tokens[0, path[1:]].tolist() + [int(acceptance.next_token[0])]
        new = torch.tensor([new_tokens], dtype=committed.dtype, device=committed.device)
        hidden = None if out.hidden is None else out.hidden[:, path]
        drafter.observe(Feedback(tree=drafted.proposed, acceptance=drafted.own(acceptance), new_tokens=new,
                                 hidden=hidden))
        committed = torch.cat([committed, new], dim=1)
        produced += len(new_tokens)
        yield Step(tree=tree, acceptance=acceptance, new_tokens=new_tokens)
