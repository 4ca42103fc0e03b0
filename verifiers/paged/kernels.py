"""Tree attention over a paged KV cache: the plain-torch reference (the oracle) and the fused-SDPA CPU default.

The queries are a verify step's (or a prefill chunk's) new tokens, ``N`` per sequence. Each attends to

* its sequence's **cached prefix**: positions ``0 .. L_b - 1``, stored in fixed-size KV blocks; position ``p`` lives
  in block ``block_tables[b, p // block_size]`` at offset ``p % block_size``;
* the **new tokens themselves** under the tree's ancestor mask (``tree_mask[b, i, j]``: node ``i`` sees node ``j``;
  a chain's mask is causal, a dead node sees only itself).

Both parts go through one softmax (exact, not approximated). Two attention modifiers of some families apply per
layer (:class:`specdec.models.families.AttentionSpec`): a **sliding window** ``W`` (a query at position ``q`` sees
keys at positions ``> q - W``; a tree node's position is ``L_b`` + its depth, the depth being its number of
ancestors, read from ``tree_mask``) and **logit softcapping** ``c`` (scores become ``c * tanh(scores / c)`` before
masking, Gemma 2). Grouped-query attention is computed by viewing the
``H`` query heads as ``H_kv`` groups of ``G = H / H_kv`` rows each, so K/V are never repeated in memory.

:func:`paged_tree_attention_sdpa` computes the same function with torch's fused attention over the gathered
blocks, once the new tokens' K/V are written to the pool right after the prefix (the CPU default: several times
faster per layer than the reference's separate matmuls and softmax on this project's CPU). The Triton kernel
(:mod:`verifiers.paged.triton_kernel`) computes it on GPUs; tests compare all three with dense SDPA under the same
mask.
"""

from __future__ import annotations

import torch


def gather_prefix(pool: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """The cached K (or V) of each sequence, contiguous, KV-head major: ``[H_kv, B, max_blocks * block_size, D]``.

    pool: ``[num_blocks, H_kv, block_size, D]``, ideally a view of ``[H_kv, num_blocks, block_size, D]`` storage
    (as :class:`~verifiers.paged.cache.PagedKVCache` allocates it): then this is one ``index_select`` copy and the
    result's batch dims merge without another. block_tables: ``[B, max_blocks]`` (padding entries may be any valid
    block id: positions past a sequence's length are masked by the caller).
    """
    b, nb = block_tables.shape
    _, hkv, bs, d = pool.shape
    blocks = pool.transpose(0, 1).index_select(1, block_tables.reshape(-1))  # [H_kv, B * nb, bs, D]
    return blocks.view(hkv, b, nb * bs, d)


def node_depths(tree_mask: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` depth of each node from its ancestor mask ``[B, N, N]`` (ancestors counted, itself excluded).

    >>> node_depths(torch.tensor([[[True, False, False], [True, True, False], [True, False, True]]])).tolist()
    [[0, 1, 1]]
    """
    return tree_mask.sum(-1) - 1


def softcapped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``softcap * tanh(scores / softcap)`` (Gemma 2's attention logit softcapping); the scores as they are for
    None."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def paged_tree_attention_torch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                               prefix_lens: torch.Tensor, tree_mask: torch.Tensor, scale: float,
                               window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Attention of ``N`` new tokens per sequence over its paged prefix plus the new tokens (ancestor mask).

    query: ``[B, H, N, D]``; key, value: ``[B, H_kv, N, D]`` (the new tokens' K/V, rotary applied);
    k_pool, v_pool: ``[num_blocks, H_kv, block_size, D]``; block_tables: ``[B, max_blocks]`` int;
    prefix_lens: ``[B]`` int (cached tokens per sequence; 0 allowed); tree_mask: ``[B, N, N]`` bool;
    scale: the softmax scale (``D ** -0.5`` for Llama); window, softcap: the layer's sliding window and logit
    softcapping (None: none). Returns ``[B, N, H, D]`` (transformers' layout).

    Computed KV-head major (``[H_kv, B, G * N, ...]``) so the gathered prefix needs no second copy.
    Example: with ``prefix_lens = [0]`` and a causal ``tree_mask`` this is plain causal self-attention.
    """
    b, h, n, d = query.shape
    hkv = key.shape[1]
    g = h // hkv
    q = query.reshape(b, hkv, g * n, d).transpose(0, 1)  # [H_kv, B, G*N, D], rows ordered (group, node)
    tree_scores = softcapped(torch.matmul(q, key.transpose(0, 1).transpose(-1, -2)) * scale, softcap)  # [H_kv, B, G*N, N]
    if window is not None:
        depth = node_depths(tree_mask)  # [B, N]
        tree_mask = tree_mask & (depth[:, None, :] > depth[:, :, None] - window)
    allowed = tree_mask[None, :, None]  # [1, B, 1, N, N]
    tree_scores = tree_scores.view(hkv, b, g, n, n).masked_fill(~allowed, float("-inf")).view(hkv, b, g * n, n)
    v_tree = value.transpose(0, 1)  # [H_kv, B, N, D]
    if block_tables.shape[1] == 0 or int(prefix_lens.max()) == 0:
        out = torch.matmul(torch.softmax(tree_scores, dim=-1), v_tree)
    else:
        k_prefix = gather_prefix(k_pool, block_tables)  # [H_kv, B, P, D]
        v_prefix = gather_prefix(v_pool, block_tables)
        p = k_prefix.shape[2]
        prefix_scores = softcapped(torch.matmul(q, k_prefix.transpose(-1, -2)) * scale, softcap)  # [H_kv, B, G*N, P]
        lens = prefix_lens[:, None].to(query.device)
        at = torch.arange(p, device=query.device)[None, :]
        hidden = (at >= lens)[:, None, :].expand(b, n, p)  # [B, N, P]
        if window is not None:  # node i (position L + depth) sees prefix positions > L + depth - window
            hidden = hidden | (at[:, None, :] <= (lens + depth.to(query.device))[:, :, None] - window)
        hidden = hidden[None, :, None].expand(1, b, g, n, p).reshape(1, b, g * n, p)
        prefix_scores = prefix_scores.masked_fill(hidden, float("-inf"))
        probs = torch.softmax(torch.cat([prefix_scores, tree_scores], dim=-1), dim=-1)
        out = torch.matmul(probs[..., :p], v_prefix) + torch.matmul(probs[..., p:], v_tree)
    return out.transpose(0, 1).reshape(b, h, n, d).transpose(1, 2)


def in_place_mask(prefix_lens: torch.Tensor, tree_mask: torch.Tensor, width: int, heads_per_kv: int = 1,
                  window: int | None = None) -> torch.Tensor:
    """The attention mask of :func:`paged_tree_attention_sdpa`: ``[B, 1, G * N, width]`` bool.

    Query row ``(g, i)`` (head ``g`` of its KV head's group, node ``i``) of sequence ``b`` sees slots
    ``0 .. L_b - 1`` (its cached prefix) and slot ``L_b + j`` where ``tree_mask[b, i, j]`` (node ``j`` of its
    tree, stored right after the prefix); nothing else; with a ``window``, only those whose position (a prefix
    slot's is its index, node ``j``'s is ``L_b`` + its depth) is ``> L_b + depth(i) - window``.
    prefix_lens: ``[B]``; tree_mask: ``[B, N, N]`` bool.

    >>> in_place_mask(torch.tensor([2]), torch.tensor([[[True, False], [True, True]]]), width=5)[0, 0].int().tolist()
    [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    """
    b, n, _ = tree_mask.shape
    rel = torch.arange(width, device=tree_mask.device)[None, :] - prefix_lens[:, None].to(tree_mask.device)  # [B, W]
    in_tree = (rel >= 0) & (rel < n)
    tree = tree_mask.gather(2, rel.clamp(0, n - 1)[:, None, :].expand(b, n, width)) & in_tree[:, None, :]
    mask = (rel < 0)[:, None, :] | tree  # [B, N, W]
    if window is not None:
        depth = node_depths(tree_mask)  # [B, N]
        lens = prefix_lens[:, None].to(tree_mask.device)
        key_pos = torch.where(rel < 0, rel + lens, lens + depth.gather(1, rel.clamp(0, n - 1)))  # [B, W]
        mask = mask & (key_pos[:, None, :] > (lens + depth)[:, :, None] - window)
    return (mask if heads_per_kv == 1 else mask.repeat(1, heads_per_kv, 1))[:, None]


def paged_tree_attention_sdpa(query: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                              block_tables: torch.Tensor, mask: torch.Tensor, scale: float,
                              softcap: float | None = None) -> torch.Tensor:
    """The function of :func:`paged_tree_attention_torch` through ``scaled_dot_product_attention``, with the new
    tokens' K/V **already written to the pool** right after each prefix (the paged verifier writes them first):
    one gather of the blocks ``block_tables [B, blocks]`` cover (prefix and tree), no concatenation.

    query: ``[B, H, N, D]``; k_pool, v_pool: ``[num_blocks, H_kv, block_size, D]``; mask: :func:`in_place_mask`
    for ``width = blocks * block_size`` and ``G = H / H_kv`` (and the layer's window). Returns ``[B, N, H, D]``.
    With ``softcap`` the scores are capped before the mask, through separate matmuls and a softmax (SDPA has no
    softcapping).

    Grouped-query attention is folded into the query rows: the ``G`` query heads that share a KV head become
    ``G * N`` rows of one ``[B, H_kv, G * N, D]`` query, so K/V are not repeated and each KV head's keys are read
    once per call (~30% faster here than SDPA's ``enable_gqa``).
    """
    b, h, n, d = query.shape
    hkv = k_pool.shape[1]
    k = gather_prefix(k_pool, block_tables).transpose(0, 1)  # [B, H_kv, W, D]
    v = gather_prefix(v_pool, block_tables).transpose(0, 1)
    q = query.reshape(b, hkv, (h // hkv) * n, d)  # rows ordered (head in group, node)
    if softcap is None:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    else:
        scores = softcapped(torch.matmul(q, k.transpose(-1, -2)) * scale, softcap).masked_fill(~mask, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1), v)
    return out.view(b, h, n, d).transpose(1, 2)


def dense_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_pool: torch.Tensor,
                    v_pool: torch.Tensor, block_tables: torch.Tensor, prefix_lens: torch.Tensor,
                    tree_mask: torch.Tensor, scale: float, window: int | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """The same function through dense attention, one sequence at a time with K/V repeated per query head and the
    window applied by explicit positions (tests only)."""
    b, h, n, _ = query.shape
    g = h // key.shape[1]
    outs = []
    for i in range(b):
        L = int(prefix_lens[i])
        k_prefix = gather_prefix(k_pool, block_tables[i:i + 1]).transpose(0, 1)[..., :L, :]
        v_prefix = gather_prefix(v_pool, block_tables[i:i + 1]).transpose(0, 1)[..., :L, :]
        k = torch.cat([k_prefix, key[i:i + 1]], dim=2).repeat_interleave(g, dim=1)
        v = torch.cat([v_prefix, value[i:i + 1]], dim=2).repeat_interleave(g, dim=1)
        mask = torch.cat([torch.ones(n, L, dtype=torch.bool, device=query.device), tree_mask[i]], dim=1)
        if window is not None:
            q_pos = L + tree_mask[i].sum(-1) - 1  # [n]
            k_pos = torch.cat([torch.arange(L, device=query.device), q_pos])  # [L + n]
            mask = mask & (k_pos[None, :] > q_pos[:, None] - window)
        scores = torch.matmul(query[i:i + 1], k.transpose(-1, -2)) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        outs.append(torch.matmul(torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1), v))
    return torch.cat(outs).transpose(1, 2)
