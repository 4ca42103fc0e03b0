"""The decode driver: one request or many, one verify forward per step, continuous batching.

Every request runs here, a single ``generate()`` as a batch of one: admission (does it fit), the step, stopping,
statistics and finishing are this module's, once. Each step: admit waiting requests (prefill each), let every running request's own drafter propose its own tree,
verify all trees in **one** target forward (padded to one node budget with dead nodes), then per request apply the
acceptance rule, commit its accepted path in the paged KV cache, feed its drafter and check its stopping. A
finished request leaves at once and frees its KV blocks; a waiting one takes its place at the next step.

Per request the output equals that request decoded alone (greedy, float32: token for token), whatever the batch
around it, the arrival order, or preemptions (see :mod:`specdec.serving.scheduler`).

>>> engine = BatchEngine(verifier, drafters, rule, max_nodes=8, max_batch_size=4)   # doctest: +SKIP
>>> rid = engine.add(input_ids, max_new_tokens=64, stopper=Stopper(...))            # doctest: +SKIP
>>> with engine:                                                                    # doctest: +SKIP
...     while not engine.done: events = engine.step()

:func:`decode` is the same driver as a generator of one request's verify steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from specdec.algorithms.acceptance import AcceptanceRule, is_argmax
from specdec.algorithms.adaptive import AdaptiveBudget
from specdec.algorithms.sampling import SamplingParams
from specdec.algorithms.step import Drafted, RequestDecoding, Step, finish_draft, skipped
from specdec.algorithms.stopping import Stopper
from specdec.errors import ConfigError, SpecdecError
from specdec.protocols import BatchDrafter, Drafter, Verifier, successors_wanted
from specdec.serving.block_allocator import KVBlocksExhausted
from specdec.serving.scheduler import Scheduler
from specdec.types import GenerationStats, HiddenSpec, VerifyOutput


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
    started: float | None = None
    # while running: its decoding state (drafter, committed tokens, hidden states) and this step's draft
    decoding: RequestDecoding | None = None
    drafted: Drafted | None = None


@dataclass(frozen=True)
class Event:
    """What one step did for one request: the tokens it emitted (after stopping cuts), whether it finished, and
    the verify step itself (None for a request refused before a step)."""

    request_id: int
    new_tokens: list[int]
    finished: bool
    finish_reason: str | None = None
    step: Step | None = None


def blocks_to_admit(verifier: Verifier, context_len: int, max_nodes: int) -> int:
    """KV blocks a request of ``context_len`` tokens (prompt and what it generated) needs to run a step: its prefill
    (all but the root) and one tree of ``max_nodes`` nodes. The one answer to "does it fit", for admission and for a
    request checked before it runs."""
    return verifier.blocks_for(context_len - 1 + max_nodes)


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
        """The request is over (finished, failed or preempted): its drafter is reset now, so that what it keeps
        beyond the request (a suffix cache or recycling table with a file) is written when the request ends, not
        when the drafter next serves one."""
        drafter.reset()
        self.free.append(drafter)


class BatchEngine:
    """Runs requests through a :class:`~specdec.protocols.Verifier` with continuous batching (a verifier without
    ``capabilities.batching`` serves ``max_batch_size=1``: one request at a time, the rest queued).

    preemption: what to do when a running request's next tree finds no free KV blocks (the engine's policy, see
    :mod:`specdec.serving.scheduler`): ``recompute`` (preempt the newest request, redo it later) or ``refuse``
    (end the request that ran out, keeping its tokens); a request running alone is always refused (nothing to
    preempt). needs_hidden: the drafters read the target's hidden states. successors: the top-k of the target's
    next tokens at every node the drafters read (:class:`~specdec.protocols.SuccessorDrafter`; 0: none): the verifier
    then returns logits even for greedy requests, and their top-k go to each drafter's feedback. Used as a context
    manager (or with :meth:`close`), the engine releases whatever its requests still hold when the block ends,
    however it ends.
    """

    def __init__(self, verifier: Verifier, drafters: DrafterPool, rule: AcceptanceRule, *, max_nodes: int,
                 max_batch_size: int, sampling: SamplingParams | None = None, needs_hidden: HiddenSpec = False,
                 preemption: str = "recompute", successors: int = 0) -> None:
        if max_batch_size > 1 and not verifier.capabilities.batching:
            raise ConfigError(f"{type(verifier).__name__} serves one request at a time; use max_batch_size=1 or a "
                              "verifier that serves batches (verifier='paged').")
        self.verifier = verifier
        self.drafters = drafters
        self.rule = rule
        self.max_nodes = max_nodes
        self.sampling = sampling or SamplingParams()
        self.needs_hidden = needs_hidden
        self.successors = successors
        self.argmax_only = is_argmax(rule, self.sampling)
        self.scheduler = Scheduler(max_batch_size, preemption)
        self.requests: dict[int, Request] = {}

    @property
    def done(self) -> bool:
        return self.scheduler.done

    def __enter__(self) -> BatchEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release every running request's KV and drafter (a run that failed or was abandoned midway); the
        requests stay as they are (unfinished). Finished requests released theirs already."""
        for r in list(self.scheduler.running):
            self.verifier.release(r.request_id)
            if r.decoding is not None:
                self.drafters.release(r.decoding.drafter)
            r.decoding, r.drafted = None, None

    def fits(self, input_ids: torch.Tensor) -> None:
        """Raise :class:`KVBlocksExhausted` (losing nothing) when a request of ``input_ids [1, T]`` could not run
        even alone in this engine's KV cache: the check :meth:`step` makes when it would admit it."""
        need, total = blocks_to_admit(self.verifier, input_ids.shape[1], self.max_nodes), self.verifier.num_blocks
        if need > total:
            raise KVBlocksExhausted(_too_large(input_ids.shape[1], need, total), needed=need, total=total)

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
            if self.scheduler.waiting and not events:  # nothing runs, nothing could start: never spin
                v, r = self.verifier, self.scheduler.waiting[0]
                raise SpecdecError(
                    f"request {r.request_id} needs {self._blocks_to_admit(r)} KV blocks but only {v.num_free_blocks} of {v.num_blocks} are free while no request of this "
                    "batch holds any: blocks are held outside it (a request not released on this verifier); "
                    "release it, or build the verifier anew.")
            return events
        self._draft(running)
        out, running = self._score(running, events)
        if not running:
            return events
        # the greedy rule reads only each node's argmax: from the verifier's screened head, or one argmax over every
        # request's tree, not one per request
        greedy = (out.greedy if out.greedy is not None else out.logits.argmax(dim=-1)) if self.argmax_only else None
        # what the drafters recycle: the top-k at every node, from the logits a greedy step asked for too (_score)
        topk = out.logits.topk(self.successors, dim=-1).indices if self.successors else None  # [B, N, k]
        for i, r in enumerate(running):
            hidden = None if out.hidden is None else out.hidden[i:i + 1]
            top = None if topk is None else topk[i:i + 1]
            row = VerifyOutput(logits=None, hidden=hidden, greedy=greedy[i:i + 1, :r.drafted.tree.num_nodes],
                               topk=top) \
                if greedy is not None else VerifyOutput(logits=out.logits[i:i + 1], hidden=hidden, topk=top)
            events.append(self._settle(r, row))
        return events

    # --- the parts of a step ---------------------------------------------------------------------------------

    def _draft(self, running: list[Request]) -> None:
        """Each running request's tree for this step: in one call for the whole batch when its drafters draft
        together (:class:`~specdec.protocols.BatchDrafter`, greedy requests), else request by request."""
        rows = len(running) - 1  # the rows the other requests put in the step
        first, drafters = running[0].decoding.drafter, [r.decoding.drafter for r in running]
        if not (self.argmax_only and len(running) > 1 and isinstance(first, BatchDrafter) and first.batched
                and all(first.batches_with(d) for d in drafters)):
            for r in running:
                r.drafted = r.decoding.draft(self.max_nodes, batch_rows=rows)
            return
        ctxs = [r.decoding.context(self.max_nodes, batch_rows=rows) for r in running]
        drafting = []  # the requests whose budget gives them draft nodes; the others skip the drafter
        for r, ctx in zip(running, ctxs):
            if r.decoding.skips(ctx):
                r.drafted = skipped(ctx)
            else:
                drafting.append((r, ctx))
        if not drafting:
            return
        start = time.perf_counter()
        trees = first.propose_batch([r.decoding.drafter for r, _ in drafting], [ctx for _, ctx in drafting])
        ms = 1000 * (time.perf_counter() - start) / len(drafting)  # each request's share of the batch's drafting
        for (r, ctx), tree in zip(drafting, trees):
            r.drafted = finish_draft(tree, ctx, ms, r.decoding.budget, batch_rows=rows)

    def _admit(self) -> list[Event]:
        v, need = self.verifier, self._blocks_to_admit
        admitted, too_large = self.scheduler.admit(v.num_free_blocks, v.num_blocks, need)
        events = [self._refuse(r, f"request {r.request_id}: " + _too_large(self._context(r).shape[1], need(r),
                                                                           v.num_blocks), queued=True)
                  for r in too_large]
        for r in admitted:
            context = self._context(r)
            r.decoding = RequestDecoding(self.drafters.acquire(), self.rule, context, prompt_len=r.prompt.shape[1],
                                         remaining=r.max_new_tokens - len(r.tokens), sampling=self.sampling,
                                         generator=r.generator, budget=r.budget)
            r.started = r.started or time.perf_counter()
            try:
                r.decoding.hidden = self.verifier.start(r.request_id, context[:, :-1], output_hidden=self.needs_hidden)
            except KVBlocksExhausted:  # admission counted blocks without prefix sharing; this is a safety net
                self._preempt(r)
        return events

    def _blocks_to_admit(self, r: Request) -> int:
        """KV blocks a waiting request needs to join (:func:`blocks_to_admit`)."""
        return blocks_to_admit(self.verifier, self._context(r).shape[1], self.max_nodes)

    def _context(self, r: Request) -> torch.Tensor:
        """``[1, T + generated]``: what a (re-)admitted request is prefilled with."""
        new = torch.tensor([r.tokens], dtype=r.prompt.dtype, device=r.prompt.device)
        return torch.cat([r.prompt, new], dim=1)

    def _score(self, running: list[Request], events: list[Event]) -> tuple[VerifyOutput | None, list[Request]]:
        """One verify forward over the running requests' drafted trees; out of KV blocks, preempt or refuse (by
        policy) until the rest fits. Returns the output and the requests it covers, in its row order."""
        while True:
            try:
                ids, trees = [r.request_id for r in running], [r.drafted.tree for r in running]
                return self.verifier.score(ids, trees, output_hidden=self.needs_hidden,
                                           greedy=self.argmax_only and not self.successors), running
            except KVBlocksExhausted as e:
                failing = self.requests[e.request_id]
                if self.scheduler.policy == "refuse" or len(running) == 1:
                    victim = failing
                    events.append(self._refuse(victim, _ran_out(victim, e)))
                else:
                    victim = self.scheduler.victim()
                    self._preempt(victim)
                running = [r for r in running if r is not victim]
                if not running:
                    return None, []

    def _settle(self, r: Request, out: VerifyOutput) -> Event:
        """Accept -> commit -> observe (:meth:`RequestDecoding.settle`), then stopping and statistics."""
        step = r.decoding.settle(r.drafted, out, lambda acc: self.verifier.commit(r.request_id, acc.accepted_nodes(0)))
        kept, reason = r.stopper.cut(step.new_tokens)
        r.stats.record(drafted=int(step.tree.num_draft_nodes[0]), accepted=int(step.acceptance.num_accepted[0]))
        r.tokens.extend(kept)
        if reason is not None:
            self._finish(r, reason)
        return Event(r.request_id, kept, reason is not None, reason, step)

    # --- leaving the batch -----------------------------------------------------------------------------------

    def _finish(self, r: Request, reason: str) -> None:
        r.finish_reason = reason
        r.stats.finish_reason = reason
        r.stats.new_tokens = len(r.tokens)
        r.stats.wall_time_s = time.perf_counter() - (r.started or time.perf_counter())
        self.verifier.release(r.request_id)
        if r.decoding is not None:
            self.drafters.release(r.decoding.drafter)
        r.decoding, r.drafted = None, None
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
        self.drafters.release(r.decoding.drafter)
        r.decoding, r.drafted = None, None
        r.preemptions += 1
        self.scheduler.requeue(r)


def _too_large(context_len: int, need: int, total: int) -> str:
    return (f"the prompt ({context_len} tokens) and one draft tree need {need} KV blocks but the cache has {total}; "
            "raise verifier.num_blocks (or block_size), lower max_nodes, or shorten the prompt.")


def _ran_out(r: Request, e: KVBlocksExhausted) -> str:
    return (f"request {r.request_id} ran out of KV blocks after {len(r.tokens)} new tokens (its next tree needs "
            f"{e.needed} more blocks of {e.block_size} positions; {e.free} of the {e.total} are free); raise "
            "verifier.num_blocks or lower max_new_tokens.")


def decode(verifier: Verifier, drafter: Drafter, rule: AcceptanceRule, input_ids: torch.Tensor, *,
           max_new_tokens: int, max_nodes: int, sampling: SamplingParams | None = None,
           generator: torch.Generator | None = None, budget: AdaptiveBudget | None = None,
           stopper: Stopper | None = None) -> Iterator[Step]:
    """Speculatively decode one request from ``input_ids [1, T]``: the engine's driver as a generator of its verify
    steps (:class:`~specdec.algorithms.step.Step`: tree, acceptance, committed tokens), until ``max_new_tokens``
    tokens are committed or ``stopper`` (default: ``max_new_tokens`` only) stops it.

    The last prompt token is the first tree's root. A caller may stop iterating at any time (closing the generator):
    the verifier then releases the request, as it does when the request ends or fails. A request that runs out of KV
    blocks raises :class:`KVBlocksExhausted`.
    """
    stopper = stopper or Stopper(input_ids[0].tolist(), max_new_tokens)
    engine = BatchEngine(verifier, DrafterPool(_no_second_drafter, first=drafter), rule, max_nodes=max_nodes,
                         max_batch_size=1, sampling=sampling, needs_hidden=drafter.needs_hidden_states,
                         successors=successors_wanted(drafter))
    engine.fits(input_ids)
    rid = engine.add(input_ids, max_new_tokens=max_new_tokens, stopper=stopper, generator=generator, budget=budget)
    with engine:
        while not engine.done:
            for event in engine.step():
                if event.step is not None:
                    yield event.step
    r = engine.requests[rid]
    if r.finish_reason == "kv_exhausted":
        raise KVBlocksExhausted(r.error or "out of KV blocks")


def _no_second_drafter() -> Drafter:
    raise SpecdecError("decode() serves one request with the drafter it was given.")
