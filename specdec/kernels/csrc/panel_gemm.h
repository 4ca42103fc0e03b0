// Linear layers on packed panels of 32 output features (see specdec/kernels/skinny_gemm.py): panel_linear(x, panels,
// bias, N). Also compiled into the fused decoder layers (decoder_layer.h).
#pragma once
#include <torch/types.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <type_traits>
#include <cmath>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

constexpr int64_t P = 32;  // output features per panel
// panel depth steps (128 bytes each) read ahead with software prefetches: with the rows' multiply-adds between its
// loads the hardware prefetcher falls behind, and 8 rows cost the weights' stream plus the arithmetic; 2 KB ahead,
// the 30 layers' linears of SmolLM2-135M at 8 rows took 20.8 ms instead of 26.5 (1 row: 16.5 and 16.7; 8 steps ahead
// did no better than none, 24 and 48 no better than 16; docs/history/16-fused-layers.md)
constexpr int64_t PF = 16;
constexpr int64_t RB = 8;  // input rows per pass over a panel (2 x RB accumulators stay in registers)

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
// AVX2: S rows (columns of xt, whose rows are ldx apart) against one panel; float32 sums over k in order
template <int S>
static inline void panel_f32_avx2(const float* xt, int ldx, int64_t K, const float* p, const float* bias, float* y,
                                  int64_t ldy, int64_t valid) {
  __m256 a[S][4];
#pragma GCC unroll 4
  for (int r = 0; r < S; ++r)
    for (int v = 0; v < 4; ++v) a[r][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(p + (k + PF) * P), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(p + (k + PF) * P + 16), _MM_HINT_T0);
    __m256 xv[S];
#pragma GCC unroll 4
    for (int r = 0; r < S; ++r) xv[r] = _mm256_broadcast_ss(xt + k * ldx + r);
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      const __m256 w = _mm256_loadu_ps(p + k * P + 8 * v);
#pragma GCC unroll 4
      for (int r = 0; r < S; ++r) a[r][v] = _mm256_fmadd_ps(w, xv[r], a[r][v]);
    }
  }
  alignas(32) float out[P];
  for (int r = 0; r < S; ++r) {
    for (int v = 0; v < 4; ++v) _mm256_store_ps(out + 8 * v, a[r][v]);
    for (int64_t j = 0; j < valid; ++j) y[r * ldy + j] = bias ? out[j] + bias[j] : out[j];
  }
}
#endif

// y[r * ldy + j] (+ bias[j]) for the R input rows of xt ([K][R], float32) and the first `valid` outputs of one panel
// ([K][32]); float32 sums over k in order
template <int R>
static inline void panel_f32(const float* xt, int64_t K, const float* p, const float* bias, float* y, int64_t ldy,
                             int64_t valid) {
#if defined(__AVX512F__)
  __m512 a0[R], a1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    a0[r] = _mm512_setzero_ps();
    a1[r] = _mm512_setzero_ps();
  }
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
#elif defined(__AVX2__) && defined(__FMA__)
  // 16 registers of 8 floats: up to three rows' 4 x 8 accumulators at a time, each row's sums in k order as above
  for (int r0 = 0; r0 < R; r0 += 3) {
    const int n = std::min(3, R - r0);
    if (n == 3) panel_f32_avx2<3>(xt + r0, R, K, p, bias, y + r0 * ldy, ldy, valid);
    else if (n == 2) panel_f32_avx2<2>(xt + r0, R, K, p, bias, y + r0 * ldy, ldy, valid);
    else panel_f32_avx2<1>(xt + r0, R, K, p, bias, y + r0 * ldy, ldy, valid);
  }
#else
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < valid; ++j) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s = std::fma(p[k * P + j], xt[k * R + r], s);
      y[r * ldy + j] = bias ? s + bias[j] : s;
    }
#endif
}

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512BF16__)
// AVX2 without bfloat16 dot products: a 32-bit lane of the panel holds one output's pair (k even, k odd); shifting
// it left by 16 gives the even weight as a float32, masking the low half the odd one. S rows (pairs of xt, whose
// rows are ldx pairs apart); float32 sums, the even feature then the odd one of each pair, in order
template <int S>
static inline void panel_bf16_avx2(const at::BFloat16* xt, int ldx, int64_t K2, const at::BFloat16* p,
                                   const float* bias, at::BFloat16* y, int64_t ldy, int64_t valid) {
  __m256 a[S][4];
#pragma GCC unroll 4
  for (int r = 0; r < S; ++r)
    for (int v = 0; v < 4; ++v) a[r][v] = _mm256_setzero_ps();
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t k = 0; k < K2; ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(p + (k + PF) * 2 * P), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(p + (k + PF) * 2 * P + P), _MM_HINT_T0);
    __m256 x0[S], x1[S];
#pragma GCC unroll 4
    for (int r = 0; r < S; ++r) {
      x0[r] = _mm256_set1_ps(static_cast<float>(xt[(k * ldx + r) * 2]));
      x1[r] = _mm256_set1_ps(static_cast<float>(xt[(k * ldx + r) * 2 + 1]));
    }
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + k * 2 * P + 16 * v));
      const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)), wo = _mm256_castsi256_ps(_mm256_and_si256(w, high));
#pragma GCC unroll 4
      for (int r = 0; r < S; ++r) a[r][v] = _mm256_fmadd_ps(wo, x1[r], _mm256_fmadd_ps(we, x0[r], a[r][v]));
    }
  }
  alignas(32) float out[P];
  for (int r = 0; r < S; ++r) {
    for (int v = 0; v < 4; ++v) _mm256_store_ps(out + 8 * v, a[r][v]);
    for (int64_t j = 0; j < valid; ++j) y[r * ldy + j] = at::BFloat16(bias ? out[j] + bias[j] : out[j]);
  }
}
#endif

// bfloat16: xt holds pairs of input features ([K/2][R] of 32 bits), the panel [K/2][32][2]; float32 sums of pairs
// (vdpbf16ps), one rounding to bfloat16 at the end
template <int R>
static inline void panel_bf16(const at::BFloat16* xt, int64_t K2, const at::BFloat16* p, const float* bias,
                              at::BFloat16* y, int64_t ldy, int64_t valid) {
#if defined(__AVX512BF16__)
  __m512 a0[R], a1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    a0[r] = _mm512_setzero_ps();
    a1[r] = _mm512_setzero_ps();
  }
  const int32_t* xi = reinterpret_cast<const int32_t*>(xt);
  for (int64_t k = 0; k < K2; ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(p + (k + PF) * 2 * P), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(p + (k + PF) * 2 * P + P), _MM_HINT_T0);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(p + k * 2 * P),
                   w1 = (__m512bh)_mm512_loadu_si512(p + k * 2 * P + P);
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
#elif defined(__AVX2__) && defined(__FMA__)
  for (int r0 = 0; r0 < R; r0 += 3) {
    const int n = std::min(3, R - r0);
    if (n == 3) panel_bf16_avx2<3>(xt + 2 * r0, R, K2, p, bias, y + r0 * ldy, ldy, valid);
    else if (n == 2) panel_bf16_avx2<2>(xt + 2 * r0, R, K2, p, bias, y + r0 * ldy, ldy, valid);
    else panel_bf16_avx2<1>(xt + 2 * r0, R, K2, p, bias, y + r0 * ldy, ldy, valid);
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
  // clang-format off
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
  // clang-format on
}

// x: [M, K] (float32 or bfloat16, contiguous); panels: [T, K, 32] float32 or [T, K/2, 32, 2] bfloat16; bias: float32
// [N] or None; returns [M, N]. The rows go in blocks of RB, each block transposed to [K][rows] so the broadcasts
// read one cache line per input feature.
inline torch::Tensor panel_linear(const torch::Tensor& x, const torch::Tensor& panels,
                                  const c10::optional<torch::Tensor>& bias, int64_t N) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(x.dim() == 2 && (dt == at::kFloat || dt == at::kBFloat16) && x.is_contiguous(),
              "x must be a contiguous float32 or bfloat16 [M, K]");
  TORCH_CHECK(panels.scalar_type() == dt && panels.is_contiguous(),
              "the panels must be contiguous, of the input's dtype");
  const int64_t M = x.size(0), K = x.size(1), T = panels.size(0);
  const bool bf = dt == at::kBFloat16;
  const int64_t Kp = bf ? (K + 1) / 2 : K;  // the panels' depth: features, or pairs of features
  TORCH_CHECK(
      panels.dim() == (bf ? 4 : 3) && panels.size(1) == Kp && panels.size(2) == P && T * P >= N && N > (T - 1) * P,
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
          panel<float>(static_cast<int>(std::min(RB, M - m)), xd + m * K, K, pp + t * K * P, bp ? bp + t * P : nullptr,
                       yp + m * N + t * P, N, std::min(P, N - t * P));
    });
  }
  return y;
}
