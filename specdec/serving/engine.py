"""Batched speculative decoding with continuous batching: many requests, one verify forward per step.

Each step: admit waiting requests (prefill each), let every running request's own drafter propose its own tree,
verify all trees in **one** target forward (padded to one node budget with dead nodes), then per request apply the
acceptance rule, commit its accepted path in the paged KV cache, feed its drafter and check its stopping. A
finished request leaves at once and frees its KV blocks; a waiting one takes its place at the next step.

Per request the output equals that request decoded alone (greedy, float32: token for token), whatever the batch
around it, the arrival order, or preemptions (see :mod:`specdec.serving.scheduler`).

>>> engine = BatchEngine(verifier, drafters, rule, max_nodes=8, max_batch_size=4)   # doctest: +SKIP
>>> rid = engine.add(input_ids, max_new_tokens=64, stopper=Stopper(...))            # doctest: +SKIP
>>> while not engine.done: events = engine.step()                                   # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from specdec.algorithms.acceptance import AcceptanceRule
from specdec.algorithms.adaptive import AdaptiveBudget
from specdec.algorithms.loop import Drafted, draft
from specdec.algorithms.sampling import SamplingParams
from specdec.algorithms.stopping import Stopper
from specdec.protocols import Drafter, Feedback
from specdec.serving.block_allocator import KVBlocksExhausted
from specdec.serving.scheduler import Scheduler
from specdec.types import DraftContext, DraftTree, GenerationStats


@dataclass
class Request:
    """One request's state across steps (and across preemptions)."""

    request_id: int
    prompt: torch.Tensor  # [1, T] as given
    max_new_tokens: int
    stopper: Stopper
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)  # generated so far (after stopping cuts)
    stats: GenerationStats = field(default_factory=GenerationStats)
    finish_reason: str | None = None
    error: str | None = None
    preemptions: int = 0
    budget: AdaptiveBudget | None = None  # per-request adaptive node budget (None: the engine's max_nodes)
    # while running:
    drafter: Drafter | None = None
    committed: torch.Tensor | None = None  # [1, T + generated]
    hidden: torch.Tensor | None = None  # [1, t, H] target hidden states the drafter has not seen yet
    started: float | None = None
    drafted: Drafted | None = None  # this step's draft (the drafter's tree and the verified cut of it)


@dataclass(frozen=True)
class Event:
    """What one step did for one request: the tokens it emitted, and whether it finished."""

    request_id: int
    new_tokens: list[int]
    finished: bool
    finish_reason: str | None = None


class DrafterPool:
    """One drafter per running request (drafters keep per-request state), built on demand and reused."""

    def __init__(self, build: Callable[[], Drafter], first: Drafter | None = None) -> None:
        self.build = build
        self.free: list[Drafter] = [first] if first is not None else []

    def acquire(self) -> Drafter:
        d = self.free.pop() if self.free else self.build()
        d.reset()
        return d

    def release(self, drafter: Drafter) -> None:
        self.free.append(drafter)


class BatchEngine:
    """Runs requests through a :class:`~specdec.protocols.BatchVerifier` (:class:`verifiers.paged.PagedVerifier`)
    with continuous batching."""

    def __init__(self, verifier, drafters: DrafterPool, rule: AcceptanceRule, *, max_nodes: int,
                 max_batch_size: int, sampling: SamplingParams | None = None, needs_hidden: bool = False) -> None:
        self.verifier = verifier
        self.drafters = drafters
        self.rule = rule
        self.max_nodes = max_nodes
        self.sampling = sampling or SamplingParams()
        self.needs_hidden = needs_hidden
        self.scheduler = Scheduler(max_batch_size, getattr(verifier, "preemption", "recompute"))
        self.requests: dict[int, Request] = {}

    @property
    def done(self) -> bool:
        return self.scheduler.done

    def add(self, input_ids: torch.Tensor, *, max_new_tokens: int, stopper: Stopper,
            generator: torch.Generator | None = None, budget: AdaptiveBudget | None = None) -> int:
        """Queue a request ``input_ids [1, T]``; returns its id (the order of arrival). ``budget``: its own
        adaptive node budget (re-decided each step, knowing how many other requests share the step)."""
        rid = len(self.requests)
        self.requests[rid] = Request(rid, input_ids, max_new_tokens, stopper, generator, budget=budget)
        self.scheduler.add(self.requests[rid])
        return rid

    def run(self, on_finish: Callable[[Request], None] | None = None) -> list[Request]:
        """Step until every request has finished (``on_finish`` is called as each one does, e.g. to advance a
        progress bar); requests in arrival order."""
        while not self.done:
            for event in self.step():
                if event.finished and on_finish is not None:
                    on_finish(self.requests[event.request_id])
        return list(self.requests.values())

    def step(self) -> list[Event]:
        """Admit, then one verify step over every running request."""
        events = self._admit()
        running = list(self.scheduler.running)
        if not running:
            return events
        trees = [self._propose(r, len(running) - 1) for r in running]
        out, running, trees = self._score(running, trees, events)
        for i, (r, t) in enumerate(zip(running, trees)):
            events.append(self._accept(r, t, out.logits[i:i + 1, :t.num_nodes],
                                       None if out.hidden is None else out.hidden[i:i + 1]))
        return events

    # --- the parts of a step ---------------------------------------------------------------------------------

    def _admit(self) -> list[Event]:
        v = self.verifier

        def need(r: Request) -> int:  # prefill (all but the root) + one tree
            return v.blocks_for(self._context(r).shape[1] - 1 + self.max_nodes)

        admitted, too_large = self.scheduler.admit(v.num_free_blocks, v.num_blocks, need)
        events = [self._refuse(r, f"request {r.request_id} needs {need(r)} KV blocks for its prompt and one tree, "
                                  f"more than the {v.num_blocks} the cache has; raise verifier.num_blocks or "
                                  "shorten the prompt.", queued=True) for r in too_large]
        for r in admitted:
            r.drafter = self.drafters.acquire()
            r.committed = self._context(r)
            r.started = r.started or time.perf_counter()
            try:
                r.hidden = self.verifier.start(r.request_id, r.committed[:, :-1], output_hidden=self.needs_hidden)
            except KVBlocksExhausted:  # admission counted blocks without prefix sharing; this is a safety net
                self._preempt(r)
        return events

    def _context(self, r: Request) -> torch.Tensor:
        """``[1, T + generated]``: what a (re-)admitted request is prefilled with."""
        new = torch.tensor([r.tokens], dtype=r.prompt.dtype, device=r.prompt.device)
        return torch.cat([r.prompt, new], dim=1)

    def _propose(self, r: Request, others: int) -> DraftTree:
        remaining = r.max_new_tokens - len(r.tokens)
        nodes = r.budget.nodes(batch_rows=others) if r.budget is not None else self.max_nodes
        ctx = DraftContext(input_ids=r.committed, prompt_len=r.prompt.shape[1], max_nodes=nodes,
                           max_depth=remaining - 1, hidden=r.hidden, sampling=self.sampling, generator=r.generator)
        r.drafted = draft(r.drafter, ctx, r.budget, batch_rows=others)
        return r.drafted.tree

    def _score(self, running: list[Request], trees: list[DraftTree], events: list[Event]):
        """One verify forward; out of KV blocks, preempt or refuse (by policy) until the rest fits."""
        while True:
            try:
                ids = [r.request_id for r in running]
                return self.verifier.score_batch(ids, trees, output_hidden=self.needs_hidden), running, trees
            except KVBlocksExhausted as e:
                failing = self.requests[e.request_id]
                if self.scheduler.policy == "refuse" or len(running) == 1:
                    victim = failing
                    events.append(self._refuse(victim, f"request {victim.request_id} ran out of KV blocks after "
                                                       f"{len(victim.tokens)} tokens: {e}"))
                else:
                    victim = self.scheduler.victim()
                    self._preempt(victim)
                keep = [i for i, r in enumerate(running) if r is not victim]
                running, trees = [running[i] for i in keep], [trees[i] for i in keep]
                if not running:
                    return None, [], []

    def _accept(self, r: Request, tree: DraftTree, logits: torch.Tensor, hidden: torch.Tensor | None) -> Event:
        acceptance = self.rule(tree, logits, self.sampling, r.generator)
        if r.budget is not None:
            r.budget.observe(tree, acceptance, r.drafted.draft_ms)
        path = acceptance.accepted_nodes(0)
        self.verifier.commit_request(r.request_id, path)
        new_tokens = tree.tokens[0, path[1:]].tolist() + [int(acceptance.next_token[0])]
        new = torch.tensor([new_tokens], dtype=r.committed.dtype, device=r.committed.device)
        r.hidden = None if hidden is None else hidden[:, path]
        r.drafter.observe(Feedback(tree=r.drafted.proposed, acceptance=r.drafted.own(acceptance), new_tokens=new,
                                   hidden=r.hidden))
        r.committed = torch.cat([r.committed, new], dim=1)
        kept, reason = r.stopper.cut(new_tokens)
        r.stats.record(drafted=int(tree.num_draft_nodes[0]), accepted=int(acceptance.num_accepted[0]))
        r.tokens.extend(kept)
        if reason is not None:
            self._finish(r, reason)
        return Event(r.request_id, kept, reason is not None, reason)

    # --- leaving the batch -----------------------------------------------------------------------------------

    def _finish(self, r: Request, reason: str) -> None:
        r.finish_reason = reason
        r.stats.finish_reason = reason
        r.stats.new_tokens = len(r.tokens)
        r.stats.wall_time_s = time.perf_counter() - (r.started or time.perf_counter())
        self.verifier.release(r.request_id)
        if r.drafter is not None:
            self.drafters.release(r.drafter)
        r.drafter, r.committed, r.hidden = None, None, None
        self.scheduler.finish(r)

    def _refuse(self, r: Request, message: str, queued: bool = False) -> Event:
        r.error = message
        if queued:  # never admitted: not in the running list
            self.scheduler.running.append(r)
        self._finish(r, "kv_exhausted")
        return Event(r.request_id, [], True, "kv_exhausted")

    def _preempt(self, r: Request) -> None:
        """Free the request's blocks and queue it again at the front; it is prefilled anew when it rejoins."""
        self.verifier.release(r.request_id)
        self.drafters.release(r.drafter)
        r.drafter, r.committed, r.hidden = None, None, None
        r.preemptions += 1
        self.scheduler.requeue(r)
