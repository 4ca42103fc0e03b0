"""Serving many requests at once over the paged KV cache.

- :mod:`~specdec.serving.engine`: the continuous-batching engine (one verify forward per step for every running
  request; admission, preemption policy, stopping).
- :mod:`~specdec.serving.scheduler`: which requests run next (FCFS, batch-size cap, KV-block budget).
- :mod:`~specdec.serving.block_allocator`: KV blocks with reference counts and the prefix index (no tensors).
"""
