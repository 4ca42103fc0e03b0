// Tree attention over the paged KV cache: every live node of a forward over its request's blocks and its tree
// ancestors, in one call (verifiers/paged/cpu_kernel.py).
#pragma once

#include <torch/types.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "simd.h"

#if defined(__AVX512F__)
#define SPECDEC_AVX512 1
#define SPECDEC_ATTN_FAST 1
constexpr int64_t LANES = 16;
// [sum(a), sum(b), sum(c), sum(d)]: four dot products' partial sums reduced together (fewer shuffles than four
// horizontal sums)
static inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  __m512 x = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));  // per 128-bit lane
  x = _mm512_add_ps(x, _mm512_shuffle_f32x4(x, x, 0x4E));
  x = _mm512_add_ps(x, _mm512_shuffle_f32x4(x, x, 0xB1));
  return _mm512_castps512_ps128(x);
}

// float32, head dim D = 16 * NV: scores s[g * P + j] = q_g . k_{pos[j]} for the G query heads (qf: [G][D], scaled),
// four keys at a time per head; then (after the softmax) o_g = sum_j s[g * P + j] v_{pos[j]} with the sums in
// registers, 64 dimensions at a time
static void scores_f32(const float* qf, int64_t G, int64_t NV, const float* kh, const int64_t* pos, int64_t P,
                       float* s) {
  const int64_t D = NV * 16;
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = qf + g * D;
    float* sg = s + g * P;
    int64_t j = 0;
    for (; j + 4 <= P; j += 4) {
      const float *k0 = kh + pos[j] * D, *k1 = kh + pos[j + 1] * D, *k2 = kh + pos[j + 2] * D,
                  *k3 = kh + pos[j + 3] * D;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t v = 0; v < NV; ++v) {
        const __m512 qv = _mm512_loadu_ps(qg + 16 * v);
        a0 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k0 + 16 * v), a0);
        a1 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k1 + 16 * v), a1);
        a2 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k2 + 16 * v), a2);
        a3 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k3 + 16 * v), a3);
      }
      _mm_storeu_ps(sg + j, reduce4(a0, a1, a2, a3));
    }
    for (; j < P; ++j) {
      const float* kr = kh + pos[j] * D;
      __m512 a = _mm512_setzero_ps();
      for (int64_t v = 0; v < NV; ++v)
        a = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * v), _mm512_loadu_ps(kr + 16 * v), a);
      sg[j] = _mm512_reduce_add_ps(a);
    }
  }
}

static void values_f32(const float* s, const float* total, int64_t G, int64_t NV, const float* vh, const int64_t* pos,
                       int64_t P, float* o /* [G][D] */) {
  const int64_t D = NV * 16;
  for (int64_t g = 0; g < G; ++g) {
    const float* sg = s + g * P;
    const float inv = total[g] > 0 ? 1.f / total[g] : 0.f;
    for (int64_t v0 = 0; v0 < NV; v0 += 4) {
      const int64_t nv = std::min<int64_t>(4, NV - v0);
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t j = 0; j < P; ++j) {
        const float* vr = vh + pos[j] * D + 16 * v0;
        const __m512 w = _mm512_set1_ps(sg[j]);
        a0 = _mm512_fmadd_ps(w, _mm512_loadu_ps(vr), a0);
        if (nv > 1) a1 = _mm512_fmadd_ps(w, _mm512_loadu_ps(vr + 16), a1);
        if (nv > 2) a2 = _mm512_fmadd_ps(w, _mm512_loadu_ps(vr + 32), a2);
        if (nv > 3) a3 = _mm512_fmadd_ps(w, _mm512_loadu_ps(vr + 48), a3);
      }
      float* og = o + g * D + 16 * v0;
      const __m512 sc = _mm512_set1_ps(inv);
      _mm512_storeu_ps(og, _mm512_mul_ps(a0, sc));
      if (nv > 1) _mm512_storeu_ps(og + 16, _mm512_mul_ps(a1, sc));
      if (nv > 2) _mm512_storeu_ps(og + 32, _mm512_mul_ps(a2, sc));
      if (nv > 3) _mm512_storeu_ps(og + 48, _mm512_mul_ps(a3, sc));
    }
  }
}
#elif defined(SPECDEC_AVX2)
#define SPECDEC_ATTN_FAST 1
constexpr int64_t LANES = 8;
// [sum(a), sum(b), sum(c), sum(d)] of four 8-lane partial sums
static inline __m128 reduce4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 x = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));  // per 128-bit lane
  return _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
}

// float32, head dim D = 8 * NV: the AVX-512 route's scores and values with 8 lanes (four keys at a time; the values'
// sums in registers, 64 dimensions at a time); NV a constant so that the loops unroll and the sums stay in registers
template <int NV>
static void scores_f32_n(const float* qf, int64_t G, const float* kh, const int64_t* pos, int64_t P, float* s) {
  constexpr int64_t D = NV * 8;
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = qf + g * D;
    float* sg = s + g * P;
    int64_t j = 0;
    for (; j + 4 <= P; j += 4) {
      const float *k0 = kh + pos[j] * D, *k1 = kh + pos[j + 1] * D, *k2 = kh + pos[j + 2] * D,
                  *k3 = kh + pos[j + 3] * D;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) {
        const __m256 qv = _mm256_loadu_ps(qg + 8 * v);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 8 * v), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + 8 * v), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + 8 * v), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + 8 * v), a3);
      }
      _mm_storeu_ps(sg + j, reduce4(a0, a1, a2, a3));
    }
    for (; j < P; ++j) {
      const float* kr = kh + pos[j] * D;
      __m256 a = _mm256_setzero_ps(), z = a;
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) a = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 8 * v), _mm256_loadu_ps(kr + 8 * v), a);
      sg[j] = _mm_cvtss_f32(reduce4(a, z, z, z));
    }
  }
}

// 64 dimensions (8 vectors) of the values: vh, o start at the slice; rows of vh and o are D floats apart
static void values_f32_64(const float* s, const float* total, int64_t G, int64_t D, const float* vh,
                          const int64_t* pos, int64_t P, float* o /* [G][D] */) {
  for (int64_t g = 0; g < G; ++g) {
    const float* sg = s + g * P;
    const float inv = total[g] > 0 ? 1.f / total[g] : 0.f;
    __m256 a[8];
#pragma GCC unroll 8
    for (int v = 0; v < 8; ++v) a[v] = _mm256_setzero_ps();
    for (int64_t j = 0; j < P; ++j) {
      const float* vr = vh + pos[j] * D;
      const __m256 w = _mm256_set1_ps(sg[j]);
#pragma GCC unroll 8
      for (int v = 0; v < 8; ++v) a[v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vr + 8 * v), a[v]);
    }
    const __m256 sc = _mm256_set1_ps(inv);
#pragma GCC unroll 8
    for (int v = 0; v < 8; ++v) _mm256_storeu_ps(o + g * D + 8 * v, _mm256_mul_ps(a[v], sc));
  }
}

// any head dim of whole vectors: the scores unrolled for 64 and 128, the values 64 dimensions at a time
static void scores_f32(const float* qf, int64_t G, int64_t NV, const float* kh, const int64_t* pos, int64_t P,
                       float* s) {
  if (NV == 8) return scores_f32_n<8>(qf, G, kh, pos, P, s);
  if (NV == 16) return scores_f32_n<16>(qf, G, kh, pos, P, s);
  const int64_t D = NV * 8;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t j = 0; j < P; ++j) s[g * P + j] = dot<float, float>(qf + g * D, kh + pos[j] * D, D);
}

static void values_f32(const float* s, const float* total, int64_t G, int64_t NV, const float* vh, const int64_t* pos,
                       int64_t P, float* o /* [G][D] */) {
  const int64_t D = NV * 8;
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) values_f32_64(s, total, G, D, vh + d0, pos, P, o + d0);
  if (d0 == D) return;
  for (int64_t g = 0; g < G; ++g) {  // the last D % 64 dimensions
    const float inv = total[g] > 0 ? 1.f / total[g] : 0.f;
    float a[64] = {0.f};
    for (int64_t j = 0; j < P; ++j)
      for (int64_t d = d0; d < D; ++d) a[d - d0] += s[g * P + j] * vh[pos[j] * D + d];
    for (int64_t d = d0; d < D; ++d) o[g * D + d] = a[d - d0] * inv;
  }
}
#endif

template <typename scalar_t>
static void run(const torch::Tensor& q, const torch::Tensor& k_store, const torch::Tensor& v_store,
                const torch::Tensor& row_req, const torch::Tensor& row_node, const torch::Tensor& tables,
                const torch::Tensor& prefix, const torch::Tensor& mask, double scale, int64_t W, double softcap,
                torch::Tensor& out) {
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t Hkv = k_store.size(0), NB = k_store.size(1), BS = k_store.size(2);
  const int64_t G = H / Hkv, N = mask.size(1), MB = tables.size(1);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k_store.data_ptr<scalar_t>();
  const scalar_t* vp = v_store.data_ptr<scalar_t>();
  const int64_t* rr = row_req.data_ptr<int64_t>();
  const int64_t* rn = row_node.data_ptr<int64_t>();
  const int64_t* tb = tables.data_ptr<int64_t>();
  const int64_t* pl = prefix.data_ptr<int64_t>();
  const bool* mk = mask.data_ptr<bool>();
  scalar_t* op = out.data_ptr<scalar_t>();
  using acc_t = at::opmath_type<scalar_t>;  // float for float and bfloat16, double for double
  const acc_t sc = static_cast<acc_t>(scale), cap = static_cast<acc_t>(softcap);
  // Work items: a KV head and a run of rows of one request (rows of a tree read the same prefix), the rows in turn.
  // A row's keys and values come from memory for the first row of a run and from this core's cache for the others:
  // per row and head, reading them was as costly as the weights' share of a row. A run is a whole request's rows,
  // cut in pieces only where there would be fewer items than twice the threads. Each row's arithmetic is unchanged
  // (the same keys in the same order): results do not depend on the runs
  const int64_t R = prefix.size(0);
  std::vector<std::vector<int64_t>> rows_of(R);
  for (int64_t t = 0; t < T; ++t) rows_of[rr[t]].push_back(t);
  int64_t live = 0;
  for (const auto& v : rows_of) live += !v.empty();
  if (live == 0) return;
  const int64_t want = 2 * at::get_num_threads();
  const int64_t pieces = std::max<int64_t>(1, (want + live * Hkv - 1) / (live * Hkv));  // per request
  std::vector<std::vector<int64_t>> runs;
  for (const auto& v : rows_of) {
    const int64_t n = v.size(), k = std::min(n, pieces);
    for (int64_t i = 0; i < k; ++i) runs.emplace_back(v.begin() + i * n / k, v.begin() + (i + 1) * n / k);
  }
  const int64_t NR = runs.size();
  // still fewer items than twice the threads (one request's row or a few: 3 KV heads over 2 threads left one
  // thread idle a third of the time): each KV head's query heads are cut into parts, their keys and values read
  // once per part (from cache after the first). Each query head's arithmetic is its own: the bits do not change
#ifndef SPECDEC_ATTN_SPLIT
#define SPECDEC_ATTN_SPLIT 1
#endif
  const int64_t parts = !SPECDEC_ATTN_SPLIT || Hkv * NR >= want ? 1 : std::min<int64_t>(G, (want + Hkv * NR - 1) / (Hkv * NR));
  at::parallel_for(0, Hkv * parts * NR, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qf(G * D), s, acc(G * D), total(G);
    std::vector<int64_t> pos;
    for (int64_t item = begin; item < end; ++item)
    for (const int64_t t : runs[item % NR]) {  // the run's rows in turn: a `continue` below goes to the next row
      const int64_t h = item / NR / parts, part = item / NR % parts, r = rr[t], node = rn[t], L = pl[r];
      // query heads g0 .. g0 + Gp of KV head h (all G of them when parts is 1)
      const int64_t g0 = part * G / parts, Gp = (part + 1) * G / parts - g0;
      const bool* mrow = mk + (r * N + node) * N;
      // a node's depth is its number of ancestors (its mask row's count, less itself); its position is L + depth
      auto depth = [&](int64_t j) {
        const bool* m = mk + (r * N + j) * N;
        int64_t c = 0;
        for (int64_t i = 0; i < N; ++i) c += m[i];
        return c - 1;
      };
      const int64_t qpos = W > 0 ? L + depth(node) : 0;
      const int64_t first = W > 0 ? std::max<int64_t>(0, qpos - W + 1) : 0;  // the window's first prefix position
      pos.clear();  // the physical slots this query sees: its prefix (within the window), block by block (no
      for (int64_t blk = first / BS, p0 = blk * BS; p0 < L; ++blk, p0 += BS) {  // division per position), then
        const int64_t base = tb[r * MB + blk] * BS, lo = std::max<int64_t>(first - p0, 0);  // its tree ancestors
        const int64_t cnt = std::min(BS, L - p0);
        for (int64_t o = lo; o < cnt; ++o) pos.push_back(base + o);
      }
      for (int64_t j = 0; j < N; ++j) {
        if (!mrow[j] || (W > 0 && L + depth(j) <= qpos - W)) continue;
        const int64_t p = L + j;
        pos.push_back(tb[r * MB + p / BS] * BS + p % BS);
      }
      const int64_t P = pos.size();
      for (int64_t g = 0; g < Gp; ++g)
        for (int64_t d = 0; d < D; ++d)
          qf[g * D + d] = static_cast<acc_t>(qp[(t * H + h * G + g0 + g) * D + d]) * sc;
      s.resize(Gp * P);
      const scalar_t* kh = kp + h * NB * BS * D;
      const scalar_t* vh = vp + h * NB * BS * D;
#ifdef SPECDEC_ATTN_FAST
      constexpr bool f32 = std::is_same<scalar_t, float>::value;
      const bool fast = f32 && D % LANES == 0;  // the AVX-512 / AVX2 float32 route (scores_f32 / values_f32)
      if (fast)
        scores_f32(reinterpret_cast<const float*>(qf.data()), Gp, D / LANES, reinterpret_cast<const float*>(kh),
                   pos.data(), P, reinterpret_cast<float*>(s.data()));
      else
#else
      const bool fast = false;
#endif
        for (int64_t j = 0; j < P; ++j) {  // each key read once for the G query heads that share it
          const scalar_t* kr = kh + pos[j] * D;
          for (int64_t g = 0; g < Gp; ++g) s[g * P + j] = dot<acc_t, scalar_t>(qf.data() + g * D, kr, D);
        }
      if (cap > 0)  // logit softcapping (Gemma 2): cap * tanh(score / cap), before the softmax
        for (int64_t j = 0; j < Gp * P; ++j) s[j] = cap * std::tanh(s[j] / cap);
      for (int64_t g = 0; g < Gp; ++g) {
        acc_t* sg = s.data() + g * P;
        acc_t mx = -std::numeric_limits<acc_t>::infinity();
        for (int64_t j = 0; j < P; ++j) mx = std::max(mx, sg[j]);
        for (int64_t j = 0; j < P; ++j) sg[j] -= mx;
        exp_inplace<acc_t>(sg, P);
        acc_t sum = 0;
        for (int64_t j = 0; j < P; ++j) sum += sg[j];
        total[g] = sum;
      }
#ifdef SPECDEC_ATTN_FAST
      if (fast) {
        values_f32(reinterpret_cast<const float*>(s.data()), reinterpret_cast<const float*>(total.data()), Gp, D / LANES,
                   reinterpret_cast<const float*>(vh), pos.data(), P,
                   reinterpret_cast<float*>(op + (t * H + h * G + g0) * D));
        continue;
      }
#endif
      (void)fast;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j = 0; j < P; ++j) {
        const scalar_t* vr = vh + pos[j] * D;
        for (int64_t g = 0; g < Gp; ++g) {
          const acc_t w = s[g * P + j];
          acc_t* a = acc.data() + g * D;
          for (int64_t d = 0; d < D; ++d) a[d] += w * static_cast<acc_t>(vr[d]);
        }
      }
      for (int64_t g = 0; g < Gp; ++g) {
        const acc_t inv = total[g] > 0 ? acc_t(1) / total[g] : acc_t(0);
        scalar_t* o = op + (t * H + h * G + g0 + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[g * D + d] * inv);
      }
    }
  });
}

inline torch::Tensor paged_tree_attention(torch::Tensor q, torch::Tensor k_store, torch::Tensor v_store,
                                          torch::Tensor row_req, torch::Tensor row_node, torch::Tensor tables,
                                          torch::Tensor prefix, torch::Tensor mask, double scale, int64_t window,
                                          double softcap) {
  TORCH_CHECK(q.dim() == 3 && k_store.dim() == 4 && mask.dim() == 3, "bad ranks");
  TORCH_CHECK(q.is_contiguous() && k_store.is_contiguous() && v_store.is_contiguous(), "inputs must be contiguous");
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, q.scalar_type(), "paged_tree_attention", [&] {
    run<scalar_t>(q, k_store, v_store, row_req.contiguous(), row_node.contiguous(), tables.contiguous(),
                  prefix.contiguous(), mask.contiguous(), scale, window, softcap, out);
  });
  return out;
}

// k_new, v_new [H_kv, T, D] (rows of D contiguous, any other strides) into rows slots[t] of kf, vf
// [H_kv, slots, D] (contiguous, the same dtype), as index_copy_ along dim 1 does: a plain copy per row, without
// index_copy_'s TensorIterator set-up (about 4 us a call, two calls a layer). False where the layouts differ from
// these (index_copy_ does it then)
inline bool write_slots(const torch::Tensor& k_new, const torch::Tensor& v_new, const torch::Tensor& slots,
                        torch::Tensor& kf, torch::Tensor& vf) {
  const int64_t Hkv = kf.size(0), S = kf.size(1), D = kf.size(2), T = slots.numel();
  const auto dt = kf.scalar_type();
  if (vf.scalar_type() != dt || k_new.scalar_type() != dt || v_new.scalar_type() != dt ||
      slots.scalar_type() != at::kLong || !slots.is_contiguous() || !kf.is_contiguous() || !vf.is_contiguous() ||
      k_new.sizes() != v_new.sizes() || k_new.size(0) != Hkv || k_new.size(1) != T || k_new.size(2) != D ||
      k_new.stride(2) != 1 || v_new.stride(2) != 1)
    return false;
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(sl[t] >= 0 && sl[t] < S, "slot ", sl[t], " is outside the pool");
  const int64_t es = kf.element_size(), row = D * es;
  const char* kp = static_cast<const char*>(k_new.data_ptr());
  const char* vp = static_cast<const char*>(v_new.data_ptr());
  char* kd = static_cast<char*>(kf.data_ptr());
  char* vd = static_cast<char*>(vf.data_ptr());
  for (int64_t h = 0; h < Hkv; ++h)
    for (int64_t t = 0; t < T; ++t) {
      std::memcpy(kd + (h * S + sl[t]) * row, kp + (h * k_new.stride(0) + t * k_new.stride(1)) * es, row);
      std::memcpy(vd + (h * S + sl[t]) * row, vp + (h * v_new.stride(0) + t * v_new.stride(1)) * es, row);
    }
  return true;
}

// One layer's step: the new tokens' K/V (k_new, v_new: [H_kv, T, D], any strides, the pools' dtype) go to their
// physical slots, then every row attends (q: [H, T, D], any strides). Returns [T, H, D].
inline torch::Tensor paged_attention_step(torch::Tensor q, torch::Tensor k_new, torch::Tensor v_new,
                                          torch::Tensor slots, torch::Tensor k_store, torch::Tensor v_store,
                                          torch::Tensor row_req, torch::Tensor row_node, torch::Tensor tables,
                                          torch::Tensor prefix, torch::Tensor mask, double scale, int64_t window,
                                          double softcap) {
  TORCH_CHECK(k_new.dim() == 3 && k_store.dim() == 4 && k_new.scalar_type() == k_store.scalar_type() &&
                  v_new.scalar_type() == v_store.scalar_type(),
              "new K/V must be [H_kv, T, D] in the pools' dtype");
  const int64_t Hkv = k_store.size(0), slots_per_head = k_store.size(1) * k_store.size(2), D = k_store.size(3);
  // [H_kv, num_blocks * block_size, D] views of the storage; slot s of head h is row s
  auto kf = k_store.view({Hkv, slots_per_head, D}), vf = v_store.view({Hkv, slots_per_head, D});
  if (!write_slots(k_new, v_new, slots, kf, vf)) {
    kf.index_copy_(1, slots, k_new);
    vf.index_copy_(1, slots, v_new);
  }
  return paged_tree_attention(q.transpose(0, 1).contiguous(), k_store, v_store, row_req, row_node, tables, prefix, mask,
                              scale, window, softcap);
}
