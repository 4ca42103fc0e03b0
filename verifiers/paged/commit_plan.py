"""The one clever step of a paged cache: which KV slots to keep or copy after an acceptance (pure functions).

A verify step writes its ``N`` tree nodes at logical positions ``start .. start + N - 1`` (node ``i`` at
``start + i``). The acceptance keeps the nodes ``keep`` (root first, ascending node indices). Afterwards the accepted
path must sit at consecutive logical positions ``start .. start + len(keep) - 1`` so the next step's prefix is
contiguous, and every other node's slot is free to be overwritten by the next tree.

Logical position ``p`` is physical slot ``block_table[p // block_size] * block_size + p % block_size`` of the
per-layer pools (viewed as ``[num_blocks * block_size, ...]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CommitPlan:
    """What to do to the cache after an acceptance.

    copies: ``(src_slot, dst_slot)`` physical slot pairs to copy, in order (no slot is read after being written);
    length: the sequence's new cached length; release: block ids at the end of the table that no longer hold any
    kept position (give them back to the allocator).
    """

    copies: list[tuple[int, int]]
    length: int
    release: list[int]


def slot(block_table: Sequence[int], block_size: int, position: int) -> int:
    """The physical slot of logical ``position``.

    >>> slot([7, 2], 4, 5)   # block 2, offset 1
    9
    """
    return block_table[position // block_size] * block_size + position % block_size


def plan_commit(block_table: Sequence[int], block_size: int, start: int, keep: Sequence[int]) -> CommitPlan:
    """Move kept tree nodes to consecutive positions after ``start``; release the blocks left with nothing kept.

    ``keep`` are node offsets, ascending, root (0) first. Since ``keep[i] >= i``, each copy's destination is at or
    before its source, and a destination is never a later copy's source, so copying in order is safe (and so is
    gathering every source first). Nodes already in place are not copied.

    >>> plan_commit([5, 3], 4, 2, [0, 2, 5])   # positions 2, 4, 7 -> 2, 3, 4
    CommitPlan(copies=[(12, 23), (15, 12)], length=5, release=[])
    >>> plan_commit([5, 3, 8], 4, 6, [0, 1])    # a chain whose first two nodes were kept: no copies
    CommitPlan(copies=[], length=8, release=[8])
    """
    if list(keep) != sorted(set(keep)) or (keep and keep[0] != 0):
        raise ValueError(f"keep must be ascending node offsets starting at the root (0); got {list(keep)}.")
    copies = []
    for i, node in enumerate(keep):
        if node != i:
            copies.append((slot(block_table, block_size, start + node), slot(block_table, block_size, start + i)))
    length = start + len(keep)
    used = -(-length // block_size)
    return CommitPlan(copies=copies, length=length, release=list(block_table[used:]))
