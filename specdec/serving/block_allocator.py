"""The KV block allocator: fixed-size block ids with reference counts; knows nothing about tensors.

A sequence's KV lives in blocks of ``block_size`` positions, listed in its **block table**. A block shared by several
sequences (a common prompt prefix, a forked sequence) has a reference count > 1 and is freed when the last one
lets go; a sequence that must write into a shared block copies it first (copy-on-write, done by the paged cache).

:class:`PrefixIndex` remembers which live blocks hold which full blocks of prompt tokens, so a request whose prompt
starts like a running one's reuses those blocks instead of recomputing and storing them again.

>>> a = BlockAllocator(num_blocks=4, block_size=16)
>>> a.allocate(2), a.num_free
([0, 1], 2)
>>> a.share([0])
>>> a.free([0, 1])   # block 1 goes back; block 0 still has a holder
[1]
>>> a.num_free, a.ref_count(0)
(3, 1)
"""

from __future__ import annotations

from collections.abc import Sequence

from specdec.errors import SpecdecError


class KVBlocksExhausted(SpecdecError):
    """Not enough free KV blocks for a request; the message says how many were needed and how to get more.

    needed / free / total / block_size: the sizes, for a caller that words its own message (one request)."""

    def __init__(self, message: str, needed: int = 0, free: int = 0, total: int = 0, block_size: int = 0) -> None:
        super().__init__(message)
        self.needed, self.free, self.total, self.block_size = needed, free, total, block_size


class BlockAllocator:
    """Hands out block ids ``0 .. num_blocks - 1``; lowest free id first, so runs are reproducible."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise SpecdecError(f"num_blocks and block_size must be >= 1; got {num_blocks} and {block_size}.")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._refs = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives the lowest id

    @property
    def num_free(self) -> int:
        return len(self._free)

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` positions."""
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks (reference count 1), or :class:`KVBlocksExhausted` and nothing allocated."""
        if n > len(self._free):
            raise KVBlocksExhausted(
                f"need {n} free KV blocks but only {len(self._free)} of {self.num_blocks} are free "
                f"(block_size={self.block_size}); raise verifier.num_blocks, lower max_batch_size or max_new_tokens.",
                needed=n, free=len(self._free), total=self.num_blocks, block_size=self.block_size)
        out = [self._free.pop() for _ in range(n)]
        for blk in out:
            self._refs[blk] = 1
        return out

    def share(self, blocks: Sequence[int]) -> None:
        """One more holder for each of ``blocks`` (all must be allocated)."""
        for blk in blocks:
            if self._refs[blk] <= 0:
                raise SpecdecError(f"block {blk} is not allocated; only live blocks can be shared.")
            self._refs[blk] += 1

    def free(self, blocks: Sequence[int]) -> list[int]:
        """Drop one holder of each block; returns the blocks that went back to the pool."""
        released = []
        for blk in blocks:
            if self._refs[blk] <= 0:
                raise SpecdecError(f"block {blk} freed twice (its reference count is already 0).")
            self._refs[blk] -= 1
            if self._refs[blk] == 0:
                released.append(blk)
        if released:
            self._free.extend(released)
            self._free.sort(reverse=True)
        return released


class PrefixIndex:
    """Full blocks of prompt tokens -> the live block holding their KV, keyed by the whole prefix up to that block.

    Block ``i``'s key is the whole token prefix up to its end, so a hit means every earlier token matched too
    (exact: no hash collisions can alias two prompts). Entries vanish when their block is freed (``forget``).
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._by_key: dict[tuple, int] = {}
        self._key_of: dict[int, tuple] = {}

    def _keys(self, tokens: Sequence[int]) -> list[tuple]:
        tokens = tuple(tokens)
        return [tokens[:end] for end in range(self.block_size, len(tokens) + 1, self.block_size)]

    def match(self, tokens: Sequence[int]) -> list[int]:
        """The live blocks holding the longest run of ``tokens``' full leading blocks (possibly empty)."""
        out = []
        for key in self._keys(tokens):
            blk = self._by_key.get(key)
            if blk is None:
                break
            out.append(blk)
        return out

    def register(self, tokens: Sequence[int], blocks: Sequence[int]) -> None:
        """Record that ``blocks[i]`` holds the KV of ``tokens``' i-th full block (for as many as both have)."""
        for key, blk in zip(self._keys(tokens), blocks):
            if key not in self._by_key and blk not in self._key_of:
                self._by_key[key] = blk
                self._key_of[blk] = key

    def forget(self, blocks: Sequence[int]) -> None:
        """Drop entries of blocks that were freed (or are about to be overwritten)."""
        for blk in blocks:
            key = self._key_of.pop(blk, None)
            if key is not None:
                del self._by_key[key]
