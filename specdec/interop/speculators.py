"""EAGLE-3 heads in the ``speculators`` layout (PyPI ``speculators``; vLLM's native format): ``config.json`` with
``speculators_model_type: eagle3``, ``transformer_layer_config`` (the layer's Llama settings),
``speculators_config`` (algorithm, proposal methods with ``speculative_tokens``, the verifier), weights with the
layer under ``layers.0.``. vLLM serves such a directory as the *model* itself (``LLM(model=out_dir)``): it reads
the verifier and the number of speculative tokens from the config, so no speculative flags are needed.

``norm_before_residual`` defaults to True in this layout (it is False in SpecForge's config.json), so we always
write it.
"""

from __future__ import annotations

from pathlib import Path

from specdec.interop import eagle3
from specdec.interop.files import read_weights, write_dir
from specdec.models.checkpoint import CheckpointError

DEFAULT_VERIFIER = "HuggingFaceTB/SmolLM2-135M-Instruct"
# the default target's shape in a checkpoint's target fingerprint (specdec.models.checkpoint.target_fingerprint)
DEFAULT_SHAPE = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30}


def default_verifier(meta: dict) -> str:
    """specdec's default target when ``meta``'s head was made for its shape (or says nothing of its target);
    refuses a head made for another target, whose verifier the exporter cannot guess."""
    fp = meta.get("target")
    if fp is None or all(fp.get(k) == v for k, v in DEFAULT_SHAPE.items()):
        return DEFAULT_VERIFIER
    raise CheckpointError(
        f"this head was made for a {fp.get('model_type')} target (vocabulary {fp.get('vocab_size')}, hidden size "
        f"{fp.get('hidden_size')}, {fp.get('num_hidden_layers')} layers), not specdec's default, and its checkpoint "
        "does not name it: pass the target's hub id or path, `specdec export ... --to speculators --verifier "
        "<target>` (export.verifier=<target> in a training job).")


def detect(config: dict) -> bool:
    return config.get("speculators_model_type") is not None


def load(path: Path, config: dict, allow_pickle: bool) -> tuple[dict, dict]:
    if config["speculators_model_type"] != "eagle3":
        raise CheckpointError(f"{path}: speculators model type {config['speculators_model_type']!r}; specdec imports "
                              "eagle3 speculators.")
    layer_cfg = config.get("transformer_layer_config")
    if not isinstance(layer_cfg, dict):
        raise CheckpointError(f"{path}: a speculators config without transformer_layer_config.")
    state = read_weights(path, allow_pickle)
    use_aux = (layer_cfg.get("eagle_config") or {}).get("use_aux_hidden_state", True)
    arch = eagle3.arch_from_config(config, layer_cfg, state,
                                   aux_layers=config.get("eagle_aux_hidden_state_layer_ids") if use_aux else [],
                                   norm_before_residual=config.get("norm_before_residual", True), where=path)
    return eagle3.our_state(state, arch, "layers.0.", path), {
        "format": 1, "kind": "eagle3", "config": {"arch": arch}, "target": None, "source": "speculators"}


def export(state: dict, meta: dict, out_dir: Path, verifier: str | None = None,
           verifier_architectures: list[str] | None = None, speculative_tokens: int = 3) -> Path:
    """The speculators directory vLLM serves as ``LLM(model=out_dir)``; ``verifier``: the target's hub id or path
    (default: the one the training job recorded, else specdec's default target when the head was made for its
    shape; a head made for another target needs it named), ``speculative_tokens``: the chain length vLLM drafts."""
    verifier = verifier or meta.get("target_name") or default_verifier(meta)
    verifier_architectures = verifier_architectures or meta.get("target_architectures")
    arch, dtype = eagle3.head_parts(state, meta)
    aux = list(arch["aux_layers"])
    if int(speculative_tokens) < 1:
        raise CheckpointError("speculative_tokens must be at least 1.")
    config = {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_version": "0.3.0",
        "transformer_layer_config": {"architectures": ["LlamaForCausalLM"], **eagle3.layer_config(arch, dtype),
                                     # vLLM reads use_aux_hidden_state from here (default True)
                                     "eagle_config": {"use_aux_hidden_state": bool(aux)}},
        "draft_vocab_size": arch["draft_vocab_size"],
        "target_hidden_size": arch["target_hidden_size"],
        "norm_before_residual": arch["norm_before_residual"],
        "eagle_aux_hidden_state_layer_ids": aux or None,
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": int(speculative_tokens),
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "verifier": {"name_or_path": verifier or DEFAULT_VERIFIER,
                         "architectures": list(verifier_architectures or ["LlamaForCausalLM"])},
        },
        "torch_dtype": str(dtype).replace("torch.", ""),
    }
    return write_dir(out_dir, config, eagle3.engine_state(state, "layers.0.", arch["vocab_size"]), {"README.md": eagle3.card(meta, "speculators")})
