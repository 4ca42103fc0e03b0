"""One request's verify step around the verifier call, the same whether one request is decoded or many.

    drafted = state.draft(max_nodes)                       # propose (timed), depth limit, adaptive cut
    out = <the verifier scores drafted.tree>               # Verifier.score, with the batch's other trees
    step = state.settle(drafted, out, commit)              # accept -> commit -> budget -> observe -> extend

:class:`RequestDecoding` holds what a request carries between steps (its drafter, the committed tokens, the hidden
states its drafter has not seen, its sampling RNG and adaptive budget). The decode driver
(:mod:`specdec.serving.engine`) runs it for every request, alone or in a batch; how the tree is scored and how the
accepted path is committed are the driver's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from specdec.algorithms import tree as tree_ops
from specdec.algorithms.acceptance import AcceptanceRule, accept_matching
from specdec.algorithms.adaptive import AdaptiveBudget, uncut
from specdec.algorithms.sampling import SamplingParams
from specdec.protocols import Drafter, Feedback, Successors
from specdec.types import DEAD, Acceptance, DraftContext, DraftTree, VerifyOutput


@dataclass(frozen=True)
class Drafted:
    """One request's draft for a step: the drafter's tree and the one that is verified.

    proposed: the drafter's tree (depth-limited); tree: what is verified (the adaptive budget's cut of it, or the
    same tree); kept: the cut's nodes in ``proposed`` (None: not cut); draft_ms: the ``propose`` call's time when
    it was asked to draft (a budget above 1 node), else None. skipped: the budget gave no draft nodes, so the
    drafter was not called (nor will it observe the step): ``tree`` is the root alone.
    """

    proposed: DraftTree
    tree: DraftTree
    kept: list[int] | None
    draft_ms: float | None
    skipped: bool = False

    def own(self, acceptance: Acceptance) -> Acceptance:
        """``acceptance`` (over ``tree``) as the drafter must hear it: over its own ``proposed`` tree."""
        return acceptance if self.kept is None else uncut(acceptance, self.kept)


def draft(drafter: Drafter, ctx: DraftContext, budget: AdaptiveBudget | None = None, batch_rows: int = 0) -> Drafted:
    """Propose (timed), limit to ``ctx.max_depth``, and let ``budget`` (if any) cut the tree to what pays;
    ``batch_rows``: rows the batch's other requests put in the same verify step."""
    start = time.perf_counter()
    proposed = drafter.propose(ctx)
    return finish_draft(proposed, ctx, 1000 * (time.perf_counter() - start), budget, batch_rows)


def skipped(ctx: DraftContext) -> Drafted:
    """A step the adaptive budget gave no draft nodes: the root alone, without calling the drafter. Drafting a tree
    of one node still runs a drafter's forwards to keep its state (an EAGLE head's cache of features); skipped, it
    catches up at its next proposal over the hidden states it has not seen (:meth:`RequestDecoding.settle` keeps
    them), in one forward. At batch 8 the budget mostly stops drafting and this was most of a step's cost."""
    root = tree_ops.chain(int(ctx.input_ids[0, -1]), [], device=ctx.input_ids.device)
    return Drafted(root, root, None, None, skipped=True)


def finish_draft(proposed: DraftTree, ctx: DraftContext, ms: float, budget: AdaptiveBudget | None = None,
                 batch_rows: int = 0) -> Drafted:
    """A proposal (``ms``: what proposing it took) limited to ``ctx.max_depth`` and cut by ``budget`` (if any): the
    part of :func:`draft` after the drafter's call, also for trees proposed for a whole batch at once."""
    proposed = tree_ops.limit_depth(proposed, ctx.max_depth)
    tree, kept = budget.cut(proposed, batch_rows=batch_rows) if budget is not None else (proposed, None)
    return Drafted(proposed, tree, kept, ms if ctx.max_nodes > 1 else None)


def successors(tree: DraftTree, topk: torch.Tensor | None) -> Successors | None:
    """The verified ``tree``'s live nodes with the target's top-k after each (``topk [1, >= N, k]``), or None."""
    if topk is None:
        return None
    live = (tree.parents[0] != DEAD).nonzero().flatten()
    return Successors(tokens=tree.tokens[0, live], topk=topk[0, live])


@dataclass(frozen=True)
class Step:
    """One verify step: the tree, the rule's outcome and the tokens it committed (``[k]``, bonus last)."""

    tree: DraftTree
    acceptance: Acceptance
    new_tokens: list[int]


@dataclass
class RequestDecoding:
    """One request between verify steps.

    committed: ``[1, T]`` every committed token (prompt + generated; the last is the next tree's root).
    prompt_len: the prompt's length inside it (what ``DraftContext.prompt_len`` reports). hidden: ``[1, t, H]`` the
    target's hidden states the drafter has not seen yet (None unless it reads them). remaining: tokens still allowed.
    """

    drafter: Drafter
    rule: AcceptanceRule
    committed: torch.Tensor  # [1, T]
    prompt_len: int
    remaining: int
    hidden: torch.Tensor | None = None  # [1, t, H]
    sampling: SamplingParams | None = None
    generator: torch.Generator | None = None
    budget: AdaptiveBudget | None = None

    def draft(self, max_nodes: int, batch_rows: int = 0) -> Drafted:
        """This step's tree: the budget's node count (or ``max_nodes``), then the drafter's proposal and its cut
        (no proposal when the budget gives one node: :func:`skipped`). ``batch_rows``: rows the batch's other
        requests put in the same verify step."""
        ctx = self.context(max_nodes, batch_rows)
        if self.skips(ctx):
            return skipped(ctx)
        return draft(self.drafter, ctx, self.budget, batch_rows=batch_rows)

    def skips(self, ctx: DraftContext) -> bool:
        """Whether this step's budget (``ctx.max_nodes``) gives no draft nodes, so the drafter is not called."""
        return self.budget is not None and ctx.max_nodes <= 1

    def context(self, max_nodes: int, batch_rows: int = 0) -> DraftContext:
        """What the drafter sees this step: the budget's node count (or ``max_nodes``), the committed tokens, the
        hidden states it has not seen."""
        nodes = self.budget.nodes(batch_rows=batch_rows) if self.budget is not None else max_nodes
        return DraftContext(input_ids=self.committed, prompt_len=self.prompt_len, max_nodes=nodes,
                            max_depth=self.remaining - 1, hidden=self.hidden, sampling=self.sampling,
                            generator=self.generator)

    def settle(self, drafted: Drafted, out: VerifyOutput, commit: Callable[[Acceptance], None]) -> Step:
        """Accept -> commit -> observe for one scored tree; ``out`` holds this request's row only (logits
        ``[1, >= N, V]``, or ``greedy [1, N]`` when the verifier gave only the argmax; hidden ``[1, >= N, H]``).
        ``commit(acceptance)`` keeps the accepted path in the verifier's KV cache."""
        tree = drafted.tree
        if out.logits is None:
            acceptance = accept_matching(tree, out.greedy)
        else:
            acceptance = self.rule(tree, out.logits[:, :tree.num_nodes], self.sampling, self.generator)
        commit(acceptance)
        if self.budget is not None:
            self.budget.observe(tree, acceptance, drafted.draft_ms)
        path = acceptance.accepted_nodes(0)
        new_tokens = tree.tokens[0, path[1:]].tolist() + [int(acceptance.next_token[0])]
        new = torch.tensor([new_tokens], dtype=self.committed.dtype, device=self.committed.device)
        step_hidden = None if out.hidden is None else out.hidden[:, path]
        if drafted.skipped:  # the drafter saw neither this step nor the hidden states before it: they wait for it
            self.hidden = step_hidden if self.hidden is None or step_hidden is None else \
                torch.cat([self.hidden, step_hidden], dim=1)
        else:
            self.hidden = step_hidden
            self.drafter.observe(Feedback(tree=drafted.proposed, acceptance=drafted.own(acceptance), new_tokens=new,
                                          hidden=step_hidden, successors=successors(tree, out.topk)))
        self.committed = torch.cat([self.committed, new], dim=1)
        self.remaining -= len(new_tokens)
        return Step(tree=tree, acceptance=acceptance, new_tokens=new_tokens)
