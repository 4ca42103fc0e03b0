"""The attention function the paged verifier registers with transformers' ``AttentionInterface``.

Each of our forwards runs inside :func:`paged_attention_on`, which makes its :class:`PagedForward` the active step
(a context variable, not a keyword argument: some families, StableLM among them, do not pass a layer's ``**kwargs``
on to its attention, and a keyword lost on the way would silently turn the paged attention into plain SDPA); the
layer writes the new tokens' K/V into their slots and attends over the paged prefix plus the tree, one kernel call per
:class:`AttentionGroup` (:mod:`verifiers.paged.groups`), with the layer's sliding window and the model's logit
softcapping (:class:`specdec.models.families.AttentionSpec`, read from the model's config). Outside our forwards
(no active step) it is plain SDPA, and :func:`paged_attention_on` switches a model to it only inside the block.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from specdec.errors import ConfigError
from specdec.kernels.cpu_decoder_layer import whole_layers
from specdec.models.families import AttentionSpec
from verifiers.paged import layer_kernel
from verifiers.paged.cache import PagedKVCache
from verifiers.paged.cpu_kernel import paged_attention_step
from verifiers.paged.kernels import paged_tree_attention_sdpa, paged_tree_attention_torch

ATTENTION_NAME = "specdec_paged"
KERNELS = ("auto", "cpp", "sdpa", "torch", "triton")


@dataclass(frozen=True)
class AttentionGroup:
    """Requests that share one attention call (:mod:`verifiers.paged.groups`), on a grid ``[b, n]`` of their
    own: ``n`` is the group's largest tree, ``block_tables`` hold only the blocks its prefixes use."""

    unpack: torch.Tensor | None  # [b, n] packed-row index of each (request, node) (dead: any live one); None: the
    #                              packed row is this grid, flattened (one group, every node live)
    pack: torch.Tensor | None  # [t] grid index ([b * n]) of each of the group's live nodes, in packed-row order
    rows: torch.Tensor | None  # [t] their places in the packed row; None: the whole row, in order (one group)
    block_tables: torch.Tensor  # [b, blocks]: the prefixes' blocks (with the in-place kernel: and the trees')
    prefix_lens: torch.Tensor  # [b] cached positions before the new tokens
    tree_mask: torch.Tensor  # [b, n, n] bool, node i may attend node j
    mask: torch.Tensor | None = None  # the in-place kernel's whole mask (paged_attention.in_place_mask), built once
    window_mask: torch.Tensor | None = None  # the same for the sliding layers (with the model's window)


@dataclass(frozen=True)
class PackedRows:
    """For a kernel that takes every live node of a forward in one call (:mod:`verifiers.paged.cpu_kernel`): each
    packed row's request and node, and every request's blocks, prefix length and tree mask (contiguous int64 and
    bool tensors, made once per forward for all its layers)."""

    row_req: torch.Tensor  # [T] index into the rest
    row_node: torch.Tensor  # [T] node in its request's tree
    block_tables: torch.Tensor  # [B, blocks]
    prefix_lens: torch.Tensor  # [B]
    tree_mask: torch.Tensor  # [B, N, N] bool


@dataclass(frozen=True)
class PagedForward:
    """What every attention layer needs for one forward over ``B`` sequences of up to ``N`` tree nodes each.

    The model itself sees only the ``T`` **live** nodes, packed into one row ``[1, T]`` (dead padding nodes cost
    nothing in the linear layers, which dominate); attention unpacks them per :class:`AttentionGroup`.
    """

    cache: PagedKVCache
    slots: torch.Tensor  # [T] physical slots the live nodes' K/V go to
    groups: tuple[AttentionGroup, ...]  # empty with `rows`
    kernel: Callable  # paged_tree_attention_sdpa (in place: reads the new K/V from the pool), or one taking them
    spec: AttentionSpec  # each layer's sliding window, and the logit softcapping
    rows: PackedRows | None = None  # the C++ kernel's input: one call for the whole forward, no groups


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query ``[1, H, T, D]``, key/value ``[1, H_kv, T, D]`` (packed live nodes)
    -> ``[1, T, H, D]``. Without an active step (a forward that is not ours) it is plain SDPA.
    """
    step = _ACTIVE.get()
    if step is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    layer = module.layer_idx
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    window, softcap = step.spec.windows[layer], step.spec.softcap
    pools = step.cache.k[layer], step.cache.v[layer]
    if step.rows is not None and key.dtype == pools[0].dtype:  # write and attend in one call over every live node
        return paged_attention_step(query[0], key[0], value[0], step.slots, *pools, step.rows, scale, window,
                                    softcap)[None], None
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, heads, D]
    step.cache.write(layer, step.slots, k, v)
    if step.rows is not None:  # one call over every live node, reading K/V in place
        r = step.rows
        return step.kernel(q, *pools, r.row_req, r.row_node, r.block_tables, r.prefix_lens, r.tree_mask, scale,
                           window, softcap)[None], None
    out = None if len(step.groups) == 1 else q.new_empty(q.shape)
    for g in step.groups:
        b, n = g.tree_mask.shape[:2]
        if g.mask is not None:  # the in-place kernel: the new K/V are in the pool already
            qg = q.view(b, n, *q.shape[1:]) if g.unpack is None else q[g.unpack]
            mask = g.mask if window is None else g.window_mask
            o = step.kernel(qg.transpose(1, 2), *pools, g.block_tables, mask, scale, softcap)  # [b, n, H, D]
        else:
            if g.unpack is None:  # the packed row is the [b, n] grid, flattened
                qg, kg, vg = (x.view(b, n, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
            else:
                qg, kg, vg = (x[g.unpack].transpose(1, 2) for x in (q, k, v))  # [b, heads, n, D]
            o = step.kernel(qg, kg, vg, *pools, g.block_tables, g.prefix_lens, g.tree_mask, scale, window, softcap)
        o = o.reshape(b * n, *o.shape[2:])
        o = o if g.pack is None else o[g.pack]
        if out is None:
            out = o
        else:
            out[g.rows] = o
    return out[None], None


AttentionInterface.register(ATTENTION_NAME, paged_attention)


_ACTIVE: ContextVar[PagedForward | None] = ContextVar("specdec_paged_step", default=None)


@contextmanager
def paged_attention_on(model, step: PagedForward):
    """Route ``model``'s attention through :func:`paged_attention` for ``step`` inside the block; restored after.
    On the C++ kernel (``step.rows``), fused decoder layers (:mod:`specdec.kernels.cpu_decoder_layer`) run whole, their
    attention included, as one call each (:mod:`verifiers.paged.layer_kernel`)."""
    before = model.config._attn_implementation
    model.config._attn_implementation = ATTENTION_NAME
    token = _ACTIVE.set(step)
    try:
        if step.rows is not None and layer_kernel.available():
            with whole_layers(layer_kernel.PagedWholeLayer(step)):
                yield
        else:
            yield
    finally:
        _ACTIVE.reset(token)
        model.config._attn_implementation = before


def pick_kernel(name: str, device: torch.device, dtype: torch.dtype | None = None) -> Callable:
    """``cpp`` (reads K/V in place, one call a forward; the CPU default where it builds), ``sdpa`` (torch's fused
    attention on the gathered blocks), ``torch`` (the reference: separate matmuls and one softmax), ``triton`` (GPU,
    or CPU under ``TRITON_INTERPRET=1``), ``auto`` (``cpp`` on a CPU, else ``sdpa``; ``triton`` on a GPU, except for
    a float64 model, which compiled Triton dots do not take: ``sdpa`` then)."""
    if name not in KERNELS:
        raise ConfigError(f"unknown paged attention kernel {name!r}; choose one of {list(KERNELS)}.")
    if name == "torch":
        return paged_tree_attention_torch
    if name == "cpp" or (name == "auto" and device.type == "cpu"):
        from verifiers.paged import cpu_kernel

        if device.type == "cpu" and cpu_kernel.available():
            return cpu_kernel.paged_tree_attention_cpp
        if name == "cpp":
            why = cpu_kernel.failure() or "the target is not on the CPU"
            raise ConfigError(f"kernel=cpp needs the C++ kernel built on a CPU ({why}); use kernel=sdpa.")
        return paged_tree_attention_sdpa
    if name == "sdpa" or (name == "auto" and (device.type != "cuda" or dtype == torch.float64)):
        return paged_tree_attention_sdpa
    from verifiers.paged import triton_kernel

    if not triton_kernel.available():
        if name == "auto":
            return paged_tree_attention_sdpa
        raise ConfigError("kernel=triton needs Triton with a CUDA GPU (or TRITON_INTERPRET=1 for CPU tensors); "
                          "use kernel=torch.")
    return triton_kernel.paged_tree_attention_triton
