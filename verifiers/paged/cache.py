"""The paged KV cache: per-layer block pools and one block table per sequence.

Pools are ``[num_blocks, H_kv, block_size, D]`` per layer for K and for V (views of KV-head-major storage; a block
holds ``block_size`` positions of each KV head contiguously, so a kernel reads one ``[block_size, D]`` tile per head).
Block ids come from a :class:`~specdec.serving.block_allocator.BlockAllocator`; a sequence's table lists its blocks in
logical order.

Life of a sequence (``seq_id`` is any hashable):

1. ``add(seq_id, tokens)`` — reuses the live blocks that already hold the longest run of ``tokens``' full leading
   blocks (a shared system prompt), and returns how many tokens are cached that way;
2. ``reserve(seq_id, n)`` — room for ``n`` new positions after the cached ones, returning their slots; a shared block
   about to be written is copied first (copy-on-write); running out raises
   :class:`~specdec.serving.block_allocator.KVBlocksExhausted` and changes nothing;
3. the model writes K/V into those slots (``write``) and attends over the table;
4. ``commit(seq_id, keep)`` — keep the accepted nodes (:func:`verifiers.paged.commit_plan.plan_commit`), release
   the rest;
5. ``free(seq_id)`` — every block back (shared ones when their last holder lets go).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from specdec.errors import SpecdecError
from specdec.serving.block_allocator import BlockAllocator, PrefixIndex
from verifiers.paged.commit_plan import plan_commit


@dataclass
class SequenceKV:
    """One sequence's view of the cache: its blocks in logical order and how many positions hold committed KV."""

    blocks: list[int] = field(default_factory=list)
    length: int = 0  # positions 0 .. length-1 hold committed tokens' K/V
    reserved: int = 0  # positions length .. length+reserved-1 were handed out by the last reserve()


class PagedKVCache:
    """Block pools for ``num_layers`` layers and the block tables of the sequences using them."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device="cpu", share_prefixes: bool = True) -> None:
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.block_size = block_size
        self.index = PrefixIndex(block_size) if share_prefixes else None
        # stored [H_kv, num_blocks, block_size, D] (so gathering a batch's blocks per KV head is one copy), seen as
        # [num_blocks, H_kv, block_size, D]. Zeros, not empty: attention reads whole blocks and masks the unused
        # positions' scores, and a masked score times a NaN left in recycled memory would still be NaN
        shape = (num_kv_heads, num_blocks, block_size, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device).transpose(0, 1) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device).transpose(0, 1) for _ in range(num_layers)]
        self.device = torch.device(device)  # the pools': slot and block indices are made there
        self.seqs: dict[Hashable, SequenceKV] = {}

    # --- sequences -------------------------------------------------------------------------------------------

    def add(self, seq_id: Hashable, tokens: Sequence[int] = ()) -> int:
        """Start ``seq_id``; returns how many leading ``tokens`` are already cached in shared blocks."""
        if seq_id in self.seqs:
            raise SpecdecError(f"sequence {seq_id!r} is already in the KV cache; free it first.")
        shared = self.index.match(tokens) if self.index is not None else []
        self.allocator.share(shared)
        self.seqs[seq_id] = SequenceKV(blocks=list(shared), length=len(shared) * self.block_size)
        return self.seqs[seq_id].length

    def fork(self, src: Hashable, dst: Hashable) -> None:
        """``dst`` starts as a copy of ``src`` sharing all its blocks (copied on the first write)."""
        s = self.seqs[src]
        self.allocator.share(s.blocks)
        self.seqs[dst] = SequenceKV(blocks=list(s.blocks), length=s.length)

    def free(self, seq_id: Hashable) -> None:
        """Drop ``seq_id``; its blocks go back to the pool unless another sequence still holds them."""
        s = self.seqs.pop(seq_id)
        self._release(s.blocks)

    def length(self, seq_id: Hashable) -> int:
        return self.seqs[seq_id].length

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    # --- writing ---------------------------------------------------------------------------------------------

    def reserve(self, seq_id: Hashable, n: int) -> torch.Tensor:
        """Room for ``n`` positions after the cached ones; returns their physical slots ``[n]`` (int64).

        Allocates blocks as needed and copies any shared block in the range (copy-on-write). On
        :class:`~specdec.serving.block_allocator.KVBlocksExhausted` nothing changed.
        """
        s = self.seqs[seq_id]
        shared = self._shared_in_range(s, s.length, n)
        grow = max(0, self.allocator.blocks_for(s.length + n) - len(s.blocks))
        fresh = self.allocator.allocate(grow + len(shared))  # all or nothing
        for i, new in zip(shared, fresh[grow:]):
            old = s.blocks[i]
            for pool in (*self.k, *self.v):
                pool[new].copy_(pool[old])
            s.blocks[i] = new
            self._release([old])
        s.blocks.extend(fresh[:grow])
        s.reserved = n
        return self.slots(seq_id, s.length, n)

    def slots(self, seq_id: Hashable, start: int, n: int) -> torch.Tensor:
        """Physical slots ``[n]`` of logical positions ``start .. start+n-1``."""
        table = torch.tensor(self.seqs[seq_id].blocks, dtype=torch.long, device=self.device)
        pos = torch.arange(start, start + n, device=self.device)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def write(self, layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store ``key``/``value`` ``[M, H_kv, D]`` at physical ``slots [M]`` of ``layer``."""
        for pool, x in ((self.k[layer], key), (self.v[layer], value)):  # storage [H_kv, num_blocks, bs, D]
            flat = pool.transpose(0, 1).view(pool.shape[1], -1, pool.shape[3])  # [H_kv, num_blocks * bs, D]
            flat.index_copy_(1, slots, x.transpose(0, 1).to(pool.dtype))

    def commit(self, seq_id: Hashable, keep: Sequence[int]) -> None:
        """After a verify step written at ``length ..``: keep nodes ``keep`` (ascending, root 0) as the next
        consecutive positions, release blocks left holding nothing. ``keep = range(n)`` commits a whole chunk."""
        s = self.seqs[seq_id]
        if not keep or keep[-1] >= s.reserved:
            raise SpecdecError(f"commit keeps nodes {list(keep)} but only {s.reserved} positions were reserved.")
        plan = plan_commit(s.blocks, self.block_size, s.length, keep)
        if plan.copies:
            src = torch.tensor([c[0] for c in plan.copies], device=self.device)
            dst = torch.tensor([c[1] for c in plan.copies], device=self.device)
            sb, so = src // self.block_size, src % self.block_size
            db, do = dst // self.block_size, dst % self.block_size
            for pool in (*self.k, *self.v):
                pool[db, :, do] = pool[sb, :, so]  # gathers every source before writing: safe (see plan_commit)
        s.length, s.reserved = plan.length, 0
        del s.blocks[len(s.blocks) - len(plan.release):]
        self._release(plan.release)

    def register_prefix(self, seq_id: Hashable, tokens: Sequence[int]) -> None:
        """Offer ``seq_id``'s full blocks holding ``tokens`` (its cached leading tokens) to later requests."""
        if self.index is not None:
            s = self.seqs[seq_id]
            self.index.register(list(tokens)[:s.length], s.blocks)

    # --- reading ---------------------------------------------------------------------------------------------

    def block_tables(self, seq_ids: Sequence[Hashable]) -> torch.Tensor:
        """``[B, max_blocks]`` int64 tables of ``seq_ids``, padded with block 0 (masked by length)."""
        rows = [self.seqs[i].blocks for i in seq_ids]
        width = max((len(r) for r in rows), default=0)
        out = [r + [0] * (width - len(r)) for r in rows]
        return torch.tensor(out, dtype=torch.long, device=self.device).reshape(len(rows), width)

    # --- internals -------------------------------------------------------------------------------------------

    def _shared_in_range(self, s: SequenceKV, start: int, n: int) -> list[int]:
        """Indices into ``s.blocks`` of shared blocks that positions ``start .. start+n-1`` would write."""
        if n <= 0:
            return []
        first, last = start // self.block_size, (start + n - 1) // self.block_size
        return [i for i in range(first, min(last + 1, len(s.blocks))) if self.allocator.ref_count(s.blocks[i]) > 1]

    def _release(self, blocks: Sequence[int]) -> None:
        released = self.allocator.free(blocks)
        if self.index is not None:
            self.index.forget(released)
