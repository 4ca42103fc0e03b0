// SIMD helpers shared by the attention kernels: dot(a, b) and exp in place, AVX2 + FMA where the build has them
// (SPECDEC_AVX2), scalar loops otherwise.
#pragma once

#include <ATen/OpMathType.h>
#include <cmath>
#include <cstdint>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <sleef.h>
#define SPECDEC_AVX2 1
#endif

// dot(a, b) over n elements, and e[i] = exp(e[i]) for i < n: 8 lanes at a time with AVX2 (Sleef's exp, 1 ULP, from
// libtorch, for every element), the scalar loops otherwise
template <typename acc_t, typename scalar_t>
static inline acc_t dot(const acc_t* a, const scalar_t* b, int64_t n) {
  acc_t s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * static_cast<acc_t>(b[i]);
  return s;
}
template <typename acc_t>
static inline void exp_inplace(acc_t* e, int64_t n) {
  for (int64_t i = 0; i < n; ++i) e[i] = std::exp(e[i]);
}
#ifdef SPECDEC_AVX2
template <>
inline float dot<float, float>(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  __m256 v = _mm256_add_ps(acc0, acc1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  float s = _mm_cvtss_f32(h);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}
// every element through the same vector exp, the tail too (padded): an element's result must not depend on n, or a
// masked tree row (more keys, the same visible ones) would round differently from a one-token step
template <>
inline void exp_inplace<float>(float* e, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(e + i, Sleef_expf8_u10(_mm256_loadu_ps(e + i)));
  if (i < n) {
    alignas(32) float t[8] = {0.f};
    for (int64_t j = i; j < n; ++j) t[j - i] = e[j];
    _mm256_store_ps(t, Sleef_expf8_u10(_mm256_load_ps(t)));
    for (int64_t j = i; j < n; ++j) e[j] = t[j - i];
  }
}
#endif
