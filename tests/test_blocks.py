"""The block allocator, the prefix index, commit planning (golden values) and the paged cache's bookkeeping."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from specdec.errors import SpecdecError
from specdec.serving.block_allocator import BlockAllocator, KVBlocksExhausted, PrefixIndex
from verifiers.paged.cache import PagedKVCache
from verifiers.paged.commit_plan import CommitPlan, plan_commit, slot

# ---------------------------------------------------------------- allocator


def test_allocate_free_reuses_lowest_ids():
    a = BlockAllocator(num_blocks=5, block_size=4)
    assert a.allocate(3) == [0, 1, 2]
    assert a.free([1]) == [1]
    assert a.allocate(2) == [1, 3]
    assert a.num_free == 1


def test_ref_counts_free_only_at_zero():
    a = BlockAllocator(4, 4)
    blocks = a.allocate(2)
    a.share(blocks)
    a.share([blocks[0]])
    assert [a.ref_count(b) for b in blocks] == [3, 2]
    assert a.free(blocks) == []
    assert a.free(blocks) == [blocks[1]]
    assert a.free([blocks[0]]) == [blocks[0]]
    assert a.num_free == 4


def test_exhaustion_allocates_nothing_and_says_how_to_fix():
    a = BlockAllocator(3, 16)
    a.allocate(2)
    with pytest.raises(KVBlocksExhausted, match="need 2 free KV blocks but only 1 of 3.*num_blocks"):
        a.allocate(2)
    assert a.num_free == 1


def test_double_free_and_sharing_a_free_block_fail():
    a = BlockAllocator(2, 4)
    (b,) = a.allocate(1)
    a.free([b])
    with pytest.raises(SpecdecError, match="freed twice"):
        a.free([b])
    with pytest.raises(SpecdecError, match="not allocated"):
        a.share([b])


def test_blocks_for():
    a = BlockAllocator(2, 4)
    assert [a.blocks_for(n) for n in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]


# ---------------------------------------------------------------- prefix index


def test_prefix_index_matches_full_blocks_only_and_forgets():
    idx = PrefixIndex(block_size=2)
    idx.register([1, 2, 3, 4, 5], [7, 8, 9])  # two full blocks (7, 8); 9 holds a partial block
    assert idx.match([1, 2, 3, 4, 6, 6]) == [7, 8]
    assert idx.match([1, 2, 3, 9]) == [7]
    assert idx.match([2, 2]) == []
    assert idx.match([1]) == []  # no full block
    idx.forget([7])
    assert idx.match([1, 2, 3, 4]) == []  # a hit needs every earlier block


# ---------------------------------------------------------------- commit planning (golden values)


@pytest.mark.parametrize("table, bs, start, keep, expected", [
    # a chain fully kept: nothing moves, nothing released
    ([0, 1], 4, 3, [0, 1, 2], CommitPlan([], 6, [])),
    # only the root kept: the tree's extra block is released
    ([0, 1, 2], 4, 7, [0], CommitPlan([], 8, [2])),
    # a branch: nodes 0, 2, 3 at positions 5, 7, 8 -> 5, 6, 7 (slots through table [3, 6, 1])
    ([3, 6, 1], 4, 5, [0, 2, 3], CommitPlan([(6 * 4 + 3, 6 * 4 + 2), (1 * 4 + 0, 6 * 4 + 3)], 8, [1])),
    # block size 1: every position its own block
    ([9, 8, 7, 6], 1, 1, [0, 2], CommitPlan([(6, 7)], 3, [6])),
])
def test_plan_commit_golden(table, bs, start, keep, expected):
    assert plan_commit(table, bs, start, keep) == expected


def test_plan_commit_rejects_bad_keep():
    with pytest.raises(ValueError, match="ascending"):
        plan_commit([0], 4, 0, [0, 2, 1])
    with pytest.raises(ValueError, match="root"):
        plan_commit([0], 4, 0, [1])


@given(st.data())
def test_plan_commit_moves_kept_nodes_to_consecutive_positions(data):
    bs = data.draw(st.integers(1, 5))
    start = data.draw(st.integers(0, 12))
    n = data.draw(st.integers(1, 10))
    keep = [0] + sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=n - 1))) if n > 1 else [0]
    nblocks = -(-(start + n) // bs)
    table = data.draw(st.permutations(list(range(nblocks + 3))))[:nblocks]
    memory = {slot(table, bs, p): p for p in range(start + n)}  # slot -> which position's value it holds
    plan = plan_commit(table, bs, start, keep)
    for src, dst in plan.copies:
        memory[dst] = memory[src]
    assert [memory[slot(table, bs, p)] for p in range(start)] == list(range(start))  # prefix untouched
    assert [memory[slot(table, bs, start + i)] for i in range(len(keep))] == [start + k for k in keep]
    assert plan.length == start + len(keep)
    assert plan.release == table[-(-plan.length // bs):]


# ---------------------------------------------------------------- paged cache bookkeeping


def _cache(num_blocks=8, block_size=4, layers=2, share=True):
    return PagedKVCache(layers, num_kv_heads=2, head_dim=3, num_blocks=num_blocks, block_size=block_size,
                        dtype=torch.float64, share_prefixes=share)


def _fill(cache, seq, values):
    """Write ``values[i]`` (a scalar per position) at the reserved positions, every layer, K and V."""
    slots = cache.reserve(seq, len(values))
    kv = torch.tensor(values, dtype=torch.float64)[:, None, None].expand(len(values), 2, 3)
    for layer in range(len(cache.k)):
        cache.write(layer, slots, kv, -kv)
    return slots


def _read(cache, seq, layer=0):
    s = cache.seqs[seq]
    out = []
    for p in range(s.length):
        blk, off = s.blocks[p // cache.block_size], p % cache.block_size
        out.append(float(cache.k[layer][blk, 0, off, 0]))
        assert float(cache.v[layer][blk, 1, off, 2]) == -out[-1]
    return out


def test_reserve_commit_keeps_accepted_path_contiguous():
    c = _cache()
    c.add("a")
    _fill(c, "a", [10, 11, 12, 13, 14, 15])
    c.commit("a", range(6))
    _fill(c, "a", [20, 21, 22, 23, 24])  # a tree of 5 nodes at positions 6..10
    c.commit("a", [0, 2, 4])
    assert _read(c, "a") == [10, 11, 12, 13, 14, 15, 20, 22, 24]
    assert len(c.seqs["a"].blocks) == 3
    c.free("a")
    assert c.num_free_blocks == 8


def test_commit_releases_blocks_of_rejected_nodes():
    c = _cache(block_size=2)
    c.add("a")
    _fill(c, "a", [1, 2, 3])
    c.commit("a", range(3))
    _fill(c, "a", [4, 5, 6, 7, 8])  # positions 3..7: blocks grow to 4
    assert len(c.seqs["a"].blocks) == 4
    c.commit("a", [0])
    assert len(c.seqs["a"].blocks) == 2 and c.num_free_blocks == 6


def test_reserve_exhaustion_changes_nothing():
    c = _cache(num_blocks=3, block_size=2)
    c.add("a")
    _fill(c, "a", [1, 2, 3])
    c.commit("a", range(3))
    free, blocks = c.num_free_blocks, list(c.seqs["a"].blocks)
    with pytest.raises(KVBlocksExhausted):
        c.reserve("a", 5)
    assert c.num_free_blocks == free and c.seqs["a"].blocks == blocks and _read(c, "a") == [1, 2, 3]


def test_prefix_sharing_and_copy_on_write():
    c = _cache(num_blocks=10, block_size=2)
    prompt = [5, 6, 7, 8, 9]
    assert c.add("a", prompt) == 0
    _fill(c, "a", [50, 60, 70, 80, 90])
    c.commit("a", range(5))
    c.register_prefix("a", prompt)
    # b shares the two full blocks of the common prefix [5, 6, 7, 8] and recomputes nothing of it
    assert c.add("b", [5, 6, 7, 8, 1]) == 4
    assert c.seqs["b"].blocks == c.seqs["a"].blocks[:2]
    assert c.allocator.ref_count(c.seqs["a"].blocks[0]) == 2
    _fill(c, "b", [11])
    c.commit("b", [0])
    assert _read(c, "b") == [50, 60, 70, 80, 11]
    # a fork shares a's partial last block too; writing into it copies it first (a is unchanged)
    c.fork("a", "f")
    shared_last = c.seqs["a"].blocks[-1]
    _fill(c, "f", [99])
    c.commit("f", [0])
    assert c.seqs["f"].blocks[-1] != shared_last
    assert _read(c, "f") == [50, 60, 70, 80, 90, 99] and _read(c, "a") == [50, 60, 70, 80, 90]
    for s in ("a", "b", "f"):
        c.free(s)
    assert c.num_free_blocks == 10
    assert c.add("c", prompt) == 0  # freed blocks left the prefix index


def test_no_sharing_when_disabled():
    c = _cache(share=False, block_size=2)
    c.add("a", [1, 2, 3])
    _fill(c, "a", [1, 2, 3])
    c.commit("a", range(3))
    c.register_prefix("a", [1, 2, 3])
    assert c.add("b", [1, 2, 3]) == 0


def test_commit_needs_reserved_positions():
    c = _cache()
    c.add("a")
    with pytest.raises(SpecdecError, match="reserved"):
        c.commit("a", [0])
    with pytest.raises(SpecdecError, match="already"):
        c.add("a")
