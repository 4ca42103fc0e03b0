"""The Triton paged tree-attention kernel, run by Triton's CPU interpreter, against the torch reference and SDPA.

The interpreter is chosen when the kernel is jitted (``@triton.jit`` reads ``TRITON_INTERPRET``), and
:mod:`verifiers.paged.triton_kernel` jits lazily on the first call in each mode, so the autouse fixture below setting
``TRITON_INTERPRET=1`` around each test is enough, even though triton itself was imported long before (conftest ->
transformers -> torch._dynamo -> triton), and nothing leaks into other test modules.
"""

from __future__ import annotations

import math
import random
import sys

import pytest
import torch

pytest.importorskip("triton")

from specdec.algorithms.tree import ancestor_mask
from verifiers.paged import triton_kernel as TA
from verifiers.paged.kernels import dense_reference, paged_tree_attention_torch


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors: always the interpreter


def random_parents(gen: torch.Generator, b: int, n: int, *, chain: bool = False, dead: int = 0) -> torch.Tensor:
    """``[B, N]``: root -1, live node i's parent uniform in [0, i) (or i - 1 for a chain), last ``dead`` nodes -2."""
    rows = []
    for _ in range(b):
        row = [-1]
        for i in range(1, n):
            row.append(i - 1 if chain else int(torch.randint(0, i, (1,), generator=gen)))
        for i in range(max(1, n - dead), n):
            row[i] = -2
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def make_case(seed: int, *, h: int, hkv: int, n: int, d: int, block_size: int, prefix_lens: list[int],
              chain: bool = False, dead: int = 0, table_dtype=torch.int64, dtype=torch.float32):
    """Random inputs in the layouts a model produces: transposed (non-contiguous) q/k/v, a shuffled block table
    with a padding column, and a pool that is a slice of a wider one (non-contiguous too)."""
    gen = torch.Generator().manual_seed(seed)
    b = len(prefix_lens)
    query = torch.randn(b, n, h, d, generator=gen).to(dtype).transpose(1, 2)
    key = torch.randn(b, n, hkv, d, generator=gen).to(dtype).transpose(1, 2)
    value = torch.randn(b, n, hkv, d, generator=gen).to(dtype).transpose(1, 2)
    max_blocks = max(math.ceil(L / block_size) for L in prefix_lens) + 1  # + a padding column
    num_blocks = b * max_blocks + 3
    k_pool = torch.randn(num_blocks, hkv, block_size, d + 3, generator=gen).to(dtype)[..., :d]
    v_pool = torch.randn(num_blocks, hkv, block_size, d + 3, generator=gen).to(dtype)[..., :d]
    block_tables = torch.randperm(num_blocks, generator=gen)[: b * max_blocks].view(b, max_blocks).to(table_dtype)
    tree_mask = ancestor_mask(random_parents(gen, b, n, chain=chain, dead=dead))
    return (query, key, value, k_pool, v_pool, block_tables, torch.tensor(prefix_lens), tree_mask, d ** -0.5)


def check(args, out, atol=1e-5, window=None, softcap=None):
    b, h, n, d = args[0].shape
    assert out.shape == (b, n, h, d) and out.dtype == args[0].dtype
    ref = paged_tree_attention_torch(*args, window, softcap)
    dense = dense_reference(*args, window, softcap)
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=0)
    torch.testing.assert_close(out.float(), dense.float(), atol=atol, rtol=0)


CASES = [  # (seed, h, hkv, n, d, block_size, prefix_lens, chain, dead)
    pytest.param(0, 2, 2, 7, 16, 4, [9, 0], False, 2, id="mha-bs4-prefix9and0-dead"),
    pytest.param(1, 6, 2, 5, 8, 8, [13, 21], False, 1, id="gqa3-bs8-d8"),
    pytest.param(2, 3, 1, 1, 16, 16, [0, 17], False, 0, id="gqa3-n1"),
    pytest.param(3, 2, 2, 6, 32, 32, [33, 5], True, 0, id="chain-bs32-d32"),
    pytest.param(4, 6, 2, 9, 64, 6, [20, 1], False, 3, id="gqa3-bs6-d64"),
    pytest.param(5, 3, 3, 40, 16, 16, [0, 0], False, 4, id="no-prefix-n40"),
    pytest.param(6, 3, 1, 64, 16, 8, [70, 3], False, 5, id="gqa3-n64-prefix70"),
]


@pytest.mark.parametrize("seed, h, hkv, n, d, block_size, prefix_lens, chain, dead", CASES)
def test_matches_references(seed, h, hkv, n, d, block_size, prefix_lens, chain, dead):
    args = make_case(seed, h=h, hkv=hkv, n=n, d=d, block_size=block_size, prefix_lens=prefix_lens, chain=chain,
                     dead=dead)
    check(args, TA.paged_tree_attention_triton(*args))


def test_random_configurations():
    """A seeded sweep: block sizes 4..32 (powers of two or not), GQA 1 and 3, D 8..64, N 1..64, prefixes 0..80."""
    rng = random.Random(1234)
    for seed in range(16):
        hkv = rng.choice([1, 2])
        n = rng.choice([1, 2, 3, 8, 13, 17, 31, 64])
        cfg = {"h": hkv * rng.choice([1, 3]), "hkv": hkv, "n": n, "d": rng.choice([8, 16, 32, 64]),
               "block_size": rng.choice([4, 5, 8, 16, 32]), "prefix_lens": [rng.randint(0, 80) for _ in range(2)],
               "chain": rng.random() < 0.25, "dead": rng.randint(0, n // 3)}
        args = make_case(100 + seed, **cfg)
        try:
            check(args, TA.paged_tree_attention_triton(*args))
        except AssertionError as e:
            raise AssertionError(f"configuration {cfg}: {e}") from e


def test_small_tiles_exercise_every_loop():
    """16-wide tiles: 3 row tiles (G*N = 3*14), 3 prefix tiles (L = 37), 1 tree tile; 4 row tiles for N = 20 with
    a dead node past the first tree tile and no prefix (its first tree tile is all masked)."""
    args = make_case(5, h=3, hkv=1, n=14, d=16, block_size=4, prefix_lens=[37, 10], dead=2)
    check(args, TA._launch(*args, block_m=16, block_p=16, block_n=16))
    args = make_case(6, h=2, hkv=1, n=20, d=8, block_size=5, prefix_lens=[0, 3], dead=3)
    check(args, TA._launch(*args, block_m=16, block_p=16, block_n=16))


def test_int32_tables_and_empty_table():
    args = make_case(7, h=2, hkv=1, n=4, d=16, block_size=4, prefix_lens=[6, 11], table_dtype=torch.int32)
    check(args, TA.paged_tree_attention_triton(*args))
    q, k, v, kp, vp, _, _, tm, scale = make_case(8, h=2, hkv=2, n=5, d=16, block_size=4, prefix_lens=[0])
    args = (q, k, v, kp, vp, torch.zeros(1, 0, dtype=torch.int64), torch.tensor([0]), tm, scale)
    check(args, TA.paged_tree_attention_triton(*args))


def test_causal_without_prefix_is_self_attention():
    q, k, v, kp, vp, bt, _, _, scale = make_case(9, h=2, hkv=2, n=6, d=16, block_size=4, prefix_lens=[0])
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None]
    out = TA.paged_tree_attention_triton(q, k, v, kp, vp, bt, torch.tensor([0]), causal, scale)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(1, 2)
    torch.testing.assert_close(out, sdpa, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2), (torch.float64, 1e-12)],
                         ids=["float16", "bfloat16", "float64"])
def test_other_dtypes(dtype, atol):
    """Output in the input dtype; compared with the float64 reference on the same (rounded) inputs."""
    args = make_case(10, h=6, hkv=2, n=9, d=32, block_size=8, prefix_lens=[19, 0], dtype=dtype, dead=2)
    out = TA.paged_tree_attention_triton(*args)
    assert out.dtype == dtype
    ref = paged_tree_attention_torch(*[a.double() if torch.is_tensor(a) and a.is_floating_point() else a
                                       for a in args])
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=0)


def test_available_under_interpreter(monkeypatch):
    assert TA.available()
    monkeypatch.setitem(sys.modules, "triton", None)  # as if triton were not installed
    assert not TA.available()


def test_cpu_tensors_without_interpreter_raise_clearly(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = make_case(11, h=2, hkv=1, n=3, d=16, block_size=4, prefix_lens=[5])
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        TA.paged_tree_attention_triton(*args)


def test_paged_verifier_with_triton_kernel_is_lossless():
    """End to end under the interpreter: batched decoding through the Triton kernel == greedy decoding alone."""
    import specdec
    from tests.conftest import get_tiny
    from tests.equality import assert_all_greedy_equal, greedy_ref

    target = get_tiny(0, dtype=torch.float32)
    prompts = [[5, 6, 7, 5, 6, 7, 5], [9, 10, 11, 12]]
    outs = specdec.generate(target, prompts, drafter="ngram", max_new_tokens=10, max_nodes=4,
                            verifier_kwargs={"kernel": "triton", "block_size": 4, "num_blocks": 16})
    assert_all_greedy_equal(outs, [greedy_ref(target, p, 10) for p in prompts])


@pytest.mark.parametrize("window, softcap", [(3, None), (1, None), (17, 0.8), (None, 2.0), (40, 30.0)])
def test_sliding_window_and_softcap(window, softcap):
    """A layer's window (by position: prefix + depth) and softcapping; small tiles so the prefix walk starts at a
    later tile and rows of one program reach different first positions."""
    args = make_case(11, h=6, hkv=2, n=9, d=16, block_size=4, prefix_lens=[37, 5, 0], dead=2)
    check(args, TA._launch(*args, window, softcap, block_m=16, block_p=16, block_n=16), window=window,
          softcap=softcap)
    check(args, TA.paged_tree_attention_triton(*args, window, softcap), window=window, softcap=softcap)
