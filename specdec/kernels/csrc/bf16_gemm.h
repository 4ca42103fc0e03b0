// Linears on bfloat16 weight panels with float32 activations (target.quantization=bf16, as llama.cpp's BF16 files):
// bf16_linear(x, panels, bias, N), reached through quant_gemm.h's quant_linear with bits = 16.
//
// The panels are skinny_gemm's bfloat16 layout, [T, K/2, 32 (j), 2 (k even, k odd)]: a 32-bit lane holds one
// output's pair of weights, so shifting it left by 16 gives the even weight as a float32 and masking its low half the
// odd one (exact: a bfloat16 is the top half of a float32). The activations are not rounded: each output sums
// w x in float32 fused multiply-adds over the pairs in order, the even feature then the odd one, so a row's result is
// bitwise the same whatever the number of rows, and the portable loop gives the AVX2 and AVX-512 paths' bits (with
// AVX-512 a zmm holds 16 outputs' pairs, two a row, and blocks are 6 rows: twice the rows per pass over the weights).
#pragma once
#include <torch/types.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SPECDEC_BF16W_AVX2 1
#if defined(__AVX512F__)
#define SPECDEC_BF16W_AVX512 1
#endif
#endif

namespace bf16w {

constexpr int64_t P = 32;   // output features per panel
#ifdef SPECDEC_BF16W_AVX512
constexpr int64_t RB = 6;   // rows per pass over a panel: 6 x 2 zmm accumulators, one pair of weights, broadcasts
#else
constexpr int64_t RB = 2;   // rows per pass over a panel: 2 x 4 accumulators, the rows' inputs and one pair of weights
#endif
constexpr int64_t PF = 16;  // pairs (128 bytes each) read ahead with software prefetches, as the float32 panels do

static inline float bf16_at(const uint16_t* p, int64_t i) {  // the bfloat16 at p[i] as a float32, exactly
  const uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// y[r * ldy + j] (+ bias[j]) for R rows of x (ldx apart) and the first `valid` outputs of one panel [K/2][32][2];
// PORTABLE: the portable loop whatever the CPU (the tests' reference)
template <int R, bool PORTABLE = false>
static inline void panel(const float* x, int64_t ldx, int64_t K2, const uint16_t* p, const float* bias, float* y,
                         int64_t ldy, int64_t valid) {
#if defined(SPECDEC_BF16W_AVX512)
  if constexpr (!PORTABLE) {
  __m512 a[R][2];
  for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm512_setzero_ps();
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t k = 0; k < K2; ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(p + (k + PF) * 2 * P), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(p + (k + PF) * 2 * P + P), _MM_HINT_T0);
#pragma GCC unroll 2
    for (int v = 0; v < 2; ++v) {
      const __m512i w = _mm512_loadu_si512(p + k * 2 * P + 32 * v);
      const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
      const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(w, high));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
        a[r][v] = _mm512_fmadd_ps(wo, _mm512_set1_ps(x[r * ldx + 2 * k + 1]),
                                  _mm512_fmadd_ps(we, _mm512_set1_ps(x[r * ldx + 2 * k]), a[r][v]));
    }
  }
  alignas(64) float out[P];
  for (int r = 0; r < R; ++r) {
    _mm512_store_ps(out, a[r][0]);
    _mm512_store_ps(out + 16, a[r][1]);
    for (int64_t j = 0; j < valid; ++j) y[r * ldy + j] = bias ? out[j] + bias[j] : out[j];
  }
  return;
  }
#elif defined(SPECDEC_BF16W_AVX2)
  if constexpr (!PORTABLE) {
  __m256 a[R][4];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) a[r][v] = _mm256_setzero_ps();
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t k = 0; k < K2; ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(p + (k + PF) * 2 * P), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(p + (k + PF) * 2 * P + P), _MM_HINT_T0);
    __m256 x0[R], x1[R];
    for (int r = 0; r < R; ++r) {
      x0[r] = _mm256_broadcast_ss(x + r * ldx + 2 * k);
      x1[r] = _mm256_broadcast_ss(x + r * ldx + 2 * k + 1);
    }
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + k * 2 * P + 16 * v));
      const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
      const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(w, high));
      for (int r = 0; r < R; ++r) a[r][v] = _mm256_fmadd_ps(wo, x1[r], _mm256_fmadd_ps(we, x0[r], a[r][v]));
    }
  }
  alignas(32) float out[P];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < 4; ++v) _mm256_store_ps(out + 8 * v, a[r][v]);
    for (int64_t j = 0; j < valid; ++j) y[r * ldy + j] = bias ? out[j] + bias[j] : out[j];
  }
  return;
  }
#endif
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < valid; ++j) {
      float s = 0.f;
      for (int64_t k = 0; k < K2; ++k) {
        s = std::fma(bf16_at(p, (k * P + j) * 2), x[r * ldx + 2 * k], s);
        s = std::fma(bf16_at(p, (k * P + j) * 2 + 1), x[r * ldx + 2 * k + 1], s);
      }
      y[r * ldy + j] = bias ? s + bias[j] : s;
    }
}

// rows b .. b + R of x against one panel, R = min(RB, M - b) (the template's row count for each R up to RB)
template <bool PORTABLE>
static inline void block(int64_t R, const float* x, int64_t ldx, int64_t K2, const uint16_t* p, const float* bias,
                         float* y, int64_t ldy, int64_t valid) {
  switch (R) {
#ifdef SPECDEC_BF16W_AVX512
    case 6: panel<6, PORTABLE>(x, ldx, K2, p, bias, y, ldy, valid); break;
    case 5: panel<5, PORTABLE>(x, ldx, K2, p, bias, y, ldy, valid); break;
    case 4: panel<4, PORTABLE>(x, ldx, K2, p, bias, y, ldy, valid); break;
    case 3: panel<3, PORTABLE>(x, ldx, K2, p, bias, y, ldy, valid); break;
#endif
    case 2: panel<2, PORTABLE>(x, ldx, K2, p, bias, y, ldy, valid); break;
    default: panel<1, PORTABLE>(x, ldx, K2, p, bias, y, ldy, valid); break;
  }
}

// x [M, K] float32 contiguous (K even); panels bfloat16 [T, K/2, 32, 2]; bias float32 [N] or None -> [M, N] float32.
// PORTABLE: the portable loop whatever the CPU
template <bool PORTABLE = false>
inline torch::Tensor bf16_linear(const torch::Tensor& x, const torch::Tensor& panels,
                                 const c10::optional<torch::Tensor>& bias, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), T = panels.size(0), K2 = K / 2;
  TORCH_CHECK(K % 2 == 0, "the input size must be even");
  TORCH_CHECK(panels.scalar_type() == at::kBFloat16 && panels.is_contiguous() && panels.dim() == 4 &&
                  panels.size(1) == K2 && panels.size(2) == P && panels.size(3) == 2,
              "the bfloat16 panels were packed for another input size (K)");
  TORCH_CHECK(T * P >= N && N > (T - 1) * P, "the bfloat16 panels were packed for another output size (N)");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->numel() == N && bias->is_contiguous()),
              "the bias must be float32 [N]");
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* xp = x.data_ptr<float>();
  const uint16_t* pp = reinterpret_cast<const uint16_t*>(panels.data_ptr());
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const uint16_t* pt = pp + t * K2 * 2 * P;
      const float* bt = bp ? bp + t * P : nullptr;
      const int64_t valid = std::min(P, N - t * P);
      for (int64_t b = 0; b < M; b += RB)
        block<PORTABLE>(std::min(RB, M - b), xp + b * K, K, K2, pt, bt, yp + b * N + t * P, N, valid);
    }
  });
  return y;
}

}  // namespace bf16w
