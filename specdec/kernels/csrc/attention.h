// One decode or verify step's attention over a dense cached K/V (specdec/kernels/cpu_attention.py).
#pragma once
#include <torch/types.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <limits>
#include <vector>

#include "simd.h"

namespace cpu_attention {

// mode 0: no mask (causal when `causal`); 1: additive mask of the input's dtype; 2: boolean mask (true = visible).
// The mask is read through its strides, so a broadcast [B|1, H|1, n, T] mask needs no copy.
template <typename scalar_t, int mode>
static void run(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& mask,
                double scale, bool causal, torch::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), n = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), T = k.size(2), G = H / Hkv;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  int64_t ms0 = 0, ms1 = 0, ms2 = 0, ms3 = 0;
  if (mode) {
    ms0 = mask.stride(0);
    ms1 = mask.stride(1);
    ms2 = mask.stride(2);
    ms3 = mask.stride(3);
  }
  const bool* mb = mode == 2 ? mask.data_ptr<bool>() : nullptr;
  const scalar_t* ma = mode == 1 ? mask.data_ptr<scalar_t>() : nullptr;
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t sc = static_cast<acc_t>(scale);
  // one work item per (batch, query row, KV head): its G query heads read each key and value once
  at::parallel_for(0, B * n * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qf(G * D), s(G * T), acc(G * D), mx(G), total(G);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / (n * Hkv), i = (idx / Hkv) % n, hk = idx % Hkv;
      for (int64_t g = 0; g < G; ++g) {
        const scalar_t* qr = qp + b * qs0 + (hk * G + g) * qs1 + i * qs2;
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = static_cast<acc_t>(qr[d]) * sc;
      }
      const scalar_t* kh = kp + b * ks0 + hk * ks1;
      const scalar_t* vh = vp + b * vs0 + hk * vs1;
      const int64_t P = ((mode == 0 && causal) ? T - n + i : T - 1) + 1;  // causal: bottom-right aligned
      std::fill(mx.begin(), mx.end(), -std::numeric_limits<acc_t>::infinity());
      for (int64_t j = 0; j < P; ++j) {
        const scalar_t* kr = kh + j * ks2;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = hk * G + g;
          acc_t x;
          if constexpr (mode == 2) {
            if (!mb[b * ms0 + h * ms1 + i * ms2 + j * ms3]) {
              s[g * T + j] = -std::numeric_limits<acc_t>::infinity();
              continue;
            }
            x = dot<acc_t, scalar_t>(qf.data() + g * D, kr, D);
          } else if constexpr (mode == 1) {
            x = dot<acc_t, scalar_t>(qf.data() + g * D, kr, D) +
                static_cast<acc_t>(ma[b * ms0 + h * ms1 + i * ms2 + j * ms3]);
          } else {
            x = dot<acc_t, scalar_t>(qf.data() + g * D, kr, D);
          }
          s[g * T + j] = x;
          mx[g] = std::max(mx[g], x);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        acc_t* sg = s.data() + g * T;
        if (mx[g] == -std::numeric_limits<acc_t>::infinity()) {
          total[g] = 0;
          continue;
        }  // nothing visible
        for (int64_t j = 0; j < P; ++j) sg[j] -= mx[g];
        exp_inplace<acc_t>(sg, P);
        acc_t sum = 0;
        for (int64_t j = 0; j < P; ++j) sum += sg[j];
        total[g] = sum;
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      acc_t* __restrict__ ap = acc.data();
      for (int64_t j = 0; j < P; ++j) {
        const scalar_t* __restrict__ vr = vh + j * vs2;
        for (int64_t g = 0; g < G; ++g) {
          const acc_t w = s[g * T + j];
          if (w == acc_t(0) || total[g] == acc_t(0)) continue;
          acc_t* __restrict__ a = ap + g * D;
#pragma GCC ivdep
          for (int64_t d = 0; d < D; ++d) a[d] += w * static_cast<acc_t>(vr[d]);
        }
      }
      for (int64_t g = 0; g < G; ++g) {  // nothing visible: zeros, as SDPA's math kernel
        const acc_t inv = total[g] > 0 ? acc_t(1) / total[g] : acc_t(0);
        scalar_t* o = op + ((b * n + i) * H + hk * G + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[g * D + d] * inv);
      }
    }
  });
}

// q [B, H, n, D], k/v [B, H_kv, T, D] (any strides, the last one 1); mask: none, or [B|1, H|1, n, T] additive (the
// input's dtype) or boolean. Returns [B, n, H, D] contiguous.
torch::Tensor dense_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                              const c10::optional<torch::Tensor>& mask, double scale, bool causal) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be [B, H, n, D] and [B, H_kv, T, D]");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "the head dim must be contiguous");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(3) == k.size(3) && q.size(1) % k.size(1) == 0,
              "k and v must match, and q's heads be a multiple of theirs");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "one dtype for q, k, v");
  auto out = torch::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options());
  torch::Tensor m;
  int mode = 0;
  if (mask.has_value()) {
    TORCH_CHECK(mask->dim() == 4 && mask->size(2) == q.size(2) && mask->size(3) == k.size(2),
                "the mask must be [B|1, H|1, n, T]");
    m = mask->expand({q.size(0), q.size(1), q.size(2), k.size(2)});
    mode = m.scalar_type() == at::kBool ? 2 : 1;
    TORCH_CHECK(mode == 2 || m.scalar_type() == q.scalar_type(), "an additive mask must have the input's dtype");
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, q.scalar_type(), "dense_attention", [&] {
    if (mode == 0)
      run<scalar_t, 0>(q, k, v, m, scale, causal, out);
    else if (mode == 1)
      run<scalar_t, 1>(q, k, v, m, scale, causal, out);
    else
      run<scalar_t, 2>(q, k, v, m, scale, causal, out);
  });
  return out;
}

}  // namespace cpu_attention
