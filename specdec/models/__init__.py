"""Model plumbing and CPU kernels: everything that touches a transformers model's objects.

- :mod:`~specdec.models.loading` (re-exported here, so ``specdec.models.load_target`` works): the default target,
  hub ids and local paths, prompts, sizes.
- :mod:`~specdec.models.checkpoint`: drafter checkpoints (``drafter.json`` + safetensors) and the target fingerprint.
- :mod:`~specdec.models.hf_forward` and :mod:`~specdec.models.hf_cache`: one tree forward through a transformers
  model with a 4D mask, and every touch of the transformers ``Cache`` API.
- :mod:`~specdec.models.surgery`: models built from the target's own parts (a cut to some layers, a draft
  vocabulary head), shared by drafters and ``train/``.
- Kernels: :mod:`~specdec.kernels.cpu_gemm` (the linears' route: oneDNN, and :mod:`~specdec.kernels.skinny_gemm`'s
  packed panels up to 16 rows), :mod:`~specdec.kernels.cpu_layers` (RMSNorm and the gated MLP in one call each),
  :mod:`~specdec.kernels.build` (building the C++ kernels), :mod:`~specdec.models.gqa_attention` (SDPA without
  ``repeat_kv``; :mod:`~specdec.kernels.cpu_attention` for a decode step's query), :mod:`~specdec.kernels.greedy_head`
  (exact greedy tokens from a bfloat16 screen of the LM head).
"""

from specdec.models.loading import (
    _LOADED,
    DEFAULT_ALIASES,
    DEFAULT_TARGET,
    DTYPES,
    GGUF_FILE,
    GGUF_PACKAGE,
    cache_dir,
    context_length,
    convert_gguf,
    default_model_path,
    device_of,
    encode_prompt,
    load_target,
    resolve_dtype,
    resolve_target_path,
    vocab_size,
)

__all__ = [
    "DEFAULT_ALIASES", "DEFAULT_TARGET", "DTYPES", "GGUF_FILE", "GGUF_PACKAGE", "cache_dir", "context_length",
    "convert_gguf", "default_model_path", "device_of", "encode_prompt", "load_target", "resolve_dtype",
    "resolve_target_path", "vocab_size", "_LOADED",
]
