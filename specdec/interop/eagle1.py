"""EAGLE-1 heads (also EAGLE-2's: the same weights) in the layouts vLLM, SGLang and the EAGLE repo read; import only.

``config.json`` is a one-layer Llama config: the EAGLE repo's (``architectures: ["LlamaForCausalLM"]``,
``num_hidden_layers: 1``, optional ``bias`` for fc, default true), or with ``EAGLEModel`` (vLLM's converted
checkpoints, possibly nesting the Llama config under ``model``), ``EagleLlamaForCausalLM`` (vLLM) or
``LlamaForCausalLMEagle`` (SGLang). Weights, with or without a ``model.`` prefix::

    theirs                                    ours (drafters.eagle.EagleHead, kind "eagle")
    fc.weight [H, 2H]                    ->   fc.weight
    fc.bias [H] (absent: no bias)        ->   fc.bias (zeros when absent: the same function)
    layers.0.self_attn.* / mlp.* /       ->   layer.* (the target's own decoder layer class, built with
      post_attention_layernorm.weight           input_norm=False: no input_layernorm, as in EAGLE-1)
    lm_head.weight [V, H] (rarely)       ->   lm_head.weight; absent: the target's LM head (meta "lm_head": "target")
    embed_tokens.weight (a copy)         ->   checked to be the target's, then dropped (we embed with the target's)
    -                                    ->   d2t = arange(V)

The computation is the same as vLLM's ``llama_eagle.py``: ``fc(cat(embed(x_{i+1}), f_i))`` -> one Llama decoder
layer whose input RMSNorm is left out -> (no final norm) -> the target's LM head. ``f_i`` is the target's last
hidden state *after its final norm* in both: vLLM's model runner passes the target model's output hidden states
(``hidden_states[:num_scheduled_tokens]``, which vLLM's Llama returns normed) with the input ids shifted by one,
as our verifier's ``hidden`` and the pairs ``(f_i, x_{i+1})`` of :class:`drafters.eagle.EagleDrafter`.

Where engines differ from the trained head, we follow the head: vLLM's ``llama_eagle`` builds fc without a bias
(it cannot load the EAGLE repo's ``fc.bias``), we load it. The head's layer settings (heads, MLP width, RMS eps,
rotary settings) are recorded and must equal the target's (the drafter refuses otherwise: it builds the layer
from the target's config), as must the hidden size, the vocabulary and the model family.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig

from specdec.interop.files import read_weights
from specdec.models.checkpoint import CheckpointError

ARCHITECTURES = ("EAGLEModel", "EagleLlamaForCausalLM", "LlamaForCausalLMEagle")
# settings of the layer the drafter compares with the target's (transformers' names, after its normalisation)
LAYER_SETTINGS = ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
                  "rms_norm_eps", "rope_parameters", "attention_bias", "mlp_bias")
LAYER_PARAMS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                "post_attention_layernorm.weight")


def detect(config: dict) -> bool:
    archs = config.get("architectures") or []
    if "speculators_model_type" in config or any("eagle3" in a.lower() for a in archs):
        return False
    if any(a in ARCHITECTURES for a in archs):
        return True
    if config.get("model_type") == "eagle":  # vLLM's EAGLEConfig: the Llama config nested under "model"
        return config.get("method", "eagle") == "eagle" and isinstance(config.get("model"), dict)
    return archs == ["LlamaForCausalLM"] and config.get("num_hidden_layers") == 1  # the EAGLE repo's


def layer_config(config: dict, where: Path):
    """transformers' config of the head's layer (normalised: ``rope_parameters``, ``head_dim``, ...)."""
    inner = dict(config["model"]) if isinstance(config.get("model"), dict) else dict(config)
    model_type = inner.pop("model_type", None) or "llama"
    inner.pop("architectures", None)
    try:
        cfg = AutoConfig.for_model(model_type, **inner)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{where}/config.json does not describe a {model_type!r} layer transformers knows "
                              f"({e}).") from None
    if int(cfg.num_hidden_layers) != 1:
        raise CheckpointError(f"{where}: an EAGLE head with {cfg.num_hidden_layers} layers; EAGLE-1 heads have one.")
    return cfg


def our_state(weights: dict, hidden: int, bias: bool | None, where: Path) -> dict:
    """EAGLE-1 weights -> our ``EagleHead`` keys (``fc.bias`` zeros when absent; ``embed_tokens.weight`` kept for
    the drafter's target check)."""
    weights = {k.removeprefix("model."): v for k, v in weights.items()}
    if "fc.weight" not in weights:
        raise CheckpointError(f"{where} holds no fc.weight: not an EAGLE-1 head. (A draft model's directory goes in "
                              "drafter='draft_model', drafter_kwargs={'path': ...}.)")
    fc = weights.pop("fc.weight")
    if tuple(fc.shape) != (hidden, 2 * hidden):
        raise CheckpointError(f"{where}: fc.weight is {tuple(fc.shape)}, not ({hidden}, {2 * hidden}) for the "
                              f"config's hidden size {hidden}.")
    b = weights.pop("fc.bias", None)
    if bias and b is None:
        raise CheckpointError(f"{where}: config.json says fc has a bias but the weights hold no fc.bias.")
    if b is None or bias is False:  # no bias: zeros compute the same function
        b = torch.zeros(hidden, dtype=fc.dtype)
    state = {"fc.weight": fc, "fc.bias": b}
    for name in LAYER_PARAMS:
        if f"layers.0.{name}" not in weights:
            raise CheckpointError(f"{where}: no layers.0.{name} in the weights: not an EAGLE-1 head.")
        state[f"layer.{name}"] = weights.pop(f"layers.0.{name}")
    for name in ("lm_head.weight", "embed_tokens.weight"):
        if name in weights:
            state[name] = weights.pop(name)
    if weights:
        raise CheckpointError(f"{where}: weights EAGLE-1 heads do not have: {sorted(weights)[:5]} (an input norm on "
                              "layer 0, a final norm, more layers or a token map are not EAGLE-1's layout).")
    return state


def load(path: Path, config: dict, allow_pickle: bool) -> tuple[dict, dict]:
    cfg = layer_config(config, path)
    hidden, vocab = int(cfg.hidden_size), int(cfg.vocab_size)
    bias = config.get("bias", config.get("eagle_fc_bias"))  # the EAGLE repo's / vLLM v0's flag; None: as stored
    state = our_state(read_weights(path, allow_pickle), hidden, bias, path)
    own = state.get("lm_head.weight")
    if own is not None and tuple(own.shape) != (vocab, hidden):
        raise CheckpointError(f"{path}: lm_head.weight is {tuple(own.shape)}, not ({vocab}, {hidden}).")
    state["d2t"] = torch.arange(vocab)
    meta_cfg = {"input_norm": False, "lm_head": "own" if own is not None else "target", "hidden_size": hidden,
                "vocab_size": vocab, "model_type": cfg.model_type,
                "layer": {k: getattr(cfg, k) for k in LAYER_SETTINGS if getattr(cfg, k, None) is not None}}
    return state, {"format": 1, "kind": "eagle", "config": meta_cfg, "target": None, "source": "eagle1"}
