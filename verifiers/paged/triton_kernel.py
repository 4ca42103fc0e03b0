"""Tree attention over a paged KV cache: a Triton kernel computing :func:`paged_tree_attention_torch`.

Same function, same arguments as the plain-torch reference in :mod:`verifiers.paged.kernels`: every one of the
``N`` new tokens (tree nodes) of sequence ``b`` attends to

* the sequence's cached **prefix**, positions ``0 .. L_b - 1`` (``L_b = prefix_lens[b]``), where position ``p`` lives
  in KV block ``block_tables[b, p // block_size]`` at offset ``p % block_size``, and
* the **tree part**: the new tokens' own keys/values, where node ``i`` may see node ``j`` iff ``tree_mask[b, i, j]``
  (the diagonal is always allowed, so every row has at least one finite score),

through **one exact softmax** over both parts.

Algorithm
---------
One program handles one ``(sequence b, kv head, tile of query rows)``. Grouped-query attention is folded into the
rows: the ``G = H / H_kv`` query heads that share kv head ``k`` give ``G * N`` query rows, row ``r = g * N + i``
being head ``k * G + g`` at node ``i`` (the reference's row order). So K/V are read once per tile for all ``G``
heads and are never repeated in memory.

The program keeps, per query row, the running maximum ``m`` of the scores seen so far, the running sum
``l = sum(exp(s - m))`` and the running (unnormalised) output ``acc = sum(exp(s - m) * v)``, all in float32
(the "online softmax" of FlashAttention). A new tile of scores ``s`` updates them as::

    m_new = max(m, rowmax(s));  alpha = exp(m - m_new)
    l     = l * alpha + rowsum(exp(s - m_new))
    acc   = acc * alpha + exp(s - m_new) @ v_tile;  m = m_new

so after all tiles ``acc / l`` is exactly ``softmax(all scores) @ V`` — whatever order or grouping of tiles, which
is what lets the two parts be merged without ever materialising the concatenated score row:

1. **Prefix.** The positions ``0 .. L_b - 1`` are walked in tiles of ``BLOCK_P`` positions. Each position finds its
   physical block through the block table (``block_tables[b, p // block_size]``) and its offset inside it, so a
   tile may span several small blocks or part of a big one; only positions ``< L_b`` are loaded (only the
   ``ceil(L_b / block_size)`` blocks in use are ever touched), the rest of the last tile is masked to ``-inf``.
2. **Tree.** The new keys/values are walked in tiles of ``BLOCK_N`` nodes, scores masked by ``tree_mask``, folded
   into the same running ``(m, l, acc)``.

A sliding window (a query at position ``L_b + depth`` sees positions ``> L_b + depth - window``; depths are each
node's ancestor count, read from ``tree_mask`` on the host) masks both parts, and the prefix walk starts at the
first tile any of the program's rows can see. Softcapping (``c * tanh(s / c)``) is applied to the scaled scores
before masking.

Finally ``acc / l`` is written in the query's dtype to an output laid out ``[B, N, H, D]``. Scores are scaled by
``scale * log2(e)`` so the kernel can use ``exp2``. The running max starts at a large finite negative number
instead of ``-inf``, so a tile whose scores are all masked leaves the state unchanged instead of producing NaN.

``tl.dot`` needs every dimension to be >= 16, so ``D``, the row tile, ``BLOCK_P`` and ``BLOCK_N`` are padded to
powers of two >= 16 and the padding is masked on load (zeros) and on the scores (``-inf``). All inputs are read
through their strides, so the transposed (non-contiguous) query/key/value views a model produces work as they are.

Dtypes: float16 / bfloat16 (tensor-core dots, probabilities rounded to the input dtype before ``p @ v`` as in
FlashAttention), float32 (dots with ``input_precision="ieee"``, i.e. no TF32 rounding; matches the reference to
~1e-6) and, in the interpreter, float64. The interpreter cannot ``tl.dot`` bfloat16, so there bfloat16 tiles are
upcast to float32 after loading (compiled kernels keep bfloat16 dots).

Differences from the reference: the output is a contiguous ``[B, N, H, D]`` tensor (the reference returns a
transposed view of the same shape), and a row with no allowed key at all (impossible with a true diagonal) gives
zeros instead of NaN. ``prefix_lens[b] <= max_blocks * block_size`` is the caller's promise (not checked: it would
cost a device sync).

Triton is imported lazily: importing this module never fails; :func:`available` says whether the kernel can run
(a CUDA device, or ``TRITON_INTERPRET=1`` with CPU tensors — the interpreter is how CI tests it). The kernel is
built on first use, separately for the interpreter and compiled modes, so setting ``TRITON_INTERPRET`` after
``triton`` was imported (but before the first call) still takes effect.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch

_LOG2E = 1.4426950408889634
_KERNELS: dict[bool, object] = {}  # interpret mode -> the jitted kernel
triton = tl = _COMBINE_MAX = _COMBINE_SUM = _COMBINE_MIN = _capped = None  # set by _build_kernel (triton is imported lazily)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def available() -> bool:
    """Whether the Triton kernel can run here: triton is installed and either a CUDA device is visible or
    ``TRITON_INTERPRET=1`` is set (the interpreter then runs it on CPU tensors)."""
    try:
        if importlib.util.find_spec("triton") is None:
            return False
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] = None
        return False
    return _interpret() or torch.cuda.is_available()


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _tile(x: int, cap: int) -> int:
    """A power-of-two tile >= 16 (``tl.dot``'s minimum) covering ``x``, at most ``cap`` (unless 16 > cap)."""
    return max(16, min(cap, _next_pow2(x)))


def _build_kernel():
    """Define and jit the kernel (imports triton; called on first use).

    ``triton``/``tl`` and the two reduction combiners become module globals, where both Triton's compiler and its
    interpreter look the kernel's names up.

    Row max and row sum use ``tl.reduce`` with Triton's own combiners rather than ``tl.max``/``tl.sum``: those are
    ``@triton.jit`` library functions fixed as compiled-or-interpreted when ``triton.language`` is first imported,
    so under ``TRITON_INTERPRET=1`` set *after* that import (this project's tests: ``transformers`` imports
    ``torch._dynamo``, which imports triton) calling them fails, while ``tl.reduce`` is a builtin and the
    interpreter recognises these combiners by identity (fast numpy path). Same code as ``tl.max``/``tl.sum``
    when compiled.
    """
    global triton, tl, _COMBINE_MAX, _COMBINE_SUM, _COMBINE_MIN, _capped
    import triton
    import triton.language as tl

    @triton.jit
    def _combine_min(a, b):
        return tl.minimum(a, b)

    _COMBINE_MIN = _combine_min

    @triton.jit
    def _capped(s, qk_scale, softcap):
        """Raw scores -> scaled (and softcapped: ``softcap * tanh(s * scale / softcap)``) scores in log2 units;
        tanh written with exp, which both the compiler and the interpreter have."""
        if softcap > 0:
            x = s * (qk_scale / 1.4426950408889634) / softcap
            s = (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)) * softcap * 1.4426950408889634
        else:
            s = s * qk_scale
        return s

    _COMBINE_MAX = getattr(tl.standard, "_elementwise_max", None)
    _COMBINE_SUM = getattr(tl.standard, "_sum_combine", None)
    if _COMBINE_MAX is None or _COMBINE_SUM is None:  # a Triton without them: equivalent combiners of our own

        @triton.jit
        def _combine_max(a, b):
            return tl.maximum(a, b)

        @triton.jit
        def _combine_sum(a, b):
            return a + b

        _COMBINE_MAX, _COMBINE_SUM = _combine_max, _combine_sum

    @triton.jit
    def _paged_tree_attn_kernel(
        Q, K, V, KP, VP, BT, PL, TM, DEP, O,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_kpb, stride_kph, stride_kps, stride_kpd,
        stride_vpb, stride_vph, stride_vps, stride_vpd,
        stride_btb, stride_btn,
        stride_tmb, stride_tmi, stride_tmj,
        stride_depb,
        stride_ob, stride_on, stride_oh, stride_od,
        qk_scale,  # scale * log2(e)
        softcap,  # logit softcapping (0: none), in score units before the log2(e) factor
        window,  # sliding window in positions (0: none)
        N, G, D, BS,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1).to(tl.int64)
        pid_m = tl.program_id(2)

        # ---- this tile's query rows: row r = g * N + i  (head kvh * G + g, node i)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < G * N
        g = rows // N
        node = rows % N
        head = kvh * G + g
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D

        q_ptrs = (Q + b * stride_qb + head[:, None] * stride_qh + node[:, None] * stride_qn
                  + offs_d[None, :] * stride_qd)
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter cannot tl.dot bfloat16 (it multiplies the raw bits): compute in float32
            q = q.to(tl.float32)

        # each row's position (prefix length + its node's depth) and the first position its window reaches
        prefix_len = tl.load(PL + b)
        q_pos = prefix_len + tl.load(DEP + b * stride_depb + node, mask=row_ok, other=0)
        lowest = tl.where(window > 0, q_pos - window + 1, 0)  # [BLOCK_M]

        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: all-masked tiles leave the state as is
        l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
        acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)

        # ---- 1. the cached prefix, BLOCK_P positions at a time, each found through the block table (from the
        #         first tile any row's window reaches)
        offs_p = tl.arange(0, BLOCK_P)
        first = tl.reduce(tl.where(row_ok, lowest, prefix_len), 0, _COMBINE_MIN)
        first = tl.maximum(first, 0) // BLOCK_P * BLOCK_P
        for start in range(first, prefix_len, BLOCK_P):
            pos = start + offs_p
            pos_ok = pos < prefix_len
            block_id = tl.load(BT + b * stride_btb + (pos // BS) * stride_btn, mask=pos_ok, other=0).to(tl.int64)
            slot = pos % BS
            kv_mask = pos_ok[:, None] & d_ok[None, :]
            k_ptrs = (KP + block_id[:, None] * stride_kpb + kvh * stride_kph + slot[:, None] * stride_kps
                      + offs_d[None, :] * stride_kpd)
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_P]
            s = _capped(s, qk_scale, softcap)
            s = tl.where(pos_ok[None, :] & (pos[None, :] >= lowest[:, None]), s, float("-inf"))

            m_new = tl.maximum(m_i, tl.reduce(s, 1, _COMBINE_MAX))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.reduce(p, 1, _COMBINE_SUM)
            v_ptrs = (VP + block_id[:, None] * stride_vpb + kvh * stride_vph + slot[:, None] * stride_vps
                      + offs_d[None, :] * stride_vpd)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        # ---- 2. the tree part: the new tokens' K/V under tree_mask, BLOCK_N nodes at a time
        offs_n = tl.arange(0, BLOCK_N)
        for start in range(0, N, BLOCK_N):
            cols = start + offs_n
            col_ok = cols < N
            kv_mask = col_ok[:, None] & d_ok[None, :]
            k_ptrs = K + b * stride_kb + kvh * stride_kh + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            s = _capped(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), qk_scale, softcap)  # [BLOCK_M, BLOCK_N]
            tm_ptrs = TM + b * stride_tmb + node[:, None] * stride_tmi + cols[None, :] * stride_tmj
            allowed = tl.load(tm_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0) != 0
            col_pos = prefix_len + tl.load(DEP + b * stride_depb + cols, mask=col_ok, other=0)
            allowed = allowed & (col_pos[None, :] >= lowest[:, None])
            s = tl.where(allowed, s, float("-inf"))

            m_new = tl.maximum(m_i, tl.reduce(s, 1, _COMBINE_MAX))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.reduce(p, 1, _COMBINE_SUM)
            v_ptrs = V + b * stride_vb + kvh * stride_vh + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        # ---- normalise and store [B, N, H, D]; padding rows (l = 0) are never stored
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_safe[:, None]
        o_ptrs = (O + b * stride_ob + node[:, None] * stride_on + head[:, None] * stride_oh
                  + offs_d[None, :] * stride_od)
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    return _paged_tree_attn_kernel


def _kernel():
    mode = _interpret()
    if mode not in _KERNELS:
        _KERNELS[mode] = _build_kernel()
    return _KERNELS[mode]


def _launch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_pool: torch.Tensor,
            v_pool: torch.Tensor, block_tables: torch.Tensor, prefix_lens: torch.Tensor, tree_mask: torch.Tensor,
            scale: float, window: int | None = None, softcap: float | None = None, *, block_m: int | None = None,
            block_p: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """:func:`paged_tree_attention_triton` with explicit tile sizes (powers of two >= 16; ``None``: the default).

    Tests use small tiles to exercise the loops over row tiles, prefix tiles and tree tiles.
    """
    b, h, n, d = query.shape
    hkv = key.shape[1]
    if h % hkv != 0:
        raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({hkv}).")
    g = h // hkv
    if key.shape != (b, hkv, n, d) or value.shape != key.shape:
        raise ValueError(f"key/value must be [B, H_kv, N, D] = {(b, hkv, n, d)}; got {tuple(key.shape)} and "
                         f"{tuple(value.shape)}.")
    if k_pool.dim() != 4 or k_pool.shape[1] != hkv or k_pool.shape[3] != d or v_pool.shape != k_pool.shape:
        raise ValueError(f"k_pool/v_pool must be [num_blocks, {hkv}, block_size, {d}]; got {tuple(k_pool.shape)} "
                         f"and {tuple(v_pool.shape)}.")
    if tree_mask.shape != (b, n, n):
        raise ValueError(f"tree_mask must be [B, N, N] = {(b, n, n)}; got {tuple(tree_mask.shape)}.")
    if not (query.dtype == key.dtype == value.dtype == k_pool.dtype == v_pool.dtype):
        raise ValueError("query, key, value, k_pool and v_pool must share one dtype.")
    devices = {t.device for t in (query, key, value, k_pool, v_pool)}
    if len(devices) != 1:
        raise ValueError(f"query, key, value, k_pool and v_pool must be on one device; got "
                         f"{sorted(map(str, devices))}.")
    if query.device.type != "cuda" and not _interpret():
        raise RuntimeError(f"the Triton kernel needs CUDA tensors (got {query.device}), or TRITON_INTERPRET=1 to run "
                           "on the CPU through Triton's interpreter; use paged_tree_attention_torch instead.")
    block_size = k_pool.shape[2]

    out = torch.empty((b, n, h, d), dtype=query.dtype, device=query.device)
    if out.numel() == 0:
        return out
    lens = prefix_lens.to(device=query.device, dtype=torch.int32).contiguous()
    tables = block_tables.to(device=query.device)
    if tables.dtype not in (torch.int32, torch.int64):
        tables = tables.to(torch.int64)
    if tables.shape[1] == 0:  # no blocks: no prefix may be read; keep a valid pointer
        tables = torch.zeros((b, 1), dtype=torch.int32, device=query.device)
    mask = tree_mask.to(device=query.device)
    mask = mask.view(torch.uint8) if mask.dtype == torch.bool else (mask != 0).view(torch.uint8)
    depth = (mask.sum(-1, dtype=torch.int32) - 1).contiguous()  # [B, N]: each node's ancestors

    block_m = block_m or _tile(g * n, 64)
    block_p = block_p or 64
    block_n = block_n or _tile(n, 64)
    block_d = _tile(d, 1 << 30)
    upcast = query.dtype == torch.bfloat16 and _interpret()  # see the kernel
    # float32 operands: exact products (no TF32 rounding); 16-bit operands: "tf32" is the default and has no effect
    precision = "ieee" if upcast or query.dtype in (torch.float32, torch.float64) else "tf32"

    grid = (b, hkv, math.ceil(g * n / block_m))
    _kernel()[grid](
        query, key, value, k_pool, v_pool, tables, lens, mask, depth, out,
        *query.stride(), *key.stride(), *value.stride(), *k_pool.stride(), *v_pool.stride(),
        *tables.stride(), *mask.stride(), depth.stride(0), *out.stride(),
        float(scale) * _LOG2E, float(softcap or 0.0), int(window or 0),
        n, g, d, block_size,
        BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_P=block_p, BLOCK_N=block_n, DOT_PRECISION=precision,
        UPCAST=upcast,
    )
    return out


def paged_tree_attention_triton(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                                prefix_lens: torch.Tensor, tree_mask: torch.Tensor, scale: float,
                                window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Attention of ``N`` new tokens per sequence over its paged prefix plus the new tokens (ancestor mask).

    Same contract as :func:`verifiers.paged.kernels.paged_tree_attention_torch`:
    query: ``[B, H, N, D]``; key, value: ``[B, H_kv, N, D]`` (the new tokens' K/V, rotary applied; ``H`` a
    multiple of ``H_kv``); k_pool, v_pool: ``[num_blocks, H_kv, block_size, D]``; block_tables: ``[B, max_blocks]``
    int32/int64 (entries past a sequence's ``ceil(L / block_size)`` blocks are never read); prefix_lens: ``[B]``
    int (0 allowed); tree_mask: ``[B, N, N]`` bool (diagonal True); scale: the softmax scale; window, softcap:
    the layer's sliding window and logit softcapping (None: none). Any strides.

    Returns a contiguous ``[B, N, H, D]`` tensor in the query's dtype (float32 accumulation inside).
    All tensors must be on one CUDA device, or on the CPU with ``TRITON_INTERPRET=1`` (see :func:`available`).

    Example: with ``prefix_lens = [0]`` and a causal ``tree_mask`` this is plain causal self-attention.
    """
    return _launch(query, key, value, k_pool, v_pool, block_tables, prefix_lens, tree_mask, scale, window, softcap)
