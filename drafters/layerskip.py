"""Layer-skip self-draft: the target itself, with some decoder layers (or only their attention) left out.

The draft model is a **view** of the target that shares every parameter: a shallow copy of the causal LM whose
inner model holds a new ``layers`` list, where a skipped layer is :class:`SkippedLayer` (returns its input) and an
attention-skipped layer is :class:`MLPOnlyLayer` (runs only the MLP half on the residual stream). Nothing is loaded
and no module of the target is changed. Later layers, and later attention sublayers in particular, change the
residual stream little (self-speculative decoding, Zhang et al. 2023; "What matters in transformers? Not all
attention is needed", He et al. 2024), so the view's next-token guess often matches the target's for a fraction of
the cost.

An optional **exit adapter** (:class:`ExitAdapter`, trained by ``python -m train.layerskip``) is a small residual MLP
applied to the view's last hidden state before the target's final norm and LM head; it lives on the view only.

The drafter is a :class:`drafters.draft_model.DraftModelDrafter` whose model is that view: a chain or top-k tree
grown level by level over the view's own ``DynamicCache``. A skipped layer never writes its cache slot (its slot stays
uninitialised, which ``specdec.models.hf_cache.crop``/``keep_positions`` skip); the cache length is read from layer 0,
so layer 0 always runs.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from drafters.draft_model import DraftModelDrafter
from specdec.errors import ConfigError
from specdec.models import checkpoint
from specdec.models.surgery import DraftVocabHead, decoder

KIND = "layerskip"
DEFAULT_DEPTH = 4  # draft tokens per path when neither the call nor a checkpoint says


class SkippedLayer(nn.Module):
    """A decoder layer left out: ``hidden_states [B, n, H]`` pass through unchanged; the KV cache is not touched."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


class MLPOnlyLayer(nn.Module):
    """A decoder layer without its attention sublayer: ``h + mlp(post_attention_layernorm(h))``, ``h [B, n, H]``.

    Holds (shares) the layer's own ``post_attention_layernorm`` and ``mlp``; its attention never runs, so its KV
    cache slot is never written.
    """

    def __init__(self, layer: nn.Module, index: int) -> None:
        super().__init__()
        missing = [n for n in ("post_attention_layernorm", "mlp") if not isinstance(getattr(layer, n, None), nn.Module)]
        # Gemma-style sandwich norms: there post_attention_layernorm normalises the attention output, not the MLP input
        if missing or hasattr(layer, "pre_feedforward_layernorm"):
            raise ConfigError(f"layer {index} ({type(layer).__name__}) is not a Llama-style pre-norm layer (its MLP "
                              "input is not post_attention_layernorm(h)); skip_attention supports those only: skip "
                              "whole layers (skip_layers) instead.")
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.mlp = layer.mlp

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class ExitAdapter(nn.Module):
    """``h + up(silu(down(rmsnorm(h))))``: a rank-``rank`` residual MLP on the view's last hidden state ``[..., H]``.

    ``up`` starts at zero, so a fresh adapter is the identity (the view's output is the plain skip model's).
    Example: ``ExitAdapter(576, 64)(h)`` with ``h [1, 5, 576]`` -> ``[1, 5, 576]``, equal to ``h`` before training.
    """

    def __init__(self, hidden_size: int, rank: int, eps: float = 1e-6) -> None:
        super().__init__()
        if rank < 1:
            raise ConfigError(f"the exit adapter needs rank >= 1; got {rank} (use adapter=None for none).")
        self.norm = nn.RMSNorm(hidden_size, eps=eps)
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size, bias=False)
        nn.init.zeros_(self.up.weight)

    @property
    def rank(self) -> int:
        return self.down.out_features

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(F.silu(self.down(self.norm(h))))


# ------------------------------------------------------------------ the view


def num_layers(model) -> int:
    return len(decoder(model).layers)


def check_skips(n_layers: int, skip_layers: Iterable[int] = (), skip_attention: Iterable[int] = ()) -> tuple[
        list[int], list[int]]:
    """Sorted, de-duplicated skip lists, or a :class:`ConfigError` naming the fix.

    Layer 0 always runs (the draft cache's length is read from its slot); indices must be ``1..n_layers-1``; a
    layer is either skipped whole or attention-only, not both. Example: ``check_skips(4, [3, 2, 3], [1])`` ->
    ``([2, 3], [1])``.
    """
    def clean(values, name: str) -> list[int]:
        if isinstance(values, str):
            raise ConfigError(f"{name} must be a list of layer indices; got {values!r} (the training job resolves "
                              "'auto'; a drafter takes the list it wrote).")
        out = sorted({int(v) for v in values})
        if 0 in out:
            raise ConfigError(f"{name} contains layer 0; layer 0 must run (the draft KV cache length is read from "
                              f"it): remove 0 from {name}.")
        bad = [v for v in out if not 0 < v < n_layers]
        if bad:
            raise ConfigError(f"{name} has layer indices {bad} out of range: this target has {n_layers} layers, so "
                              f"use indices 1..{n_layers - 1} (set drafter.{name}=[...] for this target).")
        return out

    layers, attention = clean(skip_layers or (), "skip_layers"), clean(skip_attention or (), "skip_attention")
    both = sorted(set(layers) & set(attention))
    if both:
        raise ConfigError(f"layers {both} are in both skip_layers and skip_attention; list each in one of them.")
    return layers, attention


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object sharing every submodule, parameter and buffer of ``module``, with its own registries.

    ``copy.copy`` alone would share the ``_modules``/``_parameters``/hook dicts, so replacing a child of the copy
    would replace it in the original too; each dict is copied.
    """
    if "forward" in module.__dict__:  # e.g. accelerate's device_map hooks: a forward bound to the original object
        raise ConfigError(f"{type(module).__name__}.forward is wrapped on the instance (a device_map / offloading "
                          "hook?); the layer-skip view needs a plainly loaded target (specdec.models.load_target).")
    new = copy.copy(module)
    for key, value in module.__dict__.items():
        if isinstance(value, dict):
            new.__dict__[key] = value.copy()
    return new


def skip_view(target, skip_layers: Iterable[int] = (), skip_attention: Iterable[int] = (),
              adapter: nn.Module | None = None, final_norm: bool = True):
    """The target as a draft model with layers skipped; shares all of the target's parameters, changes none.

    Returns a causal LM object of the target's class: ``view(input_ids [B, n], ...)`` gives ``logits [B, n, V]``
    like the target's forward. ``adapter`` (e.g. :class:`ExitAdapter`) runs on the last hidden state before the
    final norm. ``final_norm=False`` replaces the final norm (and adapter) by the identity, so
    ``decoder(view)(...).last_hidden_state`` is the skip model's pre-norm hidden state ``[B, n, H]`` (training).
    Do not ask the view for ``output_hidden_states``: transformers would install its capture hooks on the shared
    layers. Example: ``skip_view(target, [1])(ids).logits`` = the target's logits computed without layer 1.
    """
    inner = decoder(target)
    layers_skip, attention_skip = check_skips(len(inner.layers), skip_layers, skip_attention)
    new_inner = _shallow_copy(inner)
    layers = []
    for i, layer in enumerate(inner.layers):
        if i in layers_skip:
            layers.append(SkippedLayer())
        elif i in attention_skip:
            layers.append(MLPOnlyLayer(layer, i))
        else:
            layers.append(layer)
    new_inner._modules["layers"] = nn.ModuleList(layers)
    if not final_norm:
        new_inner._modules["norm"] = nn.Identity()
    elif adapter is not None:
        new_inner._modules["norm"] = nn.Sequential(adapter, inner.norm)
    view = _shallow_copy(target)
    view._modules[getattr(target, "base_model_prefix", "model")] = new_inner
    return view


# ------------------------------------------------------------------ the drafter


class LayerSkipDrafter(DraftModelDrafter):
    """Drafts with the target minus some layers (a chain by default, or a top-k tree); lossless, greedy or sampled.

    target: required (the drafter is a view of it). path: a checkpoint written by ``python -m train.layerskip``
    (skip lists, exit adapter and recommended depth come from it). With no path, no skip lists and no adapter,
    the checkpoint shipped for the default target is used. skip_layers / skip_attention: explicit layer indices
    (``1..num_layers-1``) instead of a checkpoint; adapter: an :class:`ExitAdapter` to use with them.
    depth / width / choices: the tree shape (``depth=None``: the checkpoint's recommendation, else 4).
    d2t: a draft vocabulary (target ids, ascending; a checkpoint may carry one): the view's LM head is then the
    target's rows for those tokens only (:class:`specdec.models.surgery.DraftVocabHead`), much cheaper when few layers
    run; ``full_vocab=True`` ignores it.

    Example: ``LayerSkipDrafter(target, skip_layers=[14, 16, 18, 20], depth=3)``.
    """

    def __init__(self, target=None, tokenizer=None, path: str | None = None, skip_layers: list[int] | None = None,
                 skip_attention: list[int] | None = None, adapter: ExitAdapter | None = None,
                 depth: int | None = None, width: int = 1, choices: list[list[int]] | None = None,
                 d2t: torch.Tensor | None = None, full_vocab: bool = False) -> None:
        if target is None:
            raise ConfigError("the layerskip drafter is a view of the target: pass target=... .")
        explicit = skip_layers is not None or skip_attention is not None or adapter is not None
        if path is not None and explicit:
            raise ConfigError("the layerskip drafter takes either path=<checkpoint> (skip lists and adapter come "
                              "from it) or skip_layers/skip_attention/adapter, not both: set drafter.path=null or "
                              "drop the skip lists.")
        source = "the d2t argument"  # where the draft vocabulary came from, for its error message
        if not explicit:
            source = path or checkpoint.shipped(KIND)
            skip_layers, skip_attention, adapter, depth, d2t = self._from_checkpoint(target, source, depth)
        if adapter is not None:
            ref = next(target.parameters())
            adapter = adapter.to(device=ref.device, dtype=ref.dtype).eval()
        self.adapter = adapter
        view = skip_view(target, skip_layers or (), skip_attention or (), adapter)
        if d2t is not None and not full_vocab:  # the view's own head; the target's stays as it is
            view.set_output_embeddings(DraftVocabHead(target.get_output_embeddings(), d2t, source))
        self.skip_layers, self.skip_attention = check_skips(num_layers(target), skip_layers or (), skip_attention or ())
        super().__init__(model=view, depth=depth or DEFAULT_DEPTH, width=width, choices=choices)

    @staticmethod
    def _from_checkpoint(target, path, depth):
        state, meta = checkpoint.load(path, kind=KIND, target=target)
        state = dict(state)
        d2t = state.pop("d2t", None)
        cfg = meta["config"]
        adapter = None
        rank = int(cfg.get("adapter_rank") or 0)
        if rank > 0:
            adapter = ExitAdapter(int(target.config.hidden_size), rank)
            checkpoint.load_into(adapter, state, path)
        elif state:
            raise checkpoint.CheckpointError(f"checkpoint {path} has weights but adapter_rank {rank}; it was not "
                                             "written by train/layerskip.py.")
        return (cfg.get("skip_layers") or [], cfg.get("skip_attention") or [], adapter, depth or cfg.get("depth"),
                d2t)
