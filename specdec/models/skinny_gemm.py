"""Linear layers on a few rows at the speed of reading their weights once (a C++ kernel for CPUs with AVX-512).

A decode step of a small model on a CPU is bound by streaming its weights from memory: SmolLM2-135M's 540 MB of
float32 weights take about 14 ms to read on this machine's two cores (``tensor.sum()`` over them), but oneDNN's
packed matmul takes about 18-22 ms for them at one row, and ``F.linear`` (MKL's gemv) about 45 ms.

This kernel reads a copy of the weights packed once into **panels** of 32 output features, input feature by input
feature (``[N/32, K, 32]``): a panel is one sequential stream (which the hardware prefetcher follows) and each
64-byte load of it serves 16 outputs. For every input feature, each input row's value is broadcast and multiplied
into two registers of 16 outputs per row, for up to eight rows at once (more rows: eight at a time over a panel
still in cache). No horizontal sums, so the cost per weight byte barely grows with the rows: the 121 linears of a
SmolLM2-135M step take about the same time at eight rows as at one (measured in docs/benchmarks.md), where a
row-major kernel pays a chain of multiply-adds per extra row. From about 16 rows the kernel is bound by the CPU's
multiply-add rate, as oneDNN is; up to 48 rows it stays ahead of oneDNN's packed matmul (a layer's four products, 24
rows: 19.4 against 21.5 ms for 30 layers; 48: 35.3 against 41.4), they tie at 64 and oneDNN leads beyond
(docs/benchmarks.md): :func:`specdec.models.cpu_gemm.fast_linears` takes this kernel up to :func:`max_rows` rows and
oneDNN beyond.

Every output is one float32 sum over the input features in their order, whatever the number of rows and wherever the
row sits in the input: **a row's result is bitwise the same in a batch of any size** (a tree of 12 nodes verifies
each node with the products a one-token step would compute). Results differ from ``F.linear`` by float32 rounding
only (the order of the sum).

bfloat16 weights are packed in pairs of input features (``[N/32, K/2, 32, 2]``) for AVX-512 BF16's pairwise dot
products (``vdpbf16ps``): float32 accumulation, one rounding to bfloat16 at the end, as oneDNN does
(:func:`bf16_available`); half the bytes, so about half the time of a float32 step.

The packed panels are a second copy of the weights (:func:`pack`; :func:`specdec.models.cpu_gemm.fast_linears` keeps
one per layer, or per group of sibling projections packed side by side, while the module lives). Output features are
split over torch's OpenMP threads, a panel each.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from specdec.models.cpp_build import CppKernel

MAX_ROWS = 64  # float32 rows fast_linears sends here; beyond, oneDNN is as fast or faster (docs/benchmarks.md)
MAX_ROWS_BF16 = 16  # bfloat16 rows: beyond, F.linear (oneDNN, with AMX where the CPU has it)
PANEL = 32  # output features per panel (two AVX-512 registers of float32)

# the kernel's C++ (no module definition), also compiled into specdec.models.cpu_decoder_layer's extension
SOURCE_BODY = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <type_traits>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

constexpr int64_t P = 32;  // output features per panel
// panel depth steps (128 bytes each) read ahead with software prefetches: with the rows' multiply-adds between its
// loads the hardware prefetcher falls behind, and 8 rows cost the weights' stream plus the arithmetic; 2 KB ahead,
// the 30 layers' linears of SmolLM2-135M at 8 rows took 20.8 ms instead of 26.5 (1 row: 16.5 and 16.7; 8 steps ahead
// did no better than none, 24 and 48 no better than 16; docs/benchmarks.md)
constexpr int64_t PF = 16;
constexpr int64_t RB = 8;  // input rows per pass over a panel (2 x RB accumulators stay in registers)

// y[r * ldy + j] (+ bias[j]) for the R input rows of xt ([K][R], float32) and the first `valid` outputs of one panel
// ([K][32]); float32 sums over k in order
template <int R>
static inline void panel_f32(const float* xt, int64_t K, const float* p, const float* bias, float* y, int64_t ldy,
                             int64_t valid) {
#if defined(__AVX512F__)
  __m512 a0[R], a1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) { a0[r] = _mm512_setzero_ps(); a1[r] = _mm512_setzero_ps(); }
  for (int64_t k = 0; k < K; ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(p + (k + PF) * P), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(p + (k + PF) * P + 16), _MM_HINT_T0);
    const __m512 w0 = _mm512_loadu_ps(p + k * P), w1 = _mm512_loadu_ps(p + k * P + 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(xt[k * R + r]);
      a0[r] = _mm512_fmadd_ps(w0, xv, a0[r]);
      a1[r] = _mm512_fmadd_ps(w1, xv, a1[r]);
    }
  }
  const __mmask16 m0 = (__mmask16)(valid >= 16 ? 0xFFFF : (1u << valid) - 1u);
  const __mmask16 m1 = (__mmask16)(valid >= 32 ? 0xFFFF : valid <= 16 ? 0 : (1u << (valid - 16)) - 1u);
  const __m512 b0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
  const __m512 b1 = bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(y + r * ldy, m0, bias ? _mm512_add_ps(a0[r], b0) : a0[r]);
    _mm512_mask_storeu_ps(y + r * ldy + 16, m1, bias ? _mm512_add_ps(a1[r], b1) : a1[r]);
  }
#else
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < valid; ++j) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += p[k * P + j] * xt[k * R + r];
      y[r * ldy + j] = bias ? s + bias[j] : s;
    }
#endif
}

// bfloat16: xt holds pairs of input features ([K/2][R] of 32 bits), the panel [K/2][32][2]; float32 sums of pairs
// (vdpbf16ps), one rounding to bfloat16 at the end
template <int R>
static inline void panel_bf16(const at::BFloat16* xt, int64_t K2, const at::BFloat16* p, const float* bias,
                              at::BFloat16* y, int64_t ldy, int64_t valid) {
#if defined(__AVX512BF16__)
  __m512 a0[R], a1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) { a0[r] = _mm512_setzero_ps(); a1[r] = _mm512_setzero_ps(); }
  const int32_t* xi = reinterpret_cast<const int32_t*>(xt);
  for (int64_t k = 0; k < K2; ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(p + (k + PF) * 2 * P), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(p + (k + PF) * 2 * P + P), _MM_HINT_T0);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(p + k * 2 * P), w1 = (__m512bh)_mm512_loadu_si512(p + k * 2 * P + P);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(xi[k * R + r]);
      a0[r] = _mm512_dpbf16_ps(a0[r], w0, xv);
      a1[r] = _mm512_dpbf16_ps(a1[r], w1, xv);
    }
  }
  float out[P];
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(out, a0[r]);
    _mm512_storeu_ps(out + 16, a1[r]);
    for (int64_t j = 0; j < valid; ++j) y[r * ldy + j] = at::BFloat16(bias ? out[j] + bias[j] : out[j]);
  }
#else
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < valid; ++j) {
      float s = 0.f;
      for (int64_t k = 0; k < K2; ++k)
        for (int h = 0; h < 2; ++h)
          s += static_cast<float>(p[(k * P + j) * 2 + h]) * static_cast<float>(xt[(k * R + r) * 2 + h]);
      y[r * ldy + j] = at::BFloat16(bias ? s + bias[j] : s);
    }
#endif
}

template <typename T>
static inline void panel(int R, const T* xt, int64_t K, const T* p, const float* bias, T* y, int64_t ldy,
                         int64_t valid) {
#define SPECDEC_PANEL(n) \
  case n: \
    if constexpr (std::is_same<T, float>::value) panel_f32<n>(xt, K, p, bias, y, ldy, valid); \
    else panel_bf16<n>(xt, K, p, bias, y, ldy, valid); \
    break;
  switch (R) {
    SPECDEC_PANEL(1) SPECDEC_PANEL(2) SPECDEC_PANEL(3) SPECDEC_PANEL(4)
    SPECDEC_PANEL(5) SPECDEC_PANEL(6) SPECDEC_PANEL(7) SPECDEC_PANEL(8)
    default: break;
  }
#undef SPECDEC_PANEL
}

// x: [M, K] (float32 or bfloat16, contiguous); panels: [T, K, 32] float32 or [T, K/2, 32, 2] bfloat16; bias: float32
// [N] or None; returns [M, N]. The rows go in blocks of RB, each block transposed to [K][rows] so the broadcasts
// read one cache line per input feature.
torch::Tensor panel_linear(const torch::Tensor& x, const torch::Tensor& panels, const c10::optional<torch::Tensor>& bias,
                           int64_t N) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(x.dim() == 2 && (dt == at::kFloat || dt == at::kBFloat16) && x.is_contiguous(),
              "x must be a contiguous float32 or bfloat16 [M, K]");
  TORCH_CHECK(panels.scalar_type() == dt && panels.is_contiguous(), "the panels must be contiguous, of the input's dtype");
  const int64_t M = x.size(0), K = x.size(1), T = panels.size(0);
  const bool bf = dt == at::kBFloat16;
  const int64_t Kp = bf ? (K + 1) / 2 : K;  // the panels' depth: features, or pairs of features
  TORCH_CHECK(panels.dim() == (bf ? 4 : 3) && panels.size(1) == Kp && panels.size(2) == P && T * P >= N && N > (T - 1) * P,
              "the panels were packed for another input size (K) or output size (N)");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->numel() == N && bias->is_contiguous()),
              "the bias must be float32 [N]");
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  // xt: for each block of RB rows, [Kp][rows] (a bfloat16 pair as one 32-bit value; an odd K's last pair padded
  // with zero), written by a plain loop (an ATen strided copy per block cost more than the transposition itself)
  const int64_t W = bf ? 2 : 1;  // values per panel depth step
  auto xt = torch::empty({M * Kp * W}, x.options());
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  if (bf) {
    const at::BFloat16* xs = x.data_ptr<at::BFloat16>();
    at::BFloat16* xd = xt.data_ptr<at::BFloat16>();
    for (int64_t m = 0; m < M; m += RB) {
      const int64_t R = std::min(RB, M - m);
      for (int64_t k = 0; k < Kp; ++k)
        for (int64_t r = 0; r < R; ++r)
          for (int64_t h = 0; h < 2; ++h)
            xd[m * Kp * 2 + (k * R + r) * 2 + h] = 2 * k + h < K ? xs[(m + r) * K + 2 * k + h] : at::BFloat16(0.f);
    }
    const at::BFloat16* pp = panels.data_ptr<at::BFloat16>();
    at::BFloat16* yp = y.data_ptr<at::BFloat16>();
    at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t m = 0; m < M; m += RB)
          panel<at::BFloat16>(static_cast<int>(std::min(RB, M - m)), xd + m * Kp * 2, Kp, pp + t * Kp * P * 2,
                              bp ? bp + t * P : nullptr, yp + m * N + t * P, N, std::min(P, N - t * P));
    });
  } else {
    const float* xs = x.data_ptr<float>();
    float* xd = xt.data_ptr<float>();
    for (int64_t m = 0; m < M; m += RB) {
      const int64_t R = std::min(RB, M - m);
      for (int64_t k = 0; k < K; ++k)
        for (int64_t r = 0; r < R; ++r) xd[m * K + k * R + r] = xs[(m + r) * K + k];
    }
    const float* pp = panels.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t m = 0; m < M; m += RB)
          panel<float>(static_cast<int>(std::min(RB, M - m)), xd + m * K, K, pp + t * K * P,
                       bp ? bp + t * P : nullptr, yp + m * N + t * P, N, std::min(P, N - t * P));
    });
  }
  return y;
}
"""

_KERNEL = CppKernel("specdec_panel_gemm", SOURCE_BODY + r"""
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("panel_linear", &panel_linear); }
""")


def max_rows(dtype: torch.dtype) -> int:
    """The most rows of ``dtype`` inputs that :func:`specdec.models.cpu_gemm.fast_linears` sends to this kernel."""
    return MAX_ROWS_BF16 if dtype == torch.bfloat16 else MAX_ROWS


def available() -> bool:
    """Whether the kernel is built and pays: a CPU with AVX-512 (elsewhere oneDNN is as fast or faster)."""
    return _avx512() and _KERNEL.available()


def failure() -> str | None:
    """Why the kernel is not used (None when it is, or was not tried)."""
    return _KERNEL.failure() if _avx512() else "this CPU has no AVX-512"


def bf16_available() -> bool:
    """Whether bfloat16 takes the kernel at its speed: built, and a CPU with AVX-512 BF16 (vdpbf16ps)."""
    return available() and " avx512_bf16" in _cpu_flags()


def _avx512() -> bool:
    return " avx512f" in _cpu_flags()


@functools.cache
def _cpu_flags() -> str:
    """The CPU's flags line from /proc/cpuinfo, space-padded ('' where there is none: not Linux, leave it to oneDNN)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""
    return " " + flags.split(":", 1)[-1].strip() + " "


@dataclass(frozen=True)
class Panels:
    """Weights packed for :func:`panel_linear`: ``panels`` ``[N/32, K, 32]`` (float32) or ``[N/32, K/2, 32, 2]``
    (bfloat16; K padded to even), the output features padded to a whole panel with zeros; ``bias`` float32 ``[N]`` or
    None; ``out_features`` N, ``in_features`` K."""

    panels: torch.Tensor
    bias: torch.Tensor | None
    out_features: int
    in_features: int


def pack(weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> Panels:
    """Pack ``cat(weights)`` (each ``[N_i, K]``, one dtype: float32 or bfloat16) and their biases (one per weight, or
    None) into panels: a copy, made once per layer (or group of layers that read one input)."""
    with torch.no_grad():
        w = torch.cat([t.detach() for t in weights]) if len(weights) > 1 else weights[0].detach()
        n, k = w.shape
        t = -(-n // PANEL)
        w = torch.nn.functional.pad(w, (0, k % 2 if w.dtype == torch.bfloat16 else 0, 0, t * PANEL - n))
        if w.dtype == torch.bfloat16:
            panels = w.view(t, PANEL, w.shape[1] // 2, 2).permute(0, 2, 1, 3).contiguous()
        else:
            panels = w.view(t, PANEL, k).transpose(1, 2).contiguous()
        bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach().float() if b is not None else torch.zeros(m.shape[0]) for b, m in zip(biases, weights)])
    return Panels(panels, bias, n, k)


def panel_linear(x: torch.Tensor, packed: Panels) -> torch.Tensor:
    """``x @ W.T + b`` for the packed ``W``, ``b``: x ``[M, K]`` contiguous, of the weights' dtype. Returns
    ``[M, N]``; each row's result is bitwise independent of the other rows."""
    return _KERNEL.module.panel_linear(x, packed.panels, packed.bias, packed.out_features)


def skinny_linear(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> torch.Tensor:
    """``x @ cat(weights).T + cat(biases)`` (packing the weights for this one call): x ``[M, K]`` contiguous, weights
    ``[N_i, K]``, one bias (or None) per weight, all float32 or all bfloat16 (float32 accumulation, one rounding to
    bfloat16). Returns ``[M, sum N_i]``."""
    if any(w.dim() != 2 or w.shape[1] != x.shape[-1] for w in weights):
        raise RuntimeError("weights must be [N, K] with the input's K")
    if x.dtype not in (torch.float32, torch.bfloat16) or any(w.dtype != x.dtype for w in weights):
        raise RuntimeError("x and the weights must be all float32 or all bfloat16")
    return panel_linear(x, pack(weights, biases))
