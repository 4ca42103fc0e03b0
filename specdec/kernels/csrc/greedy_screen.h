// The greedy head's screen pass: the tokens a bfloat16 screen cannot rule out (specdec/kernels/screen_cpp.py).
#pragma once
#include <torch/types.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace greedy_screen {

#if defined(__AVX512F__)
// 16 bfloat16 values widened exactly to float32 (a bfloat16 is a float32's upper half)
static inline __m512 load16(const at::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
#endif

// a: [R, V] bfloat16 screened logits; norm: [V] float32 row norms of W; scale: [R] float32 (c ||h_r||).
// Per row: top = max a, arg = its first index, floor = top - scale ||W_arg|| - u |top|; slack = u max(top, 0), or
// u max |a_i| when floor < scale max_norm; a token is a candidate when a_i + scale ||W_i|| >= floor - slack - 1e-30.
// Returns int64 [2, C]: the candidates' rows, then their tokens (row-major order).
torch::Tensor screen(const torch::Tensor& a, const torch::Tensor& norm, const torch::Tensor& scale, double max_norm,
                     double u) {
  TORCH_CHECK(a.dim() == 2 && a.scalar_type() == at::kBFloat16 && a.is_contiguous(),
              "a must be a contiguous bfloat16 [R, V]");
  TORCH_CHECK(norm.dim() == 1 && norm.size(0) == a.size(1) && norm.scalar_type() == at::kFloat && norm.is_contiguous(),
              "norm must be a contiguous float32 [V]");
  TORCH_CHECK(
      scale.dim() == 1 && scale.size(0) == a.size(0) && scale.scalar_type() == at::kFloat && scale.is_contiguous(),
      "scale must be a contiguous float32 [R]");
  const int64_t R = a.size(0), V = a.size(1);
  const at::BFloat16* ap = a.data_ptr<at::BFloat16>();
  const float* np = norm.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  const float uf = static_cast<float>(u), mn = static_cast<float>(max_norm);
  std::vector<std::vector<int64_t>> found(R);
  at::parallel_for(0, R, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const at::BFloat16* row = ap + r * V;
      float top = -std::numeric_limits<float>::infinity(), lo = std::numeric_limits<float>::infinity();
      int64_t i = 0;
#if defined(__AVX512F__)
      __m512 vmax = _mm512_set1_ps(top), vmin = _mm512_set1_ps(lo);
      for (; i + 16 <= V; i += 16) {
        __m512 v = load16(row + i);
        vmax = _mm512_max_ps(vmax, v);
        vmin = _mm512_min_ps(vmin, v);
      }
      top = _mm512_reduce_max_ps(vmax);
      lo = _mm512_reduce_min_ps(vmin);
#endif
      for (; i < V; ++i) {
        const float v = static_cast<float>(row[i]);
        top = std::max(top, v);
        lo = std::min(lo, v);
      }
      int64_t arg = 0;
      while (arg < V && static_cast<float>(row[arg]) != top) ++arg;
      const float s = sp[r];
      const float floor_ = top - s * np[arg] - uf * std::fabs(top);
      float slack = uf * std::max(top, 0.0f);
      if (floor_ < s * mn) slack = uf * std::max(std::fabs(lo), std::fabs(top));
      const float thr = floor_ - slack - 1e-30f;
      std::vector<int64_t>& out = found[r];
      i = 0;
#if defined(__AVX512F__)
      const __m512 vs = _mm512_set1_ps(s), vt = _mm512_set1_ps(thr);
      for (; i + 16 <= V; i += 16) {
        __m512 t = _mm512_add_ps(load16(row + i), _mm512_mul_ps(_mm512_loadu_ps(np + i), vs));
        __mmask16 m = _mm512_cmp_ps_mask(t, vt, _CMP_GE_OQ);
        while (m) {
          out.push_back(i + __builtin_ctz(m));
          m &= m - 1;
        }
      }
#endif
      for (; i < V; ++i)
        if (static_cast<float>(row[i]) + np[i] * s >= thr) out.push_back(i);
    }
  });
  int64_t total = 0;
  for (const auto& f : found) total += static_cast<int64_t>(f.size());
  auto res = torch::empty({2, total}, torch::kLong);
  int64_t* rp = res.data_ptr<int64_t>();
  int64_t* tp = rp + total;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t t : found[r]) {
      *rp++ = r;
      *tp++ = t;
    }
  return res;
}

}  // namespace greedy_screen
