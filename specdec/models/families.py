"""Which transformers model families specdec serves, and what their attention needs: declared here, proven by
``tests/test_families.py`` (which also renders docs/support-matrix.md from :data:`FAMILIES`).

specdec never changes model code. Its verifiers reach a model through public hooks: a 4D attention mask (or
transformers' mapping from layer type to mask), ``position_ids``, the ``Cache``, and a function registered with
``AttentionInterface``. What differs between families is what those hooks must carry:

* **sliding windows** (:func:`attention_spec`): per layer, read from the model's own ``layer_types`` and
  ``sliding_window`` (or, for families whose every layer slides, ``sliding_window`` alone);
* **attention logit softcapping** (Gemma 2) and the query scaling the layer passes;
* whether the family's attention goes through ``AttentionInterface`` at all (the paged verifier's only way in;
  Falcon and Bloom compute attention, with ALiBi, in their own code) and whether its code picks a branch by the
  name of the attention implementation (Falcon compares it to ``"sdpa"``), so renaming it for our forwards is safe.

A model specdec cannot serve (recurrent/state-space, encoder-decoder, no LM head, layer kinds we do not know, a
family not declared here) is refused by :func:`check_servable` before the first token, with the model type and what
is supported; :func:`register_family` declares another family once its outputs are checked.
"""

from __future__ import annotations

from dataclasses import dataclass

from specdec.errors import SpecdecError

FULL, SLIDING = "full_attention", "sliding_attention"


class UnsupportedModelError(SpecdecError):
    """The target (or draft) model is of a kind specdec cannot serve losslessly, or not with this verifier."""


@dataclass(frozen=True)
class Family:
    """What specdec knows about one transformers ``model_type``.

    interface: attention runs through ``AttentionInterface`` with ``module.layer_idx`` set and the K/V of the new
    tokens passed in (what the paged verifier needs), and no code path depends on the implementation's name (what
    the hf verifier's grouped-query attention switch needs). all_layers_slide: a ``sliding_window`` in the config
    applies to every layer (families without ``layer_types``). refusal: why specdec refuses it altogether;
    paged_refusal: why the paged verifier refuses it.
    """

    model_type: str
    interface: bool = True
    all_layers_slide: bool = False
    refusal: str | None = None
    paged_refusal: str | None = None



FAMILIES: dict[str, Family] = {f.model_type: f for f in [
    Family("llama"), Family("qwen2"), Family("qwen3"), Family("qwen2_moe"), Family("qwen3_moe", all_layers_slide=True),
    Family("mixtral", all_layers_slide=True), Family("mistral", all_layers_slide=True),
    Family("phi3", all_layers_slide=True), Family("gemma"), Family("gemma2"), Family("gemma3_text"),
    Family("gpt2"), Family("opt"), Family("gpt_neox"), Family("gptj"), Family("phi"), Family("stablelm"),
    Family("olmo2"), Family("olmo3"), Family("olmoe"), Family("cohere"), Family("granite"),
    Family("starcoder2", all_layers_slide=True), Family("smollm3"),
    Family("falcon", interface=False, paged_refusal="computes attention in its own code (with ALiBi when configured), "
           "not through transformers' AttentionInterface, so the paged kernels cannot serve it"),
    Family("bloom", interface=False,
           refusal="builds its ALiBi position biases from a 2D padding mask, so it cannot take a draft tree's 4D "
                   "attention mask"),
]}

# model types whose layers keep a recurrent state instead of (or beside) a KV cache; transformers marks most of
# them `_is_stateful`, which is checked too
_RECURRENT = {"mamba", "mamba2", "falcon_mamba", "rwkv", "recurrent_gemma", "jamba", "zamba", "zamba2", "bamba",
              "falcon_h1", "lfm2", "nemotron_h", "granitemoehybrid", "qwen3_next", "xlstm", "minimax"}


@dataclass(frozen=True)
class AttentionSpec:
    """Per-layer attention modifiers of a model (``L`` layers).

    windows: ``L`` entries, the sliding window of each layer (a query at position ``p`` sees keys at positions
    ``> p - window``, transformers' convention) or None for full attention. softcap: the attention logit
    softcapping (scores become ``softcap * tanh(scores / softcap)`` before the mask), or None.
    """

    windows: tuple[int | None, ...]
    softcap: float | None = None

    @property
    def sliding(self) -> bool:
        return any(w is not None for w in self.windows)

    @property
    def window(self) -> int | None:
        """The sliding layers' window (one per model: its config's ``sliding_window``), None without any."""
        return next((w for w in self.windows if w is not None), None)

    @property
    def uniform(self) -> bool:
        """Every layer has the same window (one mask serves all)."""
        return len(set(self.windows)) <= 1


def register_family(model_type: str, all_layers_slide: bool = False, paged: bool = False) -> Family:
    """Declare ``model_type`` served (after checking it: outputs equal to ``model.generate``): its attention runs
    through ``AttentionInterface`` and never branches on the implementation's name; ``all_layers_slide``: a
    ``sliding_window`` without ``layer_types`` applies to every layer; ``paged``: the paged verifier may serve it.
    A declared family keeps its declaration."""
    if model_type not in FAMILIES:
        FAMILIES[model_type] = Family(model_type, all_layers_slide=all_layers_slide, paged_refusal=None if paged else
                                      "is declared for the hf verifier only (register_family(..., paged=True))")
    return FAMILIES[model_type]


def family(config) -> Family | None:
    """The declared family of ``config.model_type`` (None: not in the support matrix)."""
    return FAMILIES.get(getattr(config, "model_type", None))


def attention_spec(config) -> AttentionSpec:
    """The sliding windows and softcapping of ``config``'s layers, from its own ``layer_types`` and
    ``sliding_window``. Raises :class:`UnsupportedModelError` for layer kinds other than full and sliding
    attention, or a window whose layers cannot be told."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None) or None  # Qwen2-MoE's config says 0 for none
    softcap = getattr(config, "attn_logit_softcapping", None) or None
    types = getattr(config, "layer_types", None)
    if types is not None:
        unknown = sorted(set(types) - {FULL, SLIDING})
        if unknown:
            raise UnsupportedModelError(
                f"model type {config.model_type!r} has layers of kind {unknown}; specdec serves full and sliding "
                f"attention layers only.")
        if SLIDING in types and window is None:
            raise UnsupportedModelError(f"model type {config.model_type!r} has sliding layers but no sliding_window.")
        return AttentionSpec(tuple(window if t == SLIDING else None for t in types[:n]), softcap)
    fam = family(config)
    if window is not None:
        if fam is None or not fam.all_layers_slide:
            raise UnsupportedModelError(
                f"model type {config.model_type!r} sets sliding_window={window} without layer_types; specdec cannot "
                f"tell which layers use it. Supported families: {', '.join(FAMILIES)}.")
        return AttentionSpec((window,) * n, softcap)
    return AttentionSpec((None,) * n, softcap)


def check_servable(model, role: str = "target") -> AttentionSpec:
    """Refuse, with one :class:`UnsupportedModelError` naming the model type and what is supported, a model that
    cannot be decoded here: not a generative decoder-only model with an LM head and a KV cache. Returns its
    :class:`AttentionSpec`."""
    config = getattr(model, "config", None)
    mtype = getattr(config, "model_type", None) or type(model).__name__
    supported = (f"specdec serves decoder-only transformers causal LMs with a KV cache (tested: "
                 f"{', '.join(t for t, f in FAMILIES.items() if f.refusal is None)}).")
    if config is None:
        raise UnsupportedModelError(f"the {role} ({type(model).__name__}) has no config; {supported}")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"the {role} is an encoder-decoder model ({mtype}); {supported}")
    if mtype in _RECURRENT or getattr(model, "_is_stateful", False):
        raise UnsupportedModelError(
            f"the {role} ({mtype}) keeps a recurrent state, which cannot be rolled back to the accepted tokens of a "
            f"draft tree; {supported}")
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if head is None:
        raise UnsupportedModelError(
            f"the {role} ({type(model).__name__}, {mtype}) has no LM head; load it with AutoModelForCausalLM. "
            f"{supported}")
    fam = FAMILIES.get(mtype)
    if fam is None:
        raise UnsupportedModelError(
            f"the {role}'s model type {mtype!r} is not in specdec's support matrix, so losslessness on it is unproven. "
            f"{supported} If its layers are full or sliding attention through transformers' AttentionInterface, "
            f"declare it with specdec.models.families.register_family({mtype!r}) (bench: target.declare_family=true) "
            f"and check it with `python -m specdec.bench target.name=<id> target.declare_family=true`, which counts "
            f"mismatches against model.generate.")
    if fam.refusal is not None:
        raise UnsupportedModelError(f"specdec cannot serve the {role} ({mtype}): it {fam.refusal}. {supported}")
    return attention_spec(config)


def check_paged(model) -> AttentionSpec:
    """:func:`check_servable`, and refuse a family the paged verifier cannot serve (not declared in
    :data:`FAMILIES`, or declared with a refusal), naming what is missing and the fix."""
    spec = check_servable(model)
    mtype = model.config.model_type
    fam = family(model.config)  # declared: check_servable refuses the rest
    if fam.paged_refusal is not None:
        raise UnsupportedModelError(f"the paged verifier cannot serve {mtype!r}: it {fam.paged_refusal}; use "
                                    f"verifier='hf'.")
    return spec


def renames_safely(model) -> bool:
    """Whether our forwards may route ``model``'s ``sdpa`` attention through another registered function: its
    family is declared to call attention only through ``AttentionInterface`` (Falcon picks its code path by
    comparing the implementation's name to ``"sdpa"``; unknown families keep their own ``sdpa``)."""
    fam = family(getattr(model, "config", None))
    return fam is not None and fam.interface
