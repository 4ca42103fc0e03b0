"""EAGLE-3 head: the layout vLLM, SGLang and SpecForge serve (``LlamaForCausalLMEagle3``), trained and run here.

It differs from the EAGLE-style head of :mod:`drafters.eagle` in three ways that matter for export:

- the target features are the hidden states of several target layers (``aux_layers``, concatenated,
  ``[.., k * H_t]``), reduced by ``fc`` (no bias) to the head's width; with ``aux_layers=()`` the target's last
  hidden state (after its final norm) goes in unchanged and there is no ``fc``;
- its one layer reads ``cat(input_layernorm(embedding), hidden_norm(hidden))`` (attention projections take
  ``2 H`` inputs) and keeps ``hidden`` as its residual; the layer's output is a *pre-norm* hidden state, which is
  what the next draft level reads in place of target features;
- its logits are ``lm_head(norm(output))`` over a draft vocabulary (``d2t``), never the target's own features:
  the head is trained on tokens only.

Layer index ``i`` in ``aux_layers`` is transformers' ``hidden_states[i]``: the *input* of decoder layer ``i``
(``0``: the embeddings), the same convention as vLLM's ``eagle_aux_hidden_state_layer_ids``; tools that count
layer *outputs* (SpecForge's training code) are one lower. The default is ``(2, L // 2, L - 3)`` for an
``L``-layer target, vLLM's default.

The head is a Llama layer whatever the target family (as in the engines): built from transformers' Llama modules
(attention with a ``2 H`` input, MLP, RMSNorm, rotary), no copied model code. :class:`Eagle3Drafter` drafts with it
exactly as :class:`drafters.eagle.EagleDrafter` does (static or dynamic trees, its own KV cache).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from drafters.eagle import EagleDrafter
from specdec import interop
from specdec.errors import ConfigError
from specdec.models import checkpoint, hf_cache
from specdec.models.checkpoint import CheckpointError

KIND = "eagle3"


def default_aux_layers(num_layers: int) -> tuple[int, ...]:
    """vLLM's default EAGLE-3 feature layers for an ``num_layers``-layer target (layer inputs)."""
    return (2, num_layers // 2, num_layers - 3)


@dataclass(frozen=True)
class Eagle3Arch:
    """Everything that shapes an EAGLE-3 head (stored in its checkpoint, written to the engines' config.json).

    ``rope_parameters``: transformers' rotary settings (``rope_type``, ``rope_theta``, ...). ``aux_layers``: target
    layer inputs read as features (empty: the target's last hidden state, no ``fc``). ``norm_before_residual``:
    the residual is the *normed* hidden state (speculators' default; SpecForge's heads keep it False).
    """

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int  # the target's
    draft_vocab_size: int
    target_hidden_size: int
    aux_layers: tuple[int, ...] = ()
    rms_norm_eps: float = 1e-5
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    max_position_embeddings: int = 8192
    attention_bias: bool = False
    norm_before_residual: bool = False
    own_embedding: bool = False  # the head has its own token embedding (some public heads); else the target's

    @classmethod
    def for_target(cls, config, draft_vocab_size: int, aux_layers: tuple[int, ...] | None = None) -> Eagle3Arch:
        """A head as wide as the target (its heads, MLP width and rotary settings where it has them)."""
        h = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        rope = dict(getattr(config, "rope_parameters", None) or {})
        rope.setdefault("rope_type", "default")
        rope.setdefault("rope_theta", float(getattr(config, "rope_theta", None) or 10000.0))
        layers = int(config.num_hidden_layers)
        aux = default_aux_layers(layers) if aux_layers is None else tuple(int(i) for i in aux_layers)
        bad = [i for i in aux if not 0 <= i < layers]
        if bad:
            raise ConfigError(f"EAGLE-3 feature layers {bad} are outside this target's 0..{layers - 1} (a layer's "
                              "index names its input, 0 = the embeddings).")
        return cls(hidden_size=h, intermediate_size=int(getattr(config, "intermediate_size", None) or 4 * h),
                   num_attention_heads=heads,
                   num_key_value_heads=int(getattr(config, "num_key_value_heads", None) or heads),
                   head_dim=int(getattr(config, "head_dim", None) or h // heads),
                   vocab_size=int(config.vocab_size), draft_vocab_size=int(draft_vocab_size),
                   target_hidden_size=h, aux_layers=aux,
                   rms_norm_eps=float(getattr(config, "rms_norm_eps", None) or 1e-5), rope_parameters=rope,
                   max_position_embeddings=int(getattr(config, "max_position_embeddings", None) or 8192))

    @classmethod
    def from_dict(cls, d: dict, target_layers: int | None = None) -> Eagle3Arch:
        """From a checkpoint's ``arch``; ``aux_layers`` None (a public head relying on the engines' default) is
        resolved for a ``target_layers``-layer target."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise CheckpointError(f"unknown EAGLE-3 head settings {unknown}; known: {sorted(known)}.")
        aux = d.get("aux_layers", ())
        if aux is None:
            if target_layers is None:
                raise CheckpointError("this EAGLE-3 head reads the engines' default feature layers of its target: "
                                      "load it with the target (Eagle3Drafter(target, path=...)).")
            aux = default_aux_layers(int(target_layers))
        return cls(**{**d, "aux_layers": tuple(int(i) for i in aux)})

    def to_dict(self) -> dict:
        return {**asdict(self), "aux_layers": list(self.aux_layers)}

    @property
    def feature_size(self) -> int:
        """Width of the target features the head reads: ``k * H_t`` (or ``H_t`` without aux layers)."""
        return self.target_hidden_size * max(1, len(self.aux_layers))

    def llama_config(self, hidden_size: int | None = None) -> LlamaConfig:
        cfg = LlamaConfig(hidden_size=hidden_size or self.hidden_size, intermediate_size=self.intermediate_size,
                          num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
                          head_dim=self.head_dim, num_hidden_layers=1, vocab_size=self.vocab_size,
                          rms_norm_eps=self.rms_norm_eps, max_position_embeddings=self.max_position_embeddings,
                          rope_parameters=dict(self.rope_parameters), attention_bias=self.attention_bias)
        cfg._attn_implementation = "sdpa"
        return cfg


class Eagle3Layer(nn.Module):
    """The head's decoder layer: attention over ``cat(norm(embeds), norm(hidden))`` (``[B, L, 2H]`` in, ``H`` out)
    with ``hidden`` as the residual, then a Llama MLP. Returns the pre-norm output ``[B, L, H]``."""

    def __init__(self, arch: Eagle3Arch) -> None:
        super().__init__()
        h = arch.hidden_size
        self.config = arch.llama_config(2 * h)  # the attention's q/k/v read 2H features
        self.self_attn = LlamaAttention(self.config, layer_idx=0)
        self.self_attn.o_proj = nn.Linear(arch.num_attention_heads * arch.head_dim, h, bias=arch.attention_bias)
        self.mlp = LlamaMLP(arch.llama_config())
        self.input_layernorm = LlamaRMSNorm(h, eps=arch.rms_norm_eps)
        self.hidden_norm = LlamaRMSNorm(h, eps=arch.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(h, eps=arch.rms_norm_eps)
        self.norm_before_residual = arch.norm_before_residual

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, position_embeddings, mask, cache) -> torch.Tensor:
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_before_residual else hidden
        x = torch.cat([self.input_layernorm(embeds), normed], dim=-1)
        attn, _ = self.self_attn(x, position_embeddings=position_embeddings, attention_mask=mask,
                                 **hf_cache.cache_kwargs(self.self_attn, cache))
        residual = residual + attn
        return residual + self.mlp(self.post_attention_layernorm(residual))


class Eagle3Head(nn.Module):
    """``fc`` (target features only) -> :class:`Eagle3Layer` -> pre-norm output; ``logits`` = ``lm_head(norm(.))``.

    Shapes: ``hidden [B, L, k H_t]`` when ``from_target`` (target features; ``[B, L, H_t]`` without aux layers)
    else ``[B, L, H]`` (the head's own pre-norm outputs), ``embeds [B, L, H]``, ``position_ids [B, L]``, ``mask
    [B, 1, L, past + L]`` (additive, or None for causal) -> ``[B, L, H]``. ``d2t [V_draft]``: target id of each
    draft id (ascending; stored as absolute ids, exported as the engines' offsets).
    """

    def __init__(self, arch: Eagle3Arch, d2t: torch.Tensor) -> None:
        super().__init__()
        if len(d2t) != arch.draft_vocab_size:
            raise CheckpointError(f"d2t has {len(d2t)} entries but the head's draft vocabulary is "
                                  f"{arch.draft_vocab_size}.")
        self.arch = arch
        self.config = arch.llama_config()
        h = arch.hidden_size
        self.fc = nn.Linear(arch.feature_size, h, bias=False) if arch.aux_layers else None
        self.midlayer = Eagle3Layer(arch)
        self.rotary = LlamaRotaryEmbedding(config=self.config)
        self.norm = LlamaRMSNorm(h, eps=arch.rms_norm_eps)
        self.lm_head = nn.Linear(h, arch.draft_vocab_size, bias=False)
        self.embed = nn.Embedding(arch.vocab_size, h) if arch.own_embedding else None
        self.register_buffer("d2t", d2t.long().clone())

    def attention_modules(self) -> list[nn.Module]:
        """The modules whose ``config`` picks the attention implementation (for ``gqa_attention_on``)."""
        return [self.midlayer.self_attn]

    def init_from_target(self, target) -> None:
        """Warm start: ``fc`` passes the deepest feature layer through, the layer starts as the identity on its
        residual (output projections zero), ``norm`` and ``lm_head`` rows from the target's (a logit lens on the
        deepest feature layer)."""
        with torch.no_grad():
            if self.fc is not None:
                h, ht = self.arch.hidden_size, self.arch.target_hidden_size
                self.fc.weight.mul_(0.1)
                if h == ht:
                    self.fc.weight[:, -ht:].copy_(torch.eye(h))
            self.midlayer.self_attn.o_proj.weight.zero_()
            self.midlayer.mlp.down_proj.weight.zero_()
            rows = target.get_output_embeddings().weight
            self.lm_head.weight.copy_(rows[self.d2t.to(rows.device)])
            final_norm = getattr(target.get_decoder(), "norm", None)
            if isinstance(getattr(final_norm, "weight", None), torch.Tensor) and final_norm.weight.shape == \
                    self.norm.weight.shape:
                self.norm.weight.copy_(final_norm.weight)

    def forward(self, hidden: torch.Tensor, embeds: torch.Tensor, position_ids: torch.Tensor,
                mask: torch.Tensor | None = None, cache=None, from_target: bool = True) -> torch.Tensor:
        if from_target and self.fc is not None:
            hidden = self.fc(hidden.to(self.fc.weight.dtype))
        hidden = hidden.to(embeds.dtype)
        return self.midlayer(embeds, hidden, self.rotary(hidden, position_ids), mask, cache)

    def logits(self, g: torch.Tensor) -> torch.Tensor:
        """``[..., V_draft]`` draft logits for pre-norm outputs ``g [..., H]``."""
        return self.lm_head(self.norm(g))


def load_head(path, allow_pickle: bool = False, target=None) -> tuple[Eagle3Head, dict]:
    """``(head, meta)`` of an ``eagle3`` checkpoint: written here (``train.eagle3``) or a public EAGLE-3 /
    speculators directory (:mod:`specdec.interop`). ``target``: refuses a checkpoint of ours trained for another
    target (its fingerprint) and resolves a public head's default feature layers."""
    state, meta = interop.load_checkpoint(path, kind=KIND, target=target, allow_pickle=allow_pickle)
    arch = dict(meta["config"]["arch"])
    arch["own_embedding"] = "embed.weight" in state
    arch = Eagle3Arch.from_dict(arch, None if target is None else int(target.config.num_hidden_layers))
    if "d2t" not in state:
        raise CheckpointError(f"{path} has no d2t (the draft vocabulary's target ids).")
    head = Eagle3Head(arch, state["d2t"])
    checkpoint.load_into(head, state, path)
    return head, meta


def check_fits(arch: Eagle3Arch, target, path=None) -> None:
    """Refuse a head made for another target: hidden size, vocabulary or feature layers that do not fit."""
    cfg = target.config
    where = f" ({path})" if path else ""
    problems = []
    if arch.target_hidden_size != int(cfg.hidden_size):
        problems.append(f"it reads features of width {arch.target_hidden_size}, the target's hidden size is "
                        f"{cfg.hidden_size}")
    vocab = int(target.get_input_embeddings().weight.shape[0])
    if arch.vocab_size != vocab:
        problems.append(f"its vocabulary has {arch.vocab_size} tokens, the target's {vocab}")
    if not arch.own_embedding and arch.hidden_size != int(target.get_input_embeddings().weight.shape[1]):
        problems.append(f"its width {arch.hidden_size} is not the target embedding's "
                        f"{target.get_input_embeddings().weight.shape[1]}")
    bad = [i for i in arch.aux_layers if not 0 <= i < int(cfg.num_hidden_layers)]
    if bad:
        problems.append(f"feature layers {bad} do not exist in a {cfg.num_hidden_layers}-layer target")
    if problems:
        raise CheckpointError(f"this EAGLE-3 head{where} was made for another target: {'; '.join(problems)}. Use "
                              "a head trained for this target (python -m train.eagle3 target=...).")


class Eagle3Drafter(EagleDrafter):
    """Proposes top-k trees from an EAGLE-3 head (the options of :class:`drafters.eagle.EagleDrafter`).

    path: an ``eagle3`` checkpoint (``python -m train.eagle3``) or a public EAGLE-3 / speculators directory; None:
    the one shipped for the default target. allow_pickle: read a public pickle checkpoint (only one you trust).
    The verifier returns the hidden states of the head's ``aux_layers`` (declared as ``needs_hidden_states``).
    """

    def __init__(self, target=None, tokenizer=None, path: str | None = None, head: Eagle3Head | None = None,
                 choices: list[list[int]] | None = None, depth: int | None = None, width: int = 1,
                 dtype: str | None = None, max_nodes: int | None = None, dynamic: bool = False,
                 top_k: int = 4, min_value: float = 0.0, allow_pickle: bool = False, batched: bool = True) -> None:
        if target is None:
            raise ConfigError("the eagle3 drafter runs on the target's features: pass target=... .")
        trained = None
        if head is None:
            path = path or checkpoint.shipped(KIND)
            head, meta = load_head(path, allow_pickle, target)
            trained = meta["config"].get("choices")
        check_fits(head.arch, target, path)
        self.needs_hidden_states = head.arch.aux_layers or True
        super().__init__(target, tokenizer, head=head, choices=choices, depth=depth, width=width, dtype=dtype,
                         max_nodes=max_nodes, dynamic=dynamic, top_k=top_k, min_value=min_value, trained=trained,
                         batched=batched)
        if self.head.embed is not None:  # a public head with its own embedding table
            self.embed = self.head.embed


def head_copy(head: Eagle3Head) -> Eagle3Head:
    """A detached CPU copy (what a training job ships while it keeps training the original)."""
    out = Eagle3Head(head.arch, head.d2t.cpu())
    out.load_state_dict({k: v.detach().cpu() for k, v in head.state_dict().items()})
    return out


__all__ = ["KIND", "Eagle3Arch", "Eagle3Drafter", "Eagle3Head", "Eagle3Layer", "check_fits", "default_aux_layers",
           "head_copy", "load_head"]
