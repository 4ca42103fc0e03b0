"""Whole-layer forwards in one C++ call each on a CPU: RMSNorm and the gated SiLU MLP (kernel choice only).

A decode step of a small model runs thousands of tiny ATen ops; on a CPU each costs a few microseconds of dispatch
and Python, which adds up to a third of a step of SmolLM2-135M once the linears read their weights at the memory floor
(docs/history/09-memory-floor.md). Two layers account for much of it and have a fixed, well-known form:

- **RMSNorm** (Llama's: ``w * (x * rsqrt(mean(x**2) + eps))``, in float32): eight ops and a Python frame per call,
  61 calls a step. transformers marks this layer replaceable by a kernel (``use_kernel_forward_from_hub("RMSNorm")``);
  :func:`rms_norm` is one call.
- **The gated MLP** (``down(silu(gate(x)) * up(x))``): four module calls, a split, an activation and a product.
  ``silu(g) * u`` is one call (:func:`silu_mul`) on gate and up computed as one product.

The module forwards that call these (``_NormForward``, ``_MLPForward``) are installed by
:func:`specdec.kernels.cpu_gemm.fast_linears`, beside its linear forwards.

Only classes known to have exactly these forwards are replaced (:data:`RMS_NORMS`, :data:`GATED_MLPS`; Gemma's
``(1 + w)`` norm and Phi-3's packed ``gate_up_proj`` are not among them), only for float32 CPU inputs without
gradients, and only inside :func:`specdec.kernels.cpu_gemm.fast_linears`. Results differ from the model's own ops by
float32 rounding (``rsqrt`` and ``exp`` to within an ulp; the mean's summation order).
"""

from __future__ import annotations

import torch
from transformers.activations import SiLUActivation

from specdec.kernels.build import Kernel

# class names whose forward is exactly Llama's RMSNorm / gated SiLU MLP (checked against the model's own forward in
# tests/test_cpu_layers.py for each)
RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm",
                       "Qwen2MoeRMSNorm", "Qwen3MoeRMSNorm", "Phi3RMSNorm"})
GATED_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})

# csrc/layers.h, also compiled into specdec.kernels.cpu_decoder_layer's extension
_KERNEL = Kernel("layers", "RMSNorm; silu(gate) * up")


def available() -> bool:
    """Whether the kernels are built (building them now if they were not; False where that fails)."""
    return _KERNEL.available()


def failure() -> str | None:
    """Why the kernels could not be built (None if they were, or were not tried)."""
    return _KERNEL.failure()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm of float32 ``x [..., H]`` with ``weight [H]``: one call. Returns ``[..., H]``."""
    return _KERNEL.module.rms_norm(x.reshape(-1, x.shape[-1]).contiguous(), weight, float(eps)).view(x.shape)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up [..., 2I]`` (gate, then up): one call. Returns ``[..., I]``."""
    flat = gate_up.reshape(-1, gate_up.shape[-1]).contiguous()
    return _KERNEL.module.silu_mul(flat).view(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


def is_rms_norm(m: torch.nn.Module) -> bool:
    """True for a module of a class in :data:`RMS_NORMS` with its weight and ``variance_epsilon``."""
    return type(m).__name__ in RMS_NORMS and isinstance(getattr(m, "weight", None), torch.Tensor) \
        and isinstance(getattr(m, "variance_epsilon", None), float)


def is_gated_silu_mlp(m: torch.nn.Module) -> bool:
    """True for a module of a class in :data:`GATED_MLPS` whose activation is SiLU."""
    return type(m).__name__ in GATED_MLPS and isinstance(getattr(m, "act_fn", None), (torch.nn.SiLU, SiLUActivation))
