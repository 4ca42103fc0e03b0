"""A paged forward's decoder without transformers' model loop: every layer, whole, in one C++ call.

On the C++ attention kernel, each fused decoder layer of a paged forward can run as one call
(:class:`verifiers.paged.layer_kernel.PagedWholeLayer`), and here all of them run in one
(:meth:`~verifiers.paged.layer_kernel.PagedWholeLayer.run_layers`). What transformers' model forward adds around those calls is
its own Python: the argument and output-capture decorators, a causal mask the paged attention never reads, and per
layer a module call, the fused forward's checks and reshapes. :func:`decoder_hidden` runs the same functions in the
same order (the embedding, the rotary embedding, the layers, the final norm), so the hidden states are bitwise those of
``model.get_decoder()(...)``, for the decoders whose forward is exactly that (:data:`DECODERS`); anything else (another
family, a layer that is not fused, hidden states of every layer asked for) returns None and the model's own forward
runs.
"""

from __future__ import annotations

import torch

from specdec.kernels.cpu_decoder_layer import DecoderLayerForward
from verifiers.paged.layer_kernel import PagedWholeLayer

# decoder classes whose forward is embed_tokens -> rotary_emb -> layers -> norm and nothing else (their masks are
# the paged attention's business)
DECODERS = frozenset({"LlamaModel", "MistralModel", "Qwen2Model"})


def fused_layers(model) -> list[DecoderLayerForward] | None:
    """The fused forwards of every decoder layer of ``model`` (installed by
    :func:`specdec.kernels.cpu_gemm.fast_linears`), or None where a layer is not fused or the decoder is not one of
    :data:`DECODERS`."""
    dec = model.get_decoder()
    if type(dec).__name__ not in DECODERS or len(dec.layers) != dec.config.num_hidden_layers:
        return None
    layers = [layer.__dict__.get("forward") for layer in dec.layers]
    return layers if all(isinstance(f, DecoderLayerForward) for f in layers) else None


@torch.inference_mode()
def decoder_hidden(model, runner: PagedWholeLayer, input_ids: torch.Tensor,
                   position_ids: torch.Tensor) -> torch.Tensor | None:
    """The decoder's last hidden state ``[T, H]`` for the packed rows ``input_ids``, ``position_ids [1, T]`` of a
    paged forward whose layers ``runner`` runs (inside :func:`verifiers.paged.attention.paged_attention_on`), or None
    where this route does not serve the model or the rows."""
    layers = fused_layers(model)
    if layers is None:
        return None
    dec = model.get_decoder()
    h = dec.embed_tokens(input_ids)  # [1, T, H]
    rope = dec.rotary_emb(h, position_ids=position_ids)
    if not layers[0].takes(h, rope):
        return None
    t = h.shape[1]
    x = h.reshape(t, -1).contiguous()
    cos, sin = layers[0].rope(rope, 1, t)
    x = runner.run_layers(layers, x, cos, sin)
    return None if x is None else dec.norm(x[None])[0]
