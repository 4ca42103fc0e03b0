"""Models built from a target's own parts, shared by drafters and ``train/``: no copied model code.

- :func:`decoder` finds a causal LM's inner decoder (``.layers``, ``.norm``); :func:`own_modules` is what a distilled
  draft model does not share with its target.
- :func:`draft_config`, :func:`init_from_target`, :func:`from_state`: an instance of the target's own class cut to some
  of its layers (copied for training, or loaded from a checkpoint on the target's embedding and LM head).
- :class:`DraftVocabHead`: the target's LM head cut to a draft vocabulary.
- :func:`spread_layers`, :func:`resolve_init_layers`: which target layers a draft model starts from.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from specdec.errors import ConfigError
from specdec.models import checkpoint
from specdec.models.loading import CONFIG_ERRORS


def decoder(model) -> nn.Module:
    """The causal LM's inner decoder with ``.layers`` and ``.norm`` (``model.model`` for Llama, Qwen2, Mistral...)."""
    inner = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if not isinstance(getattr(inner, "layers", None), nn.ModuleList) or not isinstance(getattr(inner, "norm", None),
                                                                                        nn.Module):
        raise ConfigError(f"this drafter needs a decoder with .layers and .norm (Llama-style); "
                          f"{type(model).__name__} has none under .{getattr(model, 'base_model_prefix', 'model')}.")
    return inner


def own_modules(model) -> nn.ModuleDict:
    """What a distilled draft model does not share with its target: its decoder layers and final norm.

    The checkpoint's tensors are this view's state dict (keys ``layers.<i>.*``, ``norm.*``).
    """
    base = decoder(model)
    return nn.ModuleDict({"layers": base.layers, "norm": base.norm})


def spread_layers(num_layers: int, target_layers: int) -> list[int]:
    """``num_layers`` target layer indices evenly spaced from the first to the last, e.g. 4 of 30 -> [0, 10, 19, 29].

    One layer: the first (the target's own token representation path starts there).
    """
    if not 1 <= num_layers <= target_layers:
        raise ConfigError(f"a draft model needs 1 to {target_layers} layers (the target's count); got {num_layers}.")
    if num_layers == 1:
        return [0]
    return [round(i * (target_layers - 1) / (num_layers - 1)) for i in range(num_layers)]


def resolve_init_layers(init_layers, num_layers: int | None, target_layers: int) -> list[int]:
    """Target layer indices to initialise the draft's layers from: ``"spread"`` or an explicit list
    (negative indices count from the end, e.g. ``[0, -1]``); the list must have ``num_layers`` entries."""
    if init_layers in (None, "spread"):
        return spread_layers(int(num_layers), target_layers)
    if isinstance(init_layers, str):
        raise ConfigError(f"init_layers must be 'spread' or a list of target layer indices; got {init_layers!r}.")
    layers = [int(i) for i in init_layers]
    bad = [i for i in layers if not -target_layers <= i < target_layers]
    if bad or not layers:
        raise ConfigError(f"init_layers {layers} must be indices of the target's {target_layers} layers.")
    if num_layers is not None and len(layers) != int(num_layers):
        raise ConfigError(f"init_layers lists {len(layers)} layers but num_layers is {num_layers}; make them agree.")
    return [i % target_layers for i in layers]


def draft_config(target, layers: list[int]):
    """The target's HF config cut to the chosen layers (per-layer settings such as ``layer_types`` follow them)."""
    cfg = copy.deepcopy(target.config)
    n = int(cfg.num_hidden_layers)
    for key in ("layer_types",):  # per-layer lists must keep the kept layers' entries
        value = getattr(cfg, key, None)
        if isinstance(value, list) and len(value) == n:
            setattr(cfg, key, [value[i] for i in layers])
    cfg.num_hidden_layers = len(layers)
    return cfg


def new_model(target, config, dtype: torch.dtype) -> nn.Module:
    """An instance of the target's own model class for ``config`` in ``dtype`` on the target's device (random
    weights, no shared tensors)."""
    impl = getattr(target.config, "_attn_implementation", None)
    config._attn_implementation = impl if impl in ("eager", "sdpa") else "sdpa"  # not a verifier's paged kernel
    model = type(target)(config).to(device=target.device, dtype=dtype)
    model.generation_config = copy.deepcopy(target.generation_config)
    return model.eval()


class DraftVocabHead(nn.Linear):
    """The target's LM head cut to a draft vocabulary: rows ``d2t`` (the most frequent target tokens, ascending ids).

    ``[..., H] -> [..., V_draft]`` logits, equal to the target head's logits at those ids. On a small target the full
    head is a large part of a draft token's cost (49152 x 576 weights read per call for SmolLM2-135M); 4096 rows keep
    nearly every token a draft gets accepted with. ``vocab_size``: the target's (for the vocabulary check).
    ``source`` names where ``d2t`` came from in the error raised when an id is outside the target's vocabulary.
    """

    def __init__(self, target_head: nn.Module, d2t: torch.Tensor, source: str | Path = "<memory>") -> None:
        w = target_head.weight
        self.vocab_size = int(w.shape[0])
        bad = d2t[(d2t < 0) | (d2t >= self.vocab_size)]
        if len(bad):
            raise checkpoint.CheckpointError(f"{source}: draft vocabulary ids {bad[:4].tolist()} are outside the "
                                             f"target's {self.vocab_size} tokens; it was made for another target.")
        super().__init__(w.shape[1], len(d2t), bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.weight.copy_(w[d2t.to(w.device)])
        self.register_buffer("d2t", d2t.long().clone().to(w.device))


def share_vocab(model, target) -> None:
    """Use the target's embedding and LM head modules (no copy; the draft model must already be in its dtype)."""
    model.set_input_embeddings(target.get_input_embeddings())
    model.set_output_embeddings(target.get_output_embeddings())


@torch.no_grad()
def init_from_target(target, layers: list[int], dtype: torch.dtype | None = None) -> nn.Module:
    """A draft model whose layer ``j`` is a copy of target layer ``layers[j]``, with copies of the target's final
    norm, embedding and LM head (tied as the target's): shares no tensor with the target, so training it leaves
    the target untouched. With every target layer it computes the target's logits."""
    model = new_model(target, draft_config(target, layers), dtype or target.dtype)
    src = decoder(target)
    for j, i in enumerate(layers):
        decoder(model).layers[j].load_state_dict(src.layers[i].state_dict())
    decoder(model).norm.load_state_dict(src.norm.state_dict())
    model.get_input_embeddings().load_state_dict(target.get_input_embeddings().state_dict())
    model.get_output_embeddings().load_state_dict(target.get_output_embeddings().state_dict())
    return model


def from_state(target, hf_config: dict, state: dict[str, torch.Tensor], path: str | Path = "<memory>",
               dtype: torch.dtype | None = None, full_vocab: bool = False) -> nn.Module:
    """A draft model on the target's embedding and LM head (shared) with its own layers + norm from ``state``
    (the :func:`own_modules` state dict), in ``dtype`` (default the target's). A ``d2t`` entry in ``state`` (and
    ``full_vocab`` False) gives it a :class:`DraftVocabHead` over those target ids instead of the full LM head."""
    dtype = dtype or target.dtype
    state = dict(state)
    d2t = state.pop("d2t", None)
    try:
        config = type(target.config).from_dict(hf_config)
        model = new_model(target, config, dtype)
    except CONFIG_ERRORS as e:  # a config transformers (or huggingface_hub's validation) rejects
        raise checkpoint.CheckpointError(
            f"the draft model's config in {path} is inconsistent ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "re-export the checkpoint with python -m train.draft_model.") from None
    share_vocab(model, target)
    checkpoint.load_into(own_modules(model), {k: v.to(dtype) for k, v in state.items()}, path)
    if d2t is not None and not full_vocab:
        model.set_output_embeddings(DraftVocabHead(target.get_output_embeddings(), d2t, path))
    return model
