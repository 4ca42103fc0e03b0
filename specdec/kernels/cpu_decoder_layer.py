"""A Llama-style decoder layer in two C++ calls around its attention on a CPU (kernel choice only).

With the linears at the memory floor (:mod:`specdec.kernels.skinny_gemm`) and the norms and the MLP's activation in one
call each (:mod:`specdec.kernels.cpu_layers`), what remains of a small model's decode step beyond reading its weights is
the layer's Python: transformers' module calls, the views and transposes of the attention, the rotary embedding's
eight ops, the residual adds. Each costs a few microseconds alone, and far more inside a decode step, whose weight
stream has pushed the interpreter's own code and data out of the caches: on SmolLM2-135M a transformers layer took
~930 us a step where its kernels take ~400 (docs/history/16-fused-layers.md).

:class:`DecoderLayerForward` runs a decoder layer of a class known to have exactly Llama's layer
(:data:`DECODER_LAYERS`) as:

1. :func:`pre_attention` (one call): RMSNorm, the q/k/v projections as one product (their packed panels, biases
   included), the rotary embedding of q and k in place (bitwise the same as transformers' ``apply_rotary_pos_emb``);
2. the model's own attention function (``config._attn_implementation``: the paged verifier's, SDPA, ...) with its
   cache's ``update``, as the attention module would call it;
3. :func:`post_attention` (one call): ``o_proj``, the residual, RMSNorm, gate and up as one product, ``silu(g) * u``,
   ``down_proj``, the residual.

It serves float32 CPU inputs of at most :data:`specdec.kernels.skinny_gemm.MAX_ROWS` rows (a decode step, a tree, a
batch of trees) with gradients off, whose rotary embedding spans the whole head; anything else (a prefill, a
bfloat16 model, training) runs the layer's own forward. Its results differ from the layer's own (inside
:func:`specdec.kernels.cpu_gemm.fast_linears`) by float rounding only: the same kernels in the same order, the residual
sums as transformers writes them.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from specdec.kernels import cpu_layers, quant_gemm, skinny_gemm
from specdec.kernels.build import Kernel

# decoder layer class -> the extra keyword its attention module passes to the attention function (checked against
# the model's own layer forward in tests/test_cpu_decoder_layer.py for each)
DECODER_LAYERS: dict[str, Callable[[torch.nn.Module], dict]] = {
    "LlamaDecoderLayer": lambda attn: {},
    "MistralDecoderLayer": lambda attn: {"sliding_window": getattr(attn.config, "sliding_window", None)},
    "Qwen2DecoderLayer": lambda attn: {"sliding_window": attn.sliding_window},
}
_ATTENTIONS = frozenset({"LlamaAttention", "MistralAttention", "Qwen2Attention"})

# csrc/decoder_layer.h (which includes the panel GEMM and the layer kernels), also compiled into the paged verifier's
# whole-layer kernel (verifiers.paged.layer_kernel)
_KERNEL = Kernel("decoder_layer", "a Llama-style layer around its attention")


# the same two calls with int8 / int4 / bf16 linears (csrc/quant_layer.h)
_QUANT_KERNEL = Kernel("quant_layer", "a Llama layer on int8 / int4 / bf16 linears")
QUANT_MAX_ROWS = 64  # quantized layers: the kernel serves any rows; beyond, a prefill runs the layer's own forward


def available() -> bool:
    """Whether the kernels are built and the skinny kernel serves this CPU (building them now if they were not)."""
    return skinny_gemm.available() and _KERNEL.available()


def quant_available() -> bool:
    """Whether the quantized layers' kernels are built (building them now if they were not)."""
    return cpu_layers.available() and quant_gemm.available() and _QUANT_KERNEL.available()


def failure() -> str | None:
    """Why the kernels are not used (None when they are, or were not tried)."""
    return skinny_gemm.failure() or _KERNEL.failure()


def is_llama_layer(layer: torch.nn.Module) -> bool:
    """True for a decoder layer of a class in :data:`DECODER_LAYERS` with Llama's parts: an attention module of a
    known class, RMSNorms, a gated SiLU MLP, and no sub-norms of q and k."""
    return _is_llama_layer(layer, torch.nn.Linear)


def is_quant_llama_layer(layer: torch.nn.Module) -> bool:
    """:func:`is_llama_layer` with every projection a :class:`specdec.kernels.quant_gemm.QuantLinear`, q/k/v of one
    bit width and gate/up of one (each group runs as one product)."""
    if not _is_llama_layer(layer, quant_gemm.QuantLinear):
        return False
    attn, mlp = layer.self_attn, layer.mlp
    return len({attn.q_proj.bits, attn.k_proj.bits, attn.v_proj.bits}) == 1 and mlp.gate_proj.bits == mlp.up_proj.bits


def _is_llama_layer(layer: torch.nn.Module, linear: type) -> bool:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    return (type(layer).__name__ in DECODER_LAYERS and type(attn).__name__ in _ATTENTIONS
            and all(type(getattr(attn, n, None)) is linear for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
            and cpu_layers.is_gated_silu_mlp(mlp)
            and all(type(getattr(mlp, n, None)) is linear for n in ("gate_proj", "up_proj", "down_proj"))
            and all(cpu_layers.is_rms_norm(getattr(layer, n, None))
                    for n in ("input_layernorm", "post_attention_layernorm")))


def quant_weights(layer: torch.nn.Module) -> tuple:
    """A quantized Llama-style layer's weights as the kernels take them: ``(qkv, o, gate_up, down)``."""
    attn, mlp = layer.self_attn, layer.mlp
    return (quant_gemm.concat([attn.q_proj.panels, attn.k_proj.panels, attn.v_proj.panels]), attn.o_proj.panels,
            quant_gemm.concat([mlp.gate_proj.panels, mlp.up_proj.panels]), mlp.down_proj.panels)


Weights = skinny_gemm.Panels | quant_gemm.QuantPanels  # float32 packed panels, or int8 / int4 ones


def quant_args(w: quant_gemm.QuantPanels) -> tuple:
    """A quantized linear as the C++ layer kernels take it: ``(q, d, m, bias, out_features, bits)``."""
    return w.q, w.d, w.m, w.bias, w.out_features, w.bits


def pre_attention(h: torch.Tensor, norm: torch.nn.Module, qkv: Weights, cos: torch.Tensor,
                  sin: torch.Tensor, rope_heads: int, head_dim: int) -> torch.Tensor:
    """``h [M, H]`` -> ``[M, N_qkv]``: ``norm``, the packed q/k/v product, the rotary embedding (``cos``, ``sin``
    ``[M, head_dim]``) of the first ``rope_heads`` heads (q's and k's)."""
    eps = float(norm.variance_epsilon)
    if isinstance(qkv, quant_gemm.QuantPanels):
        return _QUANT_KERNEL.module.pre_attention_q(h, norm.weight, eps, *quant_args(qkv), cos, sin, rope_heads,
                                                    head_dim)
    return _KERNEL.module.pre_attention(h, norm.weight, eps, qkv.panels, qkv.bias, qkv.out_features, cos, sin,
                                        rope_heads, head_dim)


def post_attention(h: torch.Tensor, attn: torch.Tensor, o: Weights, norm: torch.nn.Module, gate_up: Weights,
                   down: Weights) -> torch.Tensor:
    """``h [M, H]`` (the layer's input), ``attn [M, H_q * D]`` -> the layer's output ``[M, H]``."""
    eps = float(norm.variance_epsilon)
    if isinstance(o, quant_gemm.QuantPanels):
        return _QUANT_KERNEL.module.post_attention_q(h, attn, *quant_args(o), norm.weight, eps, *quant_args(gate_up),
                                                     *quant_args(down))
    return _KERNEL.module.post_attention(h, attn, o.panels, o.bias, o.out_features, norm.weight, eps, gate_up.panels,
                                         gate_up.bias, gate_up.out_features, down.panels, down.bias,
                                         down.out_features)


class WholeLayer(Protocol):
    """A forward that can run a fused layer with its attention in one call (the paged verifier's C++ route): it
    returns the layer's output ``[M, H]`` for ``h [M, H]`` and the rotary ``cos``, ``sin [M, D]``, or None where it
    does not serve this layer (then the two calls around the attention function run)."""

    def run_layer(self, layer: DecoderLayerForward, h: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> torch.Tensor | None: ...


_WHOLE: ContextVar[WholeLayer | None] = ContextVar("specdec_whole_layer", default=None)


@contextmanager
def whole_layers(runner: WholeLayer):
    """Fused layers run as ``runner.run_layer`` inside the block (a forward's attention and the layer in one call)."""
    token = _WHOLE.set(runner)
    try:
        yield
    finally:
        _WHOLE.reset(token)


class DecoderLayerForward:
    """A Llama-style decoder layer's forward inside :func:`specdec.kernels.cpu_gemm.fast_linears`: two C++ calls
    around the model's attention function for the inputs this module serves (see its docstring), the layer's own
    forward otherwise. ``panels``: a callable giving the layer's packed weights, ``(qkv, o, gate_up, down)``
    (:class:`specdec.kernels.skinny_gemm.Panels`, or :class:`specdec.kernels.quant_gemm.QuantPanels` for a quantized
    layer), made on first use and kept by the caller; ``max_rows``: the most rows it serves (default the skinny
    kernel's)."""

    def __init__(self, layer: torch.nn.Module, panels: Callable[[], tuple], max_rows: int | None = None) -> None:
        self.layer, self.panels = layer, panels
        self.max_rows = max_rows or skinny_gemm.MAX_ROWS
        self.original = type(layer).forward.__get__(layer)
        attn = layer.self_attn
        cfg = attn.config
        self.heads, self.head_dim = cfg.num_attention_heads, attn.head_dim
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.extra = DECODER_LAYERS[type(layer).__name__](attn)
        self._packed: tuple | None = None
        self._rope: tuple | None = None  # (position_embeddings, (cos, sin) as [M, D]): one forward's layers share it

    def packed(self) -> tuple:
        """The layer's packed weights ``(qkv, o, gate_up, down)``, made on first use."""
        if self._packed is None:
            self._packed = self.panels()
        return self._packed

    def rope(self, position_embeddings, b: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``, ``sin`` as contiguous float32 ``[B * T, D]`` (reused while the forward passes the same pair)."""
        if self._rope is None or self._rope[0] is not position_embeddings:
            d = self.head_dim
            self._rope = (position_embeddings, tuple(x.to(torch.float32).expand(b, t, d).reshape(b * t, d).contiguous()
                                                     for x in position_embeddings))
        return self._rope[1]

    def takes(self, h: torch.Tensor, position_embeddings) -> bool:
        """Whether the fused route serves ``h [B, T, H]``: float32 on a CPU, gradients off, at most the skinny kernel's
        rows, a rotary embedding as wide as a head, an attention function registered with transformers (``eager`` is the
        modeling module's own: the layer's forward serves it)."""
        return (h.dtype == torch.float32 and h.device.type == "cpu" and not torch.is_grad_enabled()
                and 0 < h.shape[0] * h.shape[1] <= self.max_rows and position_embeddings is not None
                and position_embeddings[0].shape[-1] == self.head_dim and not self.layer.training
                and self.layer.self_attn.config._attn_implementation in ALL_ATTENTION_FUNCTIONS)

    def __call__(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None, cache=None,
                 use_cache=False, position_embeddings=None, **kwargs) -> torch.Tensor:
        if not self.takes(hidden_states, position_embeddings):
            return self.original(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                 cache=cache, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
        b, t, width = hidden_states.shape
        hq, hkv, d = self.heads, self.kv_heads, self.head_dim
        h = hidden_states.reshape(b * t, width).contiguous()
        cos, sin = self.rope(position_embeddings, b, t)
        whole = _WHOLE.get()
        if whole is not None:
            out = whole.run_layer(self, h, cos, sin)
            if out is not None:
                return out.view(b, t, width)
        qkv_p, o_p, gu_p, down_p = self.packed()
        qkv = pre_attention(h, self.layer.input_layernorm, qkv_p, cos, sin, hq + hkv, d).view(b, t, hq + 2 * hkv, d)
        q, k, v = (x.transpose(1, 2) for x in qkv.split((hq, hkv, hkv), dim=2))  # [B, heads, T, D]
        attn = self.layer.self_attn
        if cache is not None:
            k, v = cache.update(k, v, attn.layer_idx, kwargs=kwargs)
        interface = ALL_ATTENTION_FUNCTIONS[attn.config._attn_implementation]
        out, _ = interface(attn, q, k, v, attention_mask, dropout=0.0, scaling=attn.scaling, **self.extra, **kwargs)
        out = out.reshape(b * t, hq * d).contiguous()
        return post_attention(h, out, o_p, self.layer.post_attention_layernorm, gu_p, down_p).view(b, t, width)
