"""Which requests run in the next verify step: a FCFS queue, a batch-size cap and a KV-block budget (no tensors).

Continuous batching: a request joins the running batch as soon as there is a free batch slot and enough free KV
blocks for its prompt and one tree; a finished request leaves at once. When a running request cannot get the
blocks for its next tree, the **preemption policy** decides:

* ``recompute`` (default, as vLLM does): the most recently admitted running request is preempted — its blocks are
  freed, and it goes back to the front of the queue to be prefilled again (prompt + what it generated so far) when
  blocks free up. Greedy output is unchanged by this; the other requests never notice.
* ``refuse``: the request that ran out finishes now with ``finish_reason="kv_exhausted"`` and a clear error
  message; the tokens it already generated are kept, and every other request goes on.

A request that cannot fit even alone (prompt + one tree > the whole pool) is refused at admission either way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from specdec.errors import ConfigError

POLICIES = ("recompute", "refuse")


class Scheduler:
    """FCFS admission under ``max_batch_size`` and a block budget; picks preemption victims.

    Requests are any objects; the scheduler only orders them. ``blocks_to_admit(request)`` says how many free blocks
    a request needs to join (its prompt plus one tree).
    """

    def __init__(self, max_batch_size: int, policy: str = "recompute") -> None:
        if max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1; got {max_batch_size}.")
        if policy not in POLICIES:
            raise ConfigError(f"unknown preemption policy {policy!r}; choose one of {list(POLICIES)}.")
        self.max_batch_size = max_batch_size
        self.policy = policy
        self.waiting: deque = deque()
        self.running: list = []  # in admission order

    def add(self, request) -> None:
        self.waiting.append(request)

    def requeue(self, request) -> None:
        """A preempted request goes back to the front: it keeps its place ahead of later arrivals."""
        self.running.remove(request)
        self.waiting.appendleft(request)

    def finish(self, request) -> None:
        self.running.remove(request)

    def admit(self, free_blocks: int, total_blocks: int, blocks_to_admit: Callable) -> tuple[list, list]:
        """Move waiting requests into the batch while slots and blocks last (in order; no overtaking).

        Returns ``(admitted, too_large)``: the second are requests that need more blocks than the whole pool, to be
        refused with an error (they are removed from the queue).
        """
        admitted, too_large = [], []
        while self.waiting and len(self.running) < self.max_batch_size:
            need = blocks_to_admit(self.waiting[0])
            if need > total_blocks:
                too_large.append(self.waiting.popleft())
                continue
            if need > free_blocks:
                break
            free_blocks -= need
            request = self.waiting.popleft()
            self.running.append(request)
            admitted.append(request)
        return admitted, too_large

    def victim(self):
        """The request to preempt under ``recompute``: the most recently admitted one."""
        return self.running[-1]

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running
