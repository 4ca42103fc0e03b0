"""A whole Llama-style decoder layer of a paged forward in one C++ call on a CPU (kernel choice only).

:mod:`specdec.kernels.cpu_decoder_layer` runs a fused layer as two calls around the model's attention function; in a
paged forward on the C++ attention kernel that function is :func:`verifiers.paged.cpu_kernel.paged_attention_step`
behind transformers' attention interface and our own dispatch (the active step, the layer's pools, its window). This
kernel is one extension holding all of it (the skinny linears, the layer kernels, the paged attention), so a layer is
one call: RMSNorm, q/k/v, the rotary embedding, the new tokens' K/V written to their slots, tree attention over the
paged prefix, ``o_proj`` and the residual, RMSNorm, the gated MLP and the residual. The results are those of the two
calls and the attention step in between, to the bit (the same functions, compiled into one module).

:meth:`PagedWholeLayer.run_layers` runs every layer of a forward in one call, and
:meth:`PagedWholeLayer.run_layer` one layer: a C++ ``PagedStack`` (``csrc/paged_stack.h``) holds the layers' weights
and settings, handed over once per set of fused layers, and runs the layer function over them (every layer in one
call took about 0.3 ms less per int8 step of the default model than a call per layer).

:class:`PagedWholeLayer` is what the paged verifier installs for a forward on the C++ kernel with float32 pools
(:func:`specdec.kernels.cpu_decoder_layer.whole_layers`), for layers on float32 panels or int8 / int4 ones; anything
else keeps the two calls around the attention.
"""

from __future__ import annotations

import weakref

import torch

from specdec.kernels import cpu_decoder_layer, quant_gemm
from specdec.kernels.build import Kernel

_KERNEL = Kernel("paged_layer", "a paged decoder layer in one call")


def available() -> bool:
    """Whether the kernel is built and the fused layers serve this CPU (building it now if it was not)."""
    return cpu_decoder_layer.available() and _KERNEL.available()


def failure() -> str | None:
    """Why the kernel is not used (None when it is, or was not tried)."""
    return cpu_decoder_layer.failure() or _KERNEL.failure()


class PagedWholeLayer:
    """Runs the fused layers of one paged forward (``step``: its :class:`verifiers.paged.attention.PagedForward`, on
    the C++ kernel) in one call, one layer or all of them. The layers' weights and settings, as the kernel takes
    them, are handed over once per set of fused layers and kept (:func:`_stack`), and the pools' storage views once
    per cache: a step's 30 layers otherwise spent about a millisecond gathering them."""

    def __init__(self, step) -> None:
        self.step = step
        r = step.rows
        self._rows = (r.row_req, r.row_node, r.block_tables, r.prefix_lens, r.tree_mask)

    def run_layer(self, layer: cpu_decoder_layer.DecoderLayerForward, h: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> torch.Tensor | None:
        """The layer's output ``[T, H]`` for the forward's packed rows ``h [T, H]``, on float32 or int8 / int4 / bf16
        panels (None for pools of another dtype than float32)."""
        return self.run_layers([layer], h, cos, sin)

    def run_layers(self, layers: list[cpu_decoder_layer.DecoderLayerForward], h: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> torch.Tensor | None:
        """The last layer's output ``[T, H]`` after every layer of ``layers`` (fused layers of the model, in order),
        in one call; None for pools of another dtype than float32."""
        step = self.step
        if step.cache.k[0].dtype != torch.float32:
            return None
        k_stores, v_stores = _storage(step.cache)
        return _stack(layers, step.spec).run(h, cos, sin, step.slots, k_stores, v_stores, *self._rows)


# a set's first fused layer -> {the set's layer ids: its stack} (a model's whole set and each single layer)
_STACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_STORAGE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # PagedKVCache -> its pools' storage views


def _stack(layers: list[cpu_decoder_layer.DecoderLayerForward], spec):
    """The C++ ``PagedStack`` holding ``layers``' weights and settings (``spec``: the model's windows and softcap),
    made once per set of fused layers (:func:`specdec.kernels.cpu_gemm.fast_linears` makes a new set each time it
    is entered; the old set's stacks go with it)."""
    ids = tuple(map(id, layers))
    stacks = _STACKS.setdefault(layers[0], {})
    stack = stacks.get(ids)
    if stack is None:
        stack = stacks[ids] = _KERNEL.module.PagedStack(float(spec.softcap or 0.0))
        for layer in layers:
            _add(stack, layer, int(spec.windows[layer.layer.self_attn.layer_idx] or 0))
    return stack


def _add(stack, layer: cpu_decoder_layer.DecoderLayerForward, window: int) -> None:
    """Hand a fused layer's packed weights and settings to ``stack`` (float32 panels, or int8 / int4 / bf16 ones)."""
    qkv, o, gu, down = layer.packed()
    attn = layer.layer.self_attn
    n1, n2 = layer.layer.input_layernorm, layer.layer.post_attention_layernorm
    heads = (layer.heads, layer.kv_heads, layer.head_dim)
    eps1, eps2 = float(n1.variance_epsilon), float(n2.variance_epsilon)
    at = (attn.layer_idx, float(attn.scaling), window)
    if isinstance(qkv, quant_gemm.QuantPanels):
        q = cpu_decoder_layer.quant_args
        stack.add_quant(n1.weight, eps1, *q(qkv), *heads, *q(o), n2.weight, eps2, *q(gu), *q(down), *at)
    else:
        f = _float_args
        stack.add_float(n1.weight, eps1, *f(qkv), *heads, *f(o), n2.weight, eps2, *f(gu), *f(down), *at)


def _float_args(w) -> tuple:
    """A float32-panel linear as the C++ stack takes it: ``(panels, bias, out_features)``."""
    return w.panels, w.bias, w.out_features


def _storage(cache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The storage views ``[H_kv, blocks, bs, D]`` of a paged cache's K and V pools, per layer, as the kernel reads
    them (made once per cache: its pools are allocated once)."""
    views = _STORAGE.get(cache)
    if views is None:
        views = _STORAGE[cache] = ([k.transpose(0, 1) for k in cache.k], [v.transpose(0, 1) for v in cache.v])
    return views
