// Linear layers on weight-only quantized panels (see specdec/kernels/quant_gemm.py): quant_linear(x, q, d, m, bias, N).
//
// Weights W [N, K] in groups of G = 32 input features per output feature, as GGUF's Q8_0 (int8 q, scale d:
// w = d q) and Q4_1 (4-bit q in 0..15, scale d and min m: w = d q + m); d and m are float16. Packed per panel of 32
// output features and per group: q int8 [T, K/32, 32 (k), 32 (j)] or uint8 [T, K/32, 32 (k), 16] (byte b of a k holds
// output b in its low nibble and output b + 16 in its high one); d, m float16 [T, K/32, 32 (j)].
//
// y[r, j] = sum over groups g of  d[g, j] * S[g, r, j] (+ m[g, j] * X[g, r])  (+ bias[j]), where
// S[g, r, j] = sum over k in g of q[k, j] x[r, k] and X[g, r] = sum over k in g of x[r, k], every sum in float32 and in
// k order (fused multiply-adds): a row's result is bitwise the same whatever the number of rows, as for the float32
// panels, so speculation over a quantized target keeps its greedy output. The integer weights are unpacked in
// registers: the weights stream from memory at 1 byte (int8) or 5/8 byte (int4) per weight instead of 4.
#pragma once
#include <torch/types.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define SPECDEC_QUANT_AVX2 1
#endif

namespace quant {

constexpr int64_t P = 32;   // output features per panel
constexpr int64_t G = 32;   // input features per group
constexpr int64_t RB = 8;   // input rows per block (transposed together)

template <int BITS>
constexpr int64_t row_bytes() {  // bytes of one k step of a panel
  return BITS == 8 ? P : P / 2;
}

#ifdef SPECDEC_QUANT_AVX2
// the 32 weights of one k step as four vectors of 8 floats (outputs 0-7, 8-15, 16-23, 24-31)
template <int BITS>
static inline void unpack(const uint8_t* qk, __m256 w[4]) {
  if constexpr (BITS == 8) {
    for (int v = 0; v < 4; ++v)
      w[v] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qk + 8 * v))));
  } else {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qk));
    const __m128i low = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(lo, lo)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(hi, hi)));
  }
}

// one group (32 k steps) of S rows (columns r of xg [32][ldx]) against one panel, adding d S (+ m X) into acc [S][32];
// the weights come unpacked from qg, or (BUF) from qf, the group already unpacked to floats [32][32]
template <int BITS, int S, bool BUF>
static inline void group_rows(const float* xg, const float* xs, int ldx, const uint8_t* qg, const float* qf,
                              const at::Half* d, const at::Half* m, float* acc) {
  constexpr int64_t RBY = row_bytes<BITS>();
  __m256 s[S][4];
#pragma GCC unroll 4
  for (int r = 0; r < S; ++r)
    for (int v = 0; v < 4; ++v) s[r][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < G; ++k) {
    __m256 w[4];
    if constexpr (BUF) {
      for (int v = 0; v < 4; ++v) w[v] = _mm256_load_ps(qf + k * P + 8 * v);
    } else {
      if ((k * RBY) % 64 == 0)  // the next group, a cache line at a time: one sequential stream per panel
        _mm_prefetch(reinterpret_cast<const char*>(qg + G * RBY + k * RBY), _MM_HINT_T0);
      unpack<BITS>(qg + k * RBY, w);
    }
#pragma GCC unroll 4
    for (int r = 0; r < S; ++r) {
      const __m256 xv = _mm256_broadcast_ss(xg + k * ldx + r);
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) s[r][v] = _mm256_fmadd_ps(w[v], xv, s[r][v]);
    }
  }
  for (int v = 0; v < 4; ++v) {
    const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + 8 * v)));
    __m256 mv = _mm256_setzero_ps();
    if constexpr (BITS == 4) mv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m + 8 * v)));
    for (int r = 0; r < S; ++r) {
      __m256 a = _mm256_fmadd_ps(dv, s[r][v], _mm256_loadu_ps(acc + r * P + 8 * v));
      if constexpr (BITS == 4) a = _mm256_fmadd_ps(mv, _mm256_set1_ps(xs[r]), a);
      _mm256_storeu_ps(acc + r * P + 8 * v, a);
    }
  }
}

// R rows (xt [K][R], xsum [K/32][R]) against one panel into acc [R][32]: 16 registers of 8 floats hold three rows'
// 4 x 8 sums at a time; up to three rows unpack the weights as they go, more unpack each group once into a buffer
// (in L1) that every three rows then read, so the unpacking is not repeated per three rows
template <int BITS>
static inline void panel_rows(int R, const float* xt, const float* xsum, int64_t groups, const uint8_t* q,
                              const at::Half* d, const at::Half* m, float* acc) {
  constexpr int64_t RBY = row_bytes<BITS>();
  alignas(32) float qf[G * P];
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* qg = q + g * G * RBY;
    const float* xg = xt + g * G * R;
    const float* xs = xsum + g * R;
    const at::Half* dg = d + g * P;
    const at::Half* mg = m ? m + g * P : nullptr;
    if (R <= 3) {
      if (R == 3) group_rows<BITS, 3, false>(xg, xs, R, qg, nullptr, dg, mg, acc);
      else if (R == 2) group_rows<BITS, 2, false>(xg, xs, R, qg, nullptr, dg, mg, acc);
      else group_rows<BITS, 1, false>(xg, xs, R, qg, nullptr, dg, mg, acc);
      continue;
    }
    _mm_prefetch(reinterpret_cast<const char*>(qg + G * RBY), _MM_HINT_T0);
    for (int64_t k = 0; k < G; ++k) {
      if ((k * RBY) % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(qg + G * RBY + k * RBY), _MM_HINT_T0);
      __m256 w[4];
      unpack<BITS>(qg + k * RBY, w);
      for (int v = 0; v < 4; ++v) _mm256_store_ps(qf + k * P + 8 * v, w[v]);
    }
    for (int r0 = 0; r0 < R; r0 += 3) {
      const int n = std::min(3, R - r0);
      if (n == 3) group_rows<BITS, 3, true>(xg + r0, xs + r0, R, nullptr, qf, dg, mg, acc + r0 * P);
      else if (n == 2) group_rows<BITS, 2, true>(xg + r0, xs + r0, R, nullptr, qf, dg, mg, acc + r0 * P);
      else group_rows<BITS, 1, true>(xg + r0, xs + r0, R, nullptr, qf, dg, mg, acc + r0 * P);
    }
  }
}
#endif

// the weight q[k, j] of one panel as a float (portable path)
template <int BITS>
static inline float weight_at(const uint8_t* qk, int64_t j) {
  if constexpr (BITS == 8) return static_cast<float>(static_cast<int8_t>(qk[j]));
  return static_cast<float>(j < P / 2 ? (qk[j] & 0x0F) : (qk[j - P / 2] >> 4));
}

// R rows of one block (xt [K][R], xsum [K/32][R]) against one panel: acc [R][32], then y
template <int BITS>
static inline void panel(int R, const float* xt, const float* xsum, int64_t groups, const uint8_t* q,
                         const at::Half* d, const at::Half* m, const float* bias, float* y, int64_t ldy,
                         int64_t valid) {
  float acc[RB * P] = {0.f};
#ifdef SPECDEC_QUANT_AVX2
  panel_rows<BITS>(R, xt, xsum, groups, q, d, m, acc);
#else
  constexpr int64_t RBY = row_bytes<BITS>();
  for (int r = 0; r < R; ++r)
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t j = 0; j < P; ++j) {
        float s = 0.f;
        for (int64_t k = 0; k < G; ++k)
          s = std::fma(weight_at<BITS>(q + (g * G + k) * RBY, j), xt[(g * G + k) * R + r], s);
        float a = std::fma(static_cast<float>(d[g * P + j]), s, acc[r * P + j]);
        if constexpr (BITS == 4) a = std::fma(static_cast<float>(m[g * P + j]), xsum[g * R + r], a);
        acc[r * P + j] = a;
      }
#endif
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < valid; ++j) y[r * ldy + j] = bias ? acc[r * P + j] + bias[j] : acc[r * P + j];
}

// x [M, K] float32 contiguous; q int8 [T, K/32, 32, 32] or uint8 [T, K/32, 32, 16]; d (and m for 4 bits) float16
// [T, K/32, 32]; bias float32 [N] or None; returns [M, N] float32
inline torch::Tensor quant_linear(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& d,
                                  const c10::optional<torch::Tensor>& m, const c10::optional<torch::Tensor>& bias,
                                  int64_t N, int64_t bits) {
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be a contiguous float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), T = q.size(0), groups = K / G;
  TORCH_CHECK(K % G == 0, "the input size must be a multiple of 32");
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous() && q.size(1) == groups && q.size(2) == G &&
                  q.size(3) == (bits == 8 ? P : P / 2) && (q.scalar_type() == at::kChar || q.scalar_type() == at::kByte),
              "the quantized panels were packed for another input size (K) or number of bits");
  TORCH_CHECK(T * P >= N && N > (T - 1) * P, "the quantized panels were packed for another output size (N)");
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.is_contiguous() && d.numel() == T * groups * P, "d must be float16 [T, K/32, 32]");
  TORCH_CHECK(bits == 8 || (m.has_value() && m->scalar_type() == at::kHalf && m->is_contiguous() &&
                            m->numel() == T * groups * P),
              "4-bit panels need their mins m, float16 [T, K/32, 32]");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->numel() == N && bias->is_contiguous()),
              "the bias must be float32 [N]");
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  // per block of RB rows: xt [K][R] and the group sums xsum [K/32][R] (each in k order)
  auto xt = torch::empty({M * K}, x.options());
  auto xs = torch::empty({M * groups}, x.options());
  const float* xp = x.data_ptr<float>();
  float* xd = xt.data_ptr<float>();
  float* xsd = xs.data_ptr<float>();
  for (int64_t b = 0; b < M; b += RB) {
    const int64_t R = std::min(RB, M - b);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t r = 0; r < R; ++r) xd[b * K + k * R + r] = xp[(b + r) * K + k];
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t r = 0; r < R; ++r) {
        float s = 0.f;
        for (int64_t k = 0; k < G; ++k) s += xp[(b + r) * K + g * G + k];
        xsd[b * groups + g * R + r] = s;
      }
  }
  const uint8_t* qp = reinterpret_cast<const uint8_t*>(q.data_ptr());
  const at::Half* dp = d.data_ptr<at::Half>();
  const at::Half* mp = m.has_value() ? m->data_ptr<at::Half>() : nullptr;
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t panel_bytes = K * (bits == 8 ? P : P / 2);
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t b = 0; b < M; b += RB) {
        const int R = static_cast<int>(std::min(RB, M - b));
        const int64_t valid = std::min(P, N - t * P);
        const at::Half* dt = dp + t * groups * P;
        const at::Half* mt = mp ? mp + t * groups * P : nullptr;
        if (bits == 8)
          panel<8>(R, xd + b * K, xsd + b * groups, groups, qp + t * panel_bytes, dt, mt, bp ? bp + t * P : nullptr,
                   yp + b * N + t * P, N, valid);
        else
          panel<4>(R, xd + b * K, xsd + b * groups, groups, qp + t * panel_bytes, dt, mt, bp ? bp + t * P : nullptr,
                   yp + b * N + t * P, N, valid);
      }
  });
  return y;
}

}  // namespace quant
