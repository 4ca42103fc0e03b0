"""EAGLE-3 heads in the layout vLLM, SGLang and SpecForge use: ``config.json`` (``LlamaForCausalLMEagle3``) and
``model.safetensors`` with ``fc.weight``, ``midlayer.*``, ``norm.weight``, ``lm_head.weight``, ``d2t``, ``t2d``.

Our ``eagle3`` drafter (:mod:`drafters.eagle3`) has the same modules under the same names, so the conversion is
about the config and the draft vocabulary: we keep ``d2t`` as the target id of each draft id, the engines as an
*offset* (target id = draft id + ``d2t[draft id]``), with ``t2d`` a boolean mask over the target vocabulary.
Feature layers are ``eagle_config.eagle_aux_hidden_state_layer_ids`` (layer inputs, as vLLM counts); a config
without them means the engine's default ``(2, L // 2, L - 3)`` for an ``L``-layer target. Settings our head does
not implement (``norm_before_fc``, ``fc_norm``, ``norm_output``, more than one layer, an own embedding table that
differs in width) are refused by name rather than loaded approximately.
"""

from __future__ import annotations

from pathlib import Path

import torch

from specdec.interop.files import read_weights, write_dir
from specdec.models.checkpoint import CheckpointError

ARCHITECTURE = "LlamaForCausalLMEagle3"
UNSUPPORTED = ("norm_before_fc", "fc_norm", "norm_output")


def detect(config: dict) -> bool:
    archs = config.get("architectures") or []
    return "speculators_model_type" not in config and any("Eagle3" in a for a in archs)


def d2t_offsets(d2t: torch.Tensor) -> torch.Tensor:
    """Our absolute target ids ``[V_draft]`` -> the engines' offsets (target id - draft id)."""
    return d2t.long() - torch.arange(len(d2t))


def t2d_mask(d2t: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[V]`` bool: which target tokens the draft vocabulary holds."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[d2t.long()] = True
    return mask


def arch_from_config(cfg: dict, layer_cfg: dict, state: dict, *, aux_layers, norm_before_residual: bool,
                     where: Path) -> dict:
    """Our ``Eagle3Arch`` fields from an engine config (``layer_cfg``: the Llama layer's settings) and the weights."""
    bad = [k for k in UNSUPPORTED if cfg.get(k) or layer_cfg.get(k) or (cfg.get("eagle_config") or {}).get(k)]
    if bad:
        raise CheckpointError(f"{where}: EAGLE-3 options {bad} are not implemented by specdec's eagle3 head; "
                              "this checkpoint cannot be run exactly here.")
    if int(layer_cfg.get("num_hidden_layers", 1)) != 1:
        raise CheckpointError(f"{where}: an EAGLE-3 head with {layer_cfg['num_hidden_layers']} layers; specdec runs "
                              "one-layer heads (the EAGLE-3 paper's and SpecForge's).")
    h = int(layer_cfg["hidden_size"])
    heads = int(layer_cfg["num_attention_heads"])
    vocab = int(layer_cfg.get("vocab_size") or cfg.get("vocab_size"))
    draft_vocab = int(cfg.get("draft_vocab_size") or layer_cfg.get("draft_vocab_size") or vocab)
    rope = dict(layer_cfg.get("rope_parameters") or layer_cfg.get("rope_scaling") or {})
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", float(layer_cfg.get("rope_theta") or 10000.0))
    target_h = int(cfg.get("target_hidden_size") or layer_cfg.get("target_hidden_size") or h)
    if aux_layers is not None:
        aux = [int(i) for i in aux_layers]
    elif "fc.weight" in state:
        aux = None  # the engines' default for the target, resolved when the target is known
    else:
        aux = []
    if "fc.weight" in state and aux is not None and not aux:
        raise CheckpointError(f"{where}: the weights hold fc.weight but the config turns feature layers off.")
    return {"hidden_size": h, "intermediate_size": int(layer_cfg["intermediate_size"]), "num_attention_heads": heads,
            "num_key_value_heads": int(layer_cfg.get("num_key_value_heads") or heads),
            "head_dim": int(layer_cfg.get("head_dim") or h // heads), "vocab_size": vocab,
            "draft_vocab_size": draft_vocab, "target_hidden_size": target_h, "aux_layers": aux,
            "rms_norm_eps": float(layer_cfg.get("rms_norm_eps") or 1e-6), "rope_parameters": rope,
            "max_position_embeddings": int(layer_cfg.get("max_position_embeddings") or 8192),
            "attention_bias": bool(layer_cfg.get("attention_bias", False)),
            "norm_before_residual": bool(norm_before_residual)}


def our_state(state: dict, arch: dict, layer_prefix: str, where: Path) -> dict:
    """Engine weights -> our head's state dict (``midlayer.*``, absolute ``d2t``, an own ``embed_tokens`` kept)."""
    out = {}
    for k, v in state.items():
        if k in ("t2d",) or k.endswith(".t2d"):
            continue
        name = k[len("model."):] if k.startswith("model.") else k
        if name.startswith(layer_prefix):
            name = "midlayer." + name[len(layer_prefix):]
        out[name] = v
    vd = arch["draft_vocab_size"]
    if "d2t" in out:
        if len(out["d2t"]) != vd:
            raise CheckpointError(f"{where}: d2t has {len(out['d2t'])} entries, draft_vocab_size is {vd}.")
        out["d2t"] = out["d2t"].long() + torch.arange(vd)
    elif vd == arch["vocab_size"]:
        out["d2t"] = torch.arange(vd)
    else:
        raise CheckpointError(f"{where}: a draft vocabulary of {vd} tokens but no d2t mapping to the target's.")
    if "embed_tokens.weight" in out:
        out["embed.weight"] = out.pop("embed_tokens.weight")
    return out


def load(path: Path, config: dict, allow_pickle: bool) -> tuple[dict, dict]:
    state = read_weights(path, allow_pickle)
    eagle = config.get("eagle_config") or {}
    use_aux = eagle.get("use_aux_hidden_state", config.get("use_aux_hidden_state", True))
    ids = eagle.get("eagle_aux_hidden_state_layer_ids") or config.get("eagle_aux_hidden_state_layer_ids")
    arch = arch_from_config(config, config, state, aux_layers=ids if use_aux else [],
                            norm_before_residual=config.get("norm_before_residual", False), where=path)
    return our_state(state, arch, "layers.0.", path), {
        "format": 1, "kind": "eagle3", "config": {"arch": arch}, "target": None, "source": "eagle3"}


def layer_config(arch: dict, dtype: torch.dtype) -> dict:
    """The Llama settings of the head's layer, as transformers writes them (plus the legacy rope keys engines
    still read)."""
    rope = dict(arch["rope_parameters"])
    return {"model_type": "llama", "hidden_size": arch["hidden_size"], "intermediate_size": arch["intermediate_size"],
            "num_attention_heads": arch["num_attention_heads"], "num_key_value_heads": arch["num_key_value_heads"],
            "head_dim": arch["head_dim"], "num_hidden_layers": 1, "hidden_act": "silu",
            "rms_norm_eps": arch["rms_norm_eps"], "max_position_embeddings": arch["max_position_embeddings"],
            "vocab_size": arch["vocab_size"], "attention_bias": arch["attention_bias"], "mlp_bias": False,
            "tie_word_embeddings": False, "rope_parameters": rope, "rope_theta": rope.get("rope_theta", 10000.0),
            "rope_scaling": None if rope.get("rope_type", "default") == "default" else rope,
            "torch_dtype": str(dtype).replace("torch.", ""), "dtype": str(dtype).replace("torch.", "")}


def engine_state(state: dict, layer_prefix: str, vocab_size: int) -> dict:
    """Our head's state -> engine weights: the layer under ``layer_prefix``, ``d2t`` as offsets, ``t2d`` over the
    target's ``vocab_size`` tokens."""
    out = {}
    for k, v in state.items():
        if k == "d2t":
            continue
        name = layer_prefix + k[len("midlayer."):] if k.startswith("midlayer.") else k
        out["embed_tokens.weight" if name == "embed.weight" else name] = v
    d2t = state["d2t"].long()
    return {**out, "d2t": d2t_offsets(d2t), "t2d": t2d_mask(d2t, vocab_size)}


def head_parts(state: dict, meta: dict) -> tuple[dict, torch.dtype]:
    """``(arch, dtype)`` of an ``eagle3`` checkpoint to export, refusing any other kind."""
    if meta.get("kind") != "eagle3":
        raise CheckpointError(f"only an eagle3 drafter exports to the EAGLE-3 layout; this checkpoint holds "
                              f"{meta.get('kind')!r} (train one with python -m train.eagle3).")
    arch = meta["config"]["arch"]
    if arch.get("aux_layers") is None:
        raise CheckpointError("this head's feature layers are the engine default of an unknown target; load it "
                              "with its target and save it again before exporting.")
    dtype = next(v.dtype for k, v in state.items() if v.is_floating_point())
    return arch, dtype


def export(state: dict, meta: dict, out_dir: Path, **options) -> Path:
    """The EAGLE-3 directory vLLM/SGLang load with ``speculative_config={"method": "eagle3", "model": out_dir}``."""
    if options:
        raise CheckpointError(f"export to eagle3 takes no options; got {sorted(options)}.")
    arch, dtype = head_parts(state, meta)
    aux = list(arch["aux_layers"])
    config = {"architectures": [ARCHITECTURE], **layer_config(arch, dtype),
              "draft_vocab_size": arch["draft_vocab_size"], "target_hidden_size": arch["target_hidden_size"],
              "norm_before_residual": arch["norm_before_residual"],
              "eagle_config": {"use_aux_hidden_state": bool(aux), **({"eagle_aux_hidden_state_layer_ids": aux}
                                                                     if aux else {})}}
    return write_dir(out_dir, config, engine_state(state, "midlayer.", arch["vocab_size"]), {"README.md": card(meta, "eagle3")})


def card(meta: dict, layout: str) -> str:
    arch = meta["config"]["arch"]
    training = meta.get("training") or {}
    return "\n".join([
        f"# EAGLE-3 head exported by specdec ({layout} layout)", "",
        f"Exported from a specdec `eagle3` checkpoint (`specdec export ... --to {layout}`).", "",
        f"- feature layers (layer inputs, vLLM's count): {arch['aux_layers'] or 'none (the last hidden state)'}",
        f"- draft vocabulary: {arch['draft_vocab_size']} of {arch['vocab_size']} tokens",
        f"- trained for target: `{(meta.get('target') or {})}`",
        f"- validation: `{training.get('val', {})}`", ""])
