"""Linear layers on a few rows at the speed of reading their weights once (a C++ kernel for CPUs with AVX-512).

A decode step of a small model on a CPU is bound by streaming its weights from memory: SmolLM2-135M's 540 MB of
float32 weights take about 14 ms to read on this machine's two cores (``tensor.sum()`` over them), but oneDNN's
packed matmul takes about 22 ms for them at one row, and ``F.linear`` (MKL's gemv) about 45 ms. This kernel
reads each weight row once, in storage order (one sequential stream per thread, which the hardware prefetcher
follows), and takes its dot product with every input row while the row is in cache: at one input row it runs at the
read floor (measured in docs/benchmarks.md). Each extra input row adds a chain of fused multiply-adds per weight row
(up to four at once, in registers), so the kernel turns compute-bound as rows are added: from about six rows
oneDNN's blocked kernel is as fast, and :func:`specdec.models.cpu_gemm.fast_linears` takes this kernel up to
:data:`MAX_ROWS` rows and oneDNN beyond.

bfloat16 models take the same path (AVX-512 BF16's pairwise dot products, float32 accumulation, one rounding at the
end, as oneDNN does; :func:`bf16_available`): half the bytes, so about half the time of a float32 step.

It reads the weights where they are (no packed copy) and takes a list of weights that read one input (a layer's q/k/v
projections), writing their outputs side by side. Output rows are split over torch's OpenMP threads. Results differ
from ``F.linear`` by float32 rounding only (the order of the sum over the input features).
"""

from __future__ import annotations

import functools

import torch

from specdec.models.cpp_build import CppKernel

MAX_ROWS = 4  # rows fast_linears sends here; from about six, oneDNN is as fast (docs/benchmarks.md)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// without AVX-512: the same sums, one input row at a time (float32 accumulation)
template <int MR, typename T>
static inline void row_dots_ref(const T* x, int64_t K, const T* w, const T* bias, T* y, int64_t ldy) {
  for (int j = 0; j < MR; ++j) {
    float s = 0.f;
    for (int64_t k = 0; k < K; ++k) s += static_cast<float>(x[j * K + k]) * static_cast<float>(w[k]);
    y[j * ldy] = static_cast<T>(bias ? s + static_cast<float>(*bias) : s);
  }
}

// y[j * ldy] = dot(w[0:K], x[j, 0:K]) (+ bias) for the MR input rows j: one weight row read once; two accumulators
// per input row (even and odd 16-float chunks: half as long a chain of dependent multiply-adds, ~10% faster here);
// the template keeps every accumulator in a register
template <int MR>
static inline void row_dots(const float* x, int64_t K, const float* w, const float* bias, float* y, int64_t ldy) {
#if defined(__AVX512F__)
  __m512 a[MR], b[MR];
#pragma GCC unroll 4
  for (int j = 0; j < MR; ++j) { a[j] = _mm512_setzero_ps(); b[j] = _mm512_setzero_ps(); }
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m512 w0 = _mm512_loadu_ps(w + k), w1 = _mm512_loadu_ps(w + k + 16);
#pragma GCC unroll 4
    for (int j = 0; j < MR; ++j) {
      a[j] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + j * K + k), a[j]);
      b[j] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + j * K + k + 16), b[j]);
    }
  }
  for (; k + 16 <= K; k += 16) {
    const __m512 w0 = _mm512_loadu_ps(w + k);
    for (int j = 0; j < MR; ++j) a[j] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + j * K + k), a[j]);
  }
  if (k < K) {
    const __mmask16 tail = (__mmask16)((1u << (K - k)) - 1u);
    const __m512 w0 = _mm512_maskz_loadu_ps(tail, w + k);
    for (int j = 0; j < MR; ++j) b[j] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(tail, x + j * K + k), b[j]);
  }
  for (int j = 0; j < MR; ++j) {
    const float s = _mm512_reduce_add_ps(_mm512_add_ps(a[j], b[j]));
    y[j * ldy] = bias ? s + *bias : s;
  }
#else
  row_dots_ref<MR>(x, K, w, bias, y, ldy);
#endif
}

// bfloat16: pairs of products accumulated in float32 (vdpbf16ps), one rounding to bfloat16 at the end, as oneDNN
template <int MR>
static inline void row_dots(const at::BFloat16* x, int64_t K, const at::BFloat16* w, const at::BFloat16* bias,
                            at::BFloat16* y, int64_t ldy) {
#if defined(__AVX512BF16__)
  __m512 a[MR];
#pragma GCC unroll 4
  for (int j = 0; j < MR; ++j) a[j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k);
#pragma GCC unroll 4
    for (int j = 0; j < MR; ++j) a[j] = _mm512_dpbf16_ps(a[j], wv, (__m512bh)_mm512_loadu_si512(x + j * K + k));
  }
  if (k < K) {
    const __mmask32 tail = (__mmask32)((1ull << (K - k)) - 1ull);
    const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail, w + k);
    for (int j = 0; j < MR; ++j)
      a[j] = _mm512_dpbf16_ps(a[j], wv, (__m512bh)_mm512_maskz_loadu_epi16(tail, x + j * K + k));
  }
  for (int j = 0; j < MR; ++j) {
    const float s = _mm512_reduce_add_ps(a[j]);
    y[j * ldy] = at::BFloat16(bias ? s + static_cast<float>(*bias) : s);
  }
#else
  row_dots_ref<MR>(x, K, w, bias, y, ldy);
#endif
}

// one weight row against the M input rows, four at a time
template <typename T>
static inline void one_row(const T* x, int64_t M, int64_t K, const T* w, const T* bias, T* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) row_dots<4>(x + m * K, K, w, bias, y + m * ldy, ldy);
  switch (M - m) {
    case 3: row_dots<3>(x + m * K, K, w, bias, y + m * ldy, ldy); break;
    case 2: row_dots<2>(x + m * K, K, w, bias, y + m * ldy, ldy); break;
    case 1: row_dots<1>(x + m * K, K, w, bias, y + m * ldy, ldy); break;
    default: break;
  }
}

template <typename T>
static void run(const torch::Tensor& x, const std::vector<torch::Tensor>& weights,
                const std::vector<c10::optional<torch::Tensor>>& biases, const std::vector<int64_t>& offs,
                torch::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = offs.back();
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    size_t wi = std::upper_bound(offs.begin(), offs.end(), begin) - offs.begin() - 1;
    for (int64_t n = begin; n < end; ++n) {
      while (n >= offs[wi + 1]) ++wi;
      const int64_t local = n - offs[wi];
      const T* bp = biases[wi].has_value() ? biases[wi]->data_ptr<T>() + local : nullptr;
      one_row(xp, M, K, weights[wi].data_ptr<T>() + local * K, bp, yp + n, N);
    }
  });
}

// x: [M, K]; weights: [N_i, K] each; returns [M, sum N_i] (the weights' outputs side by side); float32 or bfloat16
torch::Tensor skinny_linear(const torch::Tensor& x, const std::vector<torch::Tensor>& weights,
                            const std::vector<c10::optional<torch::Tensor>>& biases) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(x.dim() == 2 && (dt == at::kFloat || dt == at::kBFloat16) && x.is_contiguous(),
              "x must be a contiguous float32 or bfloat16 [M, K]");
  TORCH_CHECK(weights.size() == biases.size() && !weights.empty(), "one bias (or None) per weight");
  const int64_t M = x.size(0), K = x.size(1);
  std::vector<int64_t> offs{0};
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& w = weights[i];
    TORCH_CHECK(w.dim() == 2 && w.size(1) == K && w.scalar_type() == dt && w.is_contiguous(),
                "weights must be contiguous [N, K] with the input's K and dtype");
    TORCH_CHECK(!biases[i].has_value() || (biases[i]->numel() == w.size(0) && biases[i]->is_contiguous() &&
                                           biases[i]->scalar_type() == dt), "a bias must match its weight");
    offs.push_back(offs.back() + w.size(0));
  }
  auto y = torch::empty({M, offs.back()}, x.options());
  if (dt == at::kFloat) run<float>(x, weights, biases, offs, y);
  else run<at::BFloat16>(x, weights, biases, offs, y);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("skinny_linear", &skinny_linear); }
"""

_KERNEL = CppKernel("specdec_skinny_gemm", _SOURCE)


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


def skinny_linear(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> torch.Tensor:
    """``x @ cat(weights).T + cat(biases)``: x ``[M, K]`` contiguous (M <= a few), weights ``[N_i, K]`` contiguous,
    one bias (or None) per weight, all float32 or all bfloat16 (float32 accumulation, one rounding to bfloat16).
    Returns ``[M, sum N_i]``."""
    return _KERNEL.module.skinny_linear(x, weights, biases)
