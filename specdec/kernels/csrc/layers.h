// Llama's RMSNorm and the gated SiLU MLP's silu(gate) * up, float32, one call each (specdec/kernels/cpu_layers.py).
#pragma once
#include <torch/types.h>
#include <ATen/Parallel.h>
#include <cmath>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#include <sleef.h>
#endif

// out[m] = w * (x[m] * 1/sqrt(mean(x[m]^2) + eps)), x: [M, H] float32
inline torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous float32 [M, H]");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1) && w.scalar_type() == at::kFloat && w.is_contiguous(),
              "bad weight");
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
      for (; k + 16 <= H; k += 16) {
        const __m512 v = _mm512_loadu_ps(xr + k);
        acc = _mm512_fmadd_ps(v, v, acc);
      }
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
inline torch::Tensor silu_mul(const torch::Tensor& gu) {
  TORCH_CHECK(gu.dim() == 2 && gu.scalar_type() == at::kFloat && gu.is_contiguous() && gu.size(1) % 2 == 0,
              "gu must be a contiguous float32 [M, 2I]");
  const int64_t M = gu.size(0), I = gu.size(1) / 2;
  auto out = torch::empty({M, I}, gu.options());
  const float* gp = gu.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // work in spans of 512 features that never depend on M (the vector / scalar split of an element depends only on
  // its position in its row), so a row's result is bitwise the same whatever the number of rows
  constexpr int64_t SPAN = 512;
  const int64_t spans = (I + SPAN - 1) / SPAN;
  at::parallel_for(0, M * spans, 8, [&](int64_t b, int64_t e) {
    for (int64_t unit = b; unit < e; ++unit) {
      const int64_t m = unit / spans, i = (unit % spans) * SPAN, n = std::min(SPAN, I - i);
      const float* g = gp + m * 2 * I + i;
      const float* u = g + I;
      float* o = op + m * I + i;
      int64_t k = 0;
#if defined(__AVX512F__)
      const __m512 one = _mm512_set1_ps(1.f);
      for (; k + 16 <= n; k += 16) {
        const __m512 gv = _mm512_loadu_ps(g + k);
        const __m512 s =
            _mm512_div_ps(gv, _mm512_add_ps(one, Sleef_expf16_u10(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
        _mm512_storeu_ps(o + k, _mm512_mul_ps(s, _mm512_loadu_ps(u + k)));
      }
#elif defined(__AVX2__) && defined(__FMA__)
      const __m256 one = _mm256_set1_ps(1.f);
      for (; k + 8 <= n; k += 8) {
        const __m256 gv = _mm256_loadu_ps(g + k);
        const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, Sleef_expf8_u10(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
        _mm256_storeu_ps(o + k, _mm256_mul_ps(s, _mm256_loadu_ps(u + k)));
      }
#endif
      for (; k < n; ++k) o[k] = g[k] / (1.f + std::exp(-g[k])) * u[k];
    }
  });
  return out;
}
