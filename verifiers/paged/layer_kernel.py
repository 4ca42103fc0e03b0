"""A whole Llama-style decoder layer of a paged forward in one C++ call on a CPU (kernel choice only).

:mod:`specdec.kernels.cpu_decoder_layer` runs a fused layer as two calls around the model's attention function; in a
paged forward on the C++ attention kernel that function is :func:`verifiers.paged.cpu_kernel.paged_attention_step`
behind transformers' attention interface and our own dispatch (the active step, the layer's pools, its window). This
kernel is one extension holding all of it (the skinny linears, the layer kernels, the paged attention), so a layer is
one call: RMSNorm, q/k/v, the rotary embedding, the new tokens' K/V written to their slots, tree attention over the
paged prefix, ``o_proj`` and the residual, RMSNorm, the gated MLP and the residual. The results are those of the two
calls and the attention step in between, to the bit (the same functions, compiled into one module).

:class:`PagedWholeLayer` is what the paged verifier installs for a forward on the C++ kernel with float32 pools
(:func:`specdec.kernels.cpu_decoder_layer.whole_layers`), for layers on float32 panels or int8 / int4 ones; anything
else keeps the two calls around the attention.
"""

from __future__ import annotations

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
    """Runs each fused layer of one paged forward (``step``: its :class:`verifiers.paged.attention.PagedForward`,
    on the C++ kernel) as one call."""

    def __init__(self, step) -> None:
        self.step = step

    def run_layer(self, layer: cpu_decoder_layer.DecoderLayerForward, h: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> torch.Tensor | None:
        """The layer's output ``[T, H]`` for the forward's packed rows ``h [T, H]``, on float32 or int8 / int4
        panels (None for pools of another dtype than float32)."""
        step, idx = self.step, layer.layer.self_attn.layer_idx
        k_pool, v_pool = step.cache.k[idx], step.cache.v[idx]
        qkv, o, gu, down = layer.packed()
        if k_pool.dtype != torch.float32:
            return None
        attn, rows = layer.layer.self_attn, step.rows
        n1, n2 = layer.layer.input_layernorm, layer.layer.post_attention_layernorm
        paged = (step.slots, k_pool.transpose(0, 1), v_pool.transpose(0, 1), rows.row_req, rows.row_node,
                 rows.block_tables, rows.prefix_lens, rows.tree_mask, float(attn.scaling),
                 int(step.spec.windows[idx] or 0), float(step.spec.softcap or 0.0))
        heads = (layer.heads, layer.kv_heads, layer.head_dim)
        eps1, eps2 = float(n1.variance_epsilon), float(n2.variance_epsilon)
        if isinstance(qkv, quant_gemm.QuantPanels):
            return _KERNEL.module.paged_decoder_layer_q(
                h, n1.weight, eps1, *cpu_decoder_layer.quant_args(qkv), cos, sin, *heads,
                *cpu_decoder_layer.quant_args(o), n2.weight, eps2, *cpu_decoder_layer.quant_args(gu),
                *cpu_decoder_layer.quant_args(down), *paged)
        return _KERNEL.module.paged_decoder_layer(
            h, n1.weight, eps1, qkv.panels, qkv.bias, qkv.out_features, cos, sin, *heads, o.panels, o.bias,
            o.out_features, n2.weight, eps2, gu.panels, gu.bias, gu.out_features, down.panels, down.bias,
            down.out_features, *paged)
