"""Whole-layer forwards in one C++ call each on a CPU: RMSNorm and the gated SiLU MLP (kernel choice only).

A decode step of a small model runs thousands of tiny ATen ops; on a CPU each costs a few microseconds of dispatch
and Python, which adds up to a third of a step of SmolLM2-135M once the linears read their weights at the memory floor
(docs/benchmarks.md). Two layers account for much of it and have a fixed, well-known form:

- **RMSNorm** (Llama's: ``w * (x * rsqrt(mean(x**2) + eps))``, in float32): eight ops and a Python frame per call,
  61 calls a step. transformers marks this layer replaceable by a kernel (``use_kernel_forward_from_hub("RMSNorm")``);
  :func:`rms_norm` is one call.
- **The gated MLP** (``down(silu(gate(x)) * up(x))``): four module calls, a split, an activation and a product.
  ``silu(g) * u`` is one call (:func:`silu_mul`) on gate and up computed as one product.

The module forwards that call these (``_NormForward``, ``_MLPForward``) are installed by
:func:`specdec.models.cpu_gemm.fast_linears`, beside its linear forwards.

Only classes known to have exactly these forwards are replaced (:data:`RMS_NORMS`, :data:`GATED_MLPS`; Gemma's
``(1 + w)`` norm and Phi-3's packed ``gate_up_proj`` are not among them), only for float32 CPU inputs without
gradients, and only inside :func:`specdec.models.cpu_gemm.fast_linears`. Results differ from the model's own ops by
float32 rounding (``rsqrt`` and ``exp`` to within an ulp; the mean's summation order).
"""

from __future__ import annotations

import torch
from transformers.activations import SiLUActivation

from specdec.models.cpp_build import CppKernel

# class names whose forward is exactly Llama's RMSNorm / gated SiLU MLP (checked against the model's own forward in
# tests/test_cpu_layers.py for each)
RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm",
                       "Qwen2MoeRMSNorm", "Qwen3MoeRMSNorm", "Phi3RMSNorm"})
GATED_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})

# the kernels' C++ (no module definition), also compiled into specdec.models.cpu_decoder_layer's extension
SOURCE_BODY = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#if defined(__AVX512F__)
#include <immintrin.h>
#include <sleef.h>
#endif

// out[m] = w * (x[m] * 1/sqrt(mean(x[m]^2) + eps)), x: [M, H] float32
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be a contiguous float32 [M, H]");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1) && w.scalar_type() == at::kFloat && w.is_contiguous(), "bad weight");
  const int64_t M = x.size(0), H = x.size(1);
  auto out = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const float* xr = xp + m * H;
      float* orow = op + m * H;
      int64_t k = 0;
      float ss = 0.f;
#if defined(__AVX512F__)
      __m512 acc = _mm512_setzero_ps();
      for (; k + 16 <= H; k += 16) { const __m512 v = _mm512_loadu_ps(xr + k); acc = _mm512_fmadd_ps(v, v, acc); }
      ss = _mm512_reduce_add_ps(acc);
#endif
      for (; k < H; ++k) ss += xr[k] * xr[k];
      const float r = 1.f / std::sqrt(ss / static_cast<float>(H) + static_cast<float>(eps));
      k = 0;
#if defined(__AVX512F__)
      const __m512 rv = _mm512_set1_ps(r);
      for (; k + 16 <= H; k += 16)
        _mm512_storeu_ps(orow + k, _mm512_mul_ps(_mm512_loadu_ps(wp + k), _mm512_mul_ps(_mm512_loadu_ps(xr + k), rv)));
#endif
      for (; k < H; ++k) orow[k] = wp[k] * (xr[k] * r);
    }
  });
  return out;
}

// gu: [M, 2I] (gate then up, side by side) -> [M, I] = silu(gate) * up, silu(g) = g / (1 + exp(-g))
torch::Tensor silu_mul(const torch::Tensor& gu) {
  TORCH_CHECK(gu.dim() == 2 && gu.scalar_type() == at::kFloat && gu.is_contiguous() && gu.size(1) % 2 == 0,
              "gu must be a contiguous float32 [M, 2I]");
  const int64_t M = gu.size(0), I = gu.size(1) / 2;
  auto out = torch::empty({M, I}, gu.options());
  const float* gp = gu.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, M * I, 4096, [&](int64_t b, int64_t e) {
    int64_t idx = b;
    while (idx < e) {
      const int64_t m = idx / I, i = idx % I, n = std::min(e - idx, I - i);
      const float* g = gp + m * 2 * I + i;
      const float* u = g + I;
      float* o = op + idx;
      int64_t k = 0;
#if defined(__AVX512F__)
      const __m512 one = _mm512_set1_ps(1.f);
      for (; k + 16 <= n; k += 16) {
        const __m512 gv = _mm512_loadu_ps(g + k);
        const __m512 s = _mm512_div_ps(gv, _mm512_add_ps(one, Sleef_expf16_u10(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
        _mm512_storeu_ps(o + k, _mm512_mul_ps(s, _mm512_loadu_ps(u + k)));
      }
#endif
      for (; k < n; ++k) o[k] = g[k] / (1.f + std::exp(-g[k])) * u[k];
      idx += n;
    }
  });
  return out;
}
"""

_KERNEL = CppKernel("specdec_cpu_layers", SOURCE_BODY + r"""
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm);
  m.def("silu_mul", &silu_mul);
}
""")


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
