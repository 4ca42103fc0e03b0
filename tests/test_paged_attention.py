"""Paged tree attention (torch reference, fused SDPA, the C++ kernel) == dense SDPA with the same mask, over random trees, block sizes, GQA
ratios and prefix lengths; and the stale-memory case (blocks holding leftovers must not leak into the result)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from specdec.algorithms.tree import ancestor_mask
from verifiers.paged import cpu_kernel
from verifiers.paged.kernels import (
    dense_reference,
    gather_prefix,
    in_place_mask,
    paged_tree_attention_sdpa,
    paged_tree_attention_torch,
)


def write_in_place(key, value, k_pool, v_pool, block_tables, prefix_lens):
    """What the paged verifier does before an in-place kernel: the new tokens' K/V written to the pool right after
    each prefix (on copies, stored KV-head major as the cache keeps them; fresh blocks appended where the tables
    end). Returns the pools and tables."""
    b, hkv, n, d = key.shape
    bs = k_pool.shape[2]
    width = max(-(-(int(p) + n) // bs) for p in prefix_lens)
    extra = b * width

    def grown(pool):
        storage = torch.cat([pool, torch.zeros(extra, hkv, bs, d, dtype=pool.dtype)]).transpose(0, 1).contiguous()
        return storage.transpose(0, 1)  # [num_blocks, H_kv, bs, D] over [H_kv, num_blocks, bs, D] storage

    k_pool, v_pool = grown(k_pool), grown(v_pool)
    fresh = iter(range(k_pool.shape[0] - extra, k_pool.shape[0]))
    tables = torch.tensor([[int(block_tables[i, j]) if j < block_tables.shape[1] and j * bs < int(prefix_lens[i])
                            else next(fresh) for j in range(width)] for i in range(b)])
    for i in range(b):
        pos = torch.arange(int(prefix_lens[i]), int(prefix_lens[i]) + n)
        blocks, offsets = tables[i, pos // bs], pos % bs
        k_pool[blocks, :, offsets] = key[i].transpose(0, 1)
        v_pool[blocks, :, offsets] = value[i].transpose(0, 1)
    return k_pool, v_pool, tables


def sdpa_in_place(query, key, value, k_pool, v_pool, block_tables, prefix_lens, tree_mask, scale, window=None,
                  softcap=None):
    """:func:`paged_tree_attention_sdpa` called as the paged verifier does: K/V written first, then the whole
    mask."""
    k_pool, v_pool, tables = write_in_place(key, value, k_pool, v_pool, block_tables, prefix_lens)
    mask = in_place_mask(prefix_lens, tree_mask, tables.shape[1] * k_pool.shape[2], query.shape[1] // key.shape[1],
                         window)
    return paged_tree_attention_sdpa(query, k_pool, v_pool, tables, mask, scale, softcap)


def cpp_in_place(query, key, value, k_pool, v_pool, block_tables, prefix_lens, tree_mask, scale, window=None,
                 softcap=None):
    """The C++ kernel as the paged verifier calls it: K/V written first, every (request, node) one packed row."""
    if not cpu_kernel.available():
        pytest.skip(f"the C++ kernel could not be built here: {cpu_kernel.failure()}")
    k_pool, v_pool, tables = write_in_place(key, value, k_pool, v_pool, block_tables, prefix_lens)
    b, h, n, d = query.shape
    rows = query.transpose(1, 2).reshape(b * n, h, d)
    out = cpu_kernel.paged_tree_attention_cpp(rows, k_pool, v_pool, torch.arange(b).repeat_interleave(n),
                                              torch.arange(n).repeat(b), tables, prefix_lens, tree_mask, scale,
                                              window, softcap)
    return out.view(b, n, h, d)


CPU_KERNELS = [paged_tree_attention_torch, sdpa_in_place, cpp_in_place]


def random_parents(g: torch.Generator, n: int, dead: int) -> list[int]:
    """A random tree of ``n`` nodes (parent < own index) followed by ``dead`` padding nodes."""
    live = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]
    return live + [-2] * dead


def make_case(seed: int, b: int, hkv: int, group: int, n: int, d: int, bs: int, prefix: list[int],
              dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = hkv * group
    max_blocks = max(1, max(-(-p // bs) for p in prefix))
    num_blocks = b * max_blocks + 3
    perm = torch.randperm(num_blocks, generator=g)[: b * max_blocks].view(b, max_blocks)  # non-contiguous tables
    q = torch.randn(b, n, h, d, generator=g, dtype=dtype).transpose(1, 2)  # non-contiguous, as in the model
    k = torch.randn(b, n, hkv, d, generator=g, dtype=dtype).transpose(1, 2)
    v = torch.randn(b, n, hkv, d, generator=g, dtype=dtype).transpose(1, 2)
    kp = torch.randn(num_blocks, hkv, bs, d, generator=g, dtype=dtype)
    vp = torch.randn(num_blocks, hkv, bs, d, generator=g, dtype=dtype)
    parents = torch.tensor([random_parents(g, n - (i % 2), i % 2) for i in range(b)])
    return q, k, v, kp, vp, perm, torch.tensor(prefix), ancestor_mask(parents), d ** -0.5


@pytest.mark.parametrize("kernel", CPU_KERNELS, ids=["torch", "sdpa", "cpp"])
@given(seed=st.integers(0, 10_000), b=st.integers(1, 3), hkv=st.integers(1, 3), group=st.sampled_from([1, 3]),
       n=st.integers(2, 9), bs=st.sampled_from([1, 2, 4, 16]), data=st.data())
def test_cpu_kernels_equal_dense_sdpa(kernel, seed, b, hkv, group, n, bs, data):
    prefix = data.draw(st.lists(st.integers(0, 40), min_size=b, max_size=b))
    case = make_case(seed, b, hkv, group, n, 8, bs, prefix)
    got = kernel(*case)
    want = dense_reference(*case)
    assert got.shape == (b, n, hkv * group, 8)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel", CPU_KERNELS, ids=["torch", "sdpa", "cpp"])
def test_chain_without_prefix_is_causal_attention(kernel):
    q, k, v, kp, vp, table, _, _, scale = make_case(0, 1, 3, 3, 6, 16, 4, [0])
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None]
    got = kernel(q, k, v, kp, vp, table, torch.tensor([0]), causal, scale)
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                                            is_causal=True, scale=scale).transpose(1, 2)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kernel", CPU_KERNELS, ids=["torch", "sdpa", "cpp"])
def test_positions_past_the_prefix_are_ignored(kernel):
    """Leftover values in a sequence's last block (past its length) or in padding table entries change nothing."""
    case = list(make_case(1, 2, 2, 3, 5, 8, 4, [6, 3]))
    before = kernel(*case)
    kp, vp, table = case[3].clone(), case[4].clone(), case[5]
    for b, length in enumerate([6, 3]):
        for p in range(length, table.shape[1] * 4):
            kp[table[b, p // 4], :, p % 4] = 1e3
            vp[table[b, p // 4], :, p % 4] = -1e3
    case[3], case[4] = kp, vp
    torch.testing.assert_close(kernel(*case), before)


def test_gather_prefix_orders_blocks_by_table():
    pool = torch.arange(4 * 1 * 2 * 1, dtype=torch.float32).view(4, 1, 2, 1)  # block i holds 2i, 2i+1
    got = gather_prefix(pool, torch.tensor([[3, 0], [1, 2]]))
    assert got[..., 0].tolist() == [[[6, 7, 0, 1], [2, 3, 4, 5]]]  # [H_kv=1, B=2, P=4]


@pytest.mark.parametrize("kernel", CPU_KERNELS, ids=["torch", "sdpa", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision_dtypes(kernel, dtype):
    case = make_case(3, 2, 3, 3, 7, 64, 16, [20, 33], dtype=dtype)
    got = kernel(*case)
    assert got.dtype == dtype
    want = dense_reference(*[c.double() if isinstance(c, torch.Tensor) and c.is_floating_point() else c for c in case])
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("kernel", CPU_KERNELS, ids=["torch", "sdpa", "cpp"])
@given(seed=st.integers(0, 10_000), b=st.integers(1, 3), group=st.sampled_from([1, 3]), n=st.integers(2, 9),
       bs=st.sampled_from([1, 4, 16]), window=st.integers(1, 20), softcap=st.sampled_from([None, 0.7, 5.0]),
       data=st.data())
def test_sliding_window_and_softcap(kernel, seed, b, group, n, bs, window, softcap, data):
    """A layer's sliding window (by position: a node's is prefix + depth) and logit softcapping, against dense
    attention with the window applied by explicit positions."""
    prefix = data.draw(st.lists(st.integers(0, 40), min_size=b, max_size=b))
    case = make_case(seed, b, 2, group, n, 8, bs, prefix)
    torch.testing.assert_close(kernel(*case, window, softcap), dense_reference(*case, window, softcap),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel", CPU_KERNELS, ids=["torch", "sdpa", "cpp"])
def test_window_hides_what_it_should(kernel):
    """Window 3 on a chain after a 10-token prefix: node i (position 10 + i) sees positions 8 + i .. 10 + i only,
    so values outside it change nothing, and without the window they do."""
    case = list(make_case(2, 1, 1, 1, 4, 8, 4, [10]))
    case[7] = torch.ones(4, 4, dtype=torch.bool).tril()[None]
    before = kernel(*case, 3)
    kp, vp = case[3].clone(), case[4].clone()
    for p in range(8):  # positions no node's window reaches (node 0 sees 8, 9, 10)
        kp[case[5][0, p // 4], :, p % 4] = 5.0
        vp[case[5][0, p // 4], :, p % 4] = 1e3
    case[3], case[4] = kp, vp
    torch.testing.assert_close(kernel(*case, 3), before)
    assert not torch.allclose(kernel(*case), before)


@pytest.mark.parametrize("d", [16, 64, 80, 96, 128])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_cpp_float32_route_equals_dense(d, group):
    """The C++ kernel's AVX-512 float32 route (head dims a multiple of 16: keys four at a time, sums in registers)
    against dense attention, prefixes of every length mod 4 and trees with padding."""
    case = make_case(5 + d + group, 3, 2, group, 7, d, 16, [0, 21, 38], dtype=torch.float32)
    want = dense_reference(*[c.double() if isinstance(c, torch.Tensor) and c.is_floating_point() else c for c in case])
    torch.testing.assert_close(cpp_in_place(*case).double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hkv, group", [(3, 3), (1, 4), (2, 2)])
def test_cpp_rows_bits_do_not_depend_on_threads_or_work_split(hkv, group):
    """The C++ kernel cuts its work by KV head, by runs of a request's rows and, when that leaves fewer items than
    twice the threads (one row of 3 KV heads over 2 threads), by query heads: each row's result is bitwise the same
    on one thread or four, alone or with its tree (what greedy speculation's losslessness rests on)."""
    if not cpu_kernel.available():
        pytest.skip(f"the C++ kernel could not be built here: {cpu_kernel.failure()}")
    case = make_case(11 + hkv + group, 2, hkv, group, 6, 64, 16, [37, 90], dtype=torch.float32)
    q, k, v, kp, vp, tables, prefix, mask, scale = case
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            outs.append(cpp_in_place(*case))
            # the first request's root alone: one row, the fewest work items
            alone = cpp_in_place(q[:1, :, :1], k[:1, :, :1], v[:1, :, :1], kp, vp, tables[:1], prefix[:1],
                                 mask[:1, :1, :1], scale)
            assert torch.equal(alone[0, 0], outs[0][0, 0]), threads
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(o, outs[0]) for o in outs)
