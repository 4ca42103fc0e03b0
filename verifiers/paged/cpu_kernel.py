"""Tree attention over the paged KV cache in one C++ call on a CPU: no gather of the blocks, no padding.

The torch kernels (:mod:`verifiers.paged.kernels`) copy every request's cached K/V out of its blocks into a padded
``[B, H_kv, P, D]`` grid each layer of each step (a gather of the whole batch's context), then run one attention over
the grid. This kernel reads each key and value where it lies in its block, for exactly the positions a query may
see: its request's cached prefix and its own ancestors in the tree (whose K/V the verifier has already written right
after the prefix). One call serves every live node of a forward, whatever the requests' tree sizes and prefix
lengths, so no attention groups are needed either.

Work is split over (query row, KV head) pairs with ATen's thread pool; each pair computes its ``G`` query heads
(grouped-query attention: the ``G`` heads sharing a KV head read each key once) with a two-pass softmax (float32 accumulation; float64 for a float64 model),
the same function as :func:`verifiers.paged.kernels.paged_tree_attention_torch` up to float rounding, sliding window
and softcapping included (a windowed query walks only the blocks its window reaches).

The C++ source is built once per machine (:class:`specdec.kernels.build.CppKernel`: a C++ compiler is needed,
the first build takes about a minute); where it cannot be built, :func:`available` is False and the paged verifier
uses the SDPA kernel.
"""

from __future__ import annotations

import torch

from specdec.kernels.build import Kernel

# csrc/paged_attention.h, also compiled into the whole-layer kernel (verifiers.paged.layer_kernel)
_KERNEL = Kernel("paged_attention", "paged tree attention")

VERSION = 7  # bumped when the kernel's speed changes (a cost profile measured with an older one is stale); 4: the
#             paged forward without transformers' model loop (verifiers.paged.whole_forward), 4-6 ms a step less;
#             5: a tree's rows read the prefix from cache after the first (attention at 4-node steps -17% CPU time);
#             6: one row's query heads split over the threads (an int8 one-node step 4-6% faster); 7: every layer
#             in one call (PagedStack) and the new K/V copied into their slots without index_copy_


def available() -> bool:
    """Whether the kernel is built (building it now if it was not; False where that fails)."""
    return _KERNEL.available()


def failure() -> str | None:
    """Why the kernel could not be built (None if it was, or was not tried)."""
    return _KERNEL.failure()


def paged_tree_attention_cpp(query: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                             row_req: torch.Tensor, row_node: torch.Tensor, block_tables: torch.Tensor,
                             prefix_lens: torch.Tensor, tree_mask: torch.Tensor, scale: float,
                             window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Attention of each live node of a forward over its request's paged prefix and its tree ancestors.

    query: ``[T, H, D]`` (the forward's live nodes, packed); k_pool, v_pool: ``[num_blocks, H_kv, block_size, D]``
    views of ``[H_kv, num_blocks, block_size, D]`` storage (as :class:`~verifiers.paged.cache.PagedKVCache` keeps
    them) holding every request's prefix **and** the new tokens' K/V at positions ``prefix_len + node``;
    row_req / row_node: ``[T]`` each row's request (index into the next three) and node in its tree;
    block_tables: ``[B, blocks]``; prefix_lens: ``[B]``; tree_mask: ``[B, N, N]`` bool (node i sees node j);
    window, softcap: the layer's sliding window and logit softcapping (:mod:`verifiers.paged.kernels`; None: none).
    Returns ``[T, H, D]``. Example: one request, ``prefix_lens = [0]``, a causal ``tree_mask``: causal attention.
    """
    k_store, v_store = k_pool.transpose(0, 1), v_pool.transpose(0, 1)  # the storage: [H_kv, num_blocks, bs, D]
    return _KERNEL.module.paged_tree_attention(query.contiguous(), k_store, v_store, row_req.long(), row_node.long(),
                                        block_tables.long(), prefix_lens.long(), tree_mask.bool(), float(scale),
                                               int(window or 0), float(softcap or 0.0))


def paged_attention_step(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor,
                         k_pool: torch.Tensor, v_pool: torch.Tensor, rows, scale: float, window: int | None = None,
                         softcap: float | None = None) -> torch.Tensor:
    """One attention layer of a paged forward in one call: the new tokens' ``key``/``value`` ``[H_kv, T, D]`` (any
    strides, the pools' dtype) written to their physical ``slots [T]``, then :func:`paged_tree_attention_cpp` for
    ``query [H, T, D]`` (any strides) with ``rows`` (a :class:`verifiers.paged.attention.PackedRows` whose tensors
    are contiguous int64 / bool). Returns ``[T, H, D]``. The same as writing with
    :meth:`~verifiers.paged.cache.PagedKVCache.write` and calling :func:`paged_tree_attention_cpp`, without the
    Python of both (about a millisecond a step on a 30-layer model)."""
    return _KERNEL.module.paged_attention_step(query, key, value, slots, k_pool.transpose(0, 1), v_pool.transpose(0, 1),
                                               rows.row_req, rows.row_node, rows.block_tables, rows.prefix_lens,
                                               rows.tree_mask, float(scale), int(window or 0), float(softcap or 0.0))
