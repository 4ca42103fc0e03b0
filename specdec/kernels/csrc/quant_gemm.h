// Linear layers on quantized panels (see specdec/kernels/quant_gemm.py): quant_linear(x, q, d, m, bias, N).
//
// Weights W [N, K] in groups of G = 32 input features per output feature, as GGUF's Q8_0 (int8 q, scale d:
// w = d q) and Q4_1 (4-bit q in 0..15, scale d and min m: w = d q + m); d and m are float16. The activations are
// quantized per row and group as llama.cpp does for these types (Q8: dx = max|x| / 127, xq = round-to-even(x / dx)
// in -127..127), so a group's dot product is integer arithmetic, exact:
//
//   y[r, j] = sum over groups g of  d[g, j] * (S[g, r, j] * dx[r, g])  (+ m[g, j] * X[r, g])  (+ bias[j]),
//   S[g, r, j] = sum over k in g of q[k, j] xq[r, k] (int32),  X[r, g] = dx[r, g] * sum over k in g of xq[r, k],
//
// the float sums over groups in group order (fused multiply-adds): a row's result is bitwise the same whatever the
// number of rows, so speculation over a quantized target keeps its greedy output. Panels of 32 output features,
// packed per group and per quad of 4 input features (one int32 lane of AVX2 holds one output's 4 products):
// q int8 [T, K/32, 8 (quad), 32 (j), 4 (k)], or uint8 [T, K/32, 8 (quad), 2 (half), 8 (j), 4 (k)] for 4 bits (byte
// (i, k) of half h holds output 16 h + i in its low nibble and 16 h + 8 + i in its high one); d, m float16
// [T, K/32, 32 (j)]. With AVX2 a quad of 8 outputs is one vpmaddubsw (unsigned x signed bytes to int16 pairs) and,
// for 8 bits, one vpmaddwd to int32: the weights stream from memory at 1 byte (int8) or 5/8 byte (int4) a weight
// and extra rows cost a fraction of float32's fused multiply-adds. With AVX-512 VNNI one vpdpbusd (unsigned x signed
// bytes, four products summed into an int32 lane, no saturation) does a quad of 16 outputs for a row: int4's nibbles
// are unsigned already, int8's weights are flipped to w + 128 (unsigned) and 128 times the group's sum of xq is taken
// off. Every path's integer sums are exact and its float steps the portable loop's, so every path gives the same bits
// (quant_linear_portable runs that loop, for the tests).
#pragma once
#include <torch/types.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include "bf16_gemm.h"
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <cpuid.h>
#include <immintrin.h>
#define SPECDEC_QUANT_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define SPECDEC_QUANT_VNNI 1
#endif
#endif

namespace quant {

constexpr int64_t P = 32;   // output features per panel
constexpr int64_t G = 32;   // input features per group
constexpr int64_t RB = 8;   // the most rows per block (their sums in registers together): rows_block<BITS>

template <int BITS>
constexpr int64_t rows_block() {  // AVX2: 4 for int8 (both halves' 16 sums per row), 8 for int4 (one column's);
#ifdef SPECDEC_QUANT_VNNI          // VNNI: 8 (two zmm sums a row: 16 of the 32 registers)
  return 8;
#else
  return BITS == 8 ? 4 : 8;
#endif
}

template <int BITS>
constexpr int64_t group_bytes() {  // bytes of one group of a panel
  return BITS == 8 ? G * P : G * P / 2;
}

// rows x [M, K] quantized per group of 32: xq int8 [M, K], dx [M, K/32] (the scale), xs [M, K/32] (dx times the
// sum of the group's xq: the sum of the quantized activations, for Q4_1's mins), xi [M, K/32] (that sum, int32)
inline void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* xq, float* dx, float* xs, int32_t* xi) {
  const int64_t groups = K / G;
  at::parallel_for(0, M * groups, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const float* xg = x + i * G;  // row i / groups, group i % groups: rows are contiguous, so i * G
      float amax = 0.f;
      for (int64_t k = 0; k < G; ++k) amax = std::max(amax, std::fabs(xg[k]));
      const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
      int32_t sum = 0;
      for (int64_t k = 0; k < G; ++k) {
        const float v = std::nearbyint(xg[k] * id);
        const int32_t qv = static_cast<int32_t>(std::min(127.f, std::max(-127.f, v)));
        xq[i * G + k] = static_cast<int8_t>(qv);
        sum += qv;
      }
      dx[i] = d;
      xs[i] = d * static_cast<float>(sum);
      xi[i] = sum;
    }
  });
}

// the integer dot products S[j] of one group for output j of a panel (portable path and reference)
template <int BITS>
static inline int32_t weight_at(const uint8_t* qg, int64_t k, int64_t j) {
  const int64_t quad = k / 4, kk = k % 4;
  if constexpr (BITS == 8) return static_cast<int8_t>(qg[quad * 128 + j * 4 + kk]);
  const int64_t half = j / 16, nib = (j % 16) / 8, i = j % 8;
  const uint8_t b = qg[quad * 64 + half * 32 + i * 4 + kk];
  return nib ? (b >> 4) : (b & 0x0F);
}

#ifdef SPECDEC_QUANT_AVX2
// int8: R rows (xq rows at stride K; dx at stride `groups`) against one panel's groups into acc [R][32]: per half
// panel (16 outputs) and group, the rows' int32 sums stay in registers (sixteen outputs' sums a broadcast of x
// serves: measured faster for int8 than one column at a time, whose extra broadcasts cost more than the spills)
template <int R>
static inline void rows_int8(const int8_t* xq, int64_t K, const float* dx, int64_t groups, const uint8_t* q,
                             const at::Half* d, float* acc) {
  constexpr int64_t GB = group_bytes<8>();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* qg = q + g * GB;
    for (int half = 0; half < 2; ++half) {
      __m256i s[R][2];
      for (int r = 0; r < R; ++r) s[r][0] = s[r][1] = _mm256_setzero_si256();
      // one quad at a time, its rows unrolled: the sums stay in registers (unrolling the quads instead spills them)
#pragma GCC unroll 1
      for (int quad = 0; quad < 8; ++quad) {
        if (half == 0)  // the next group, an eighth (its cache lines) per quad: one sequential stream per panel
          for (int64_t line = quad * GB / 8; line < (quad + 1) * GB / 8; line += 64)
            _mm_prefetch(reinterpret_cast<const char*>(qg + GB + line), _MM_HINT_T0);
        const uint8_t* qq = qg + quad * 128 + half * 64;
        const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qq));
        const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qq + 32));
        // |w| as unsigned bytes (128 for -128), the sign moved onto x: |w| (x sign(w)) = w x
        const __m256i a0 = _mm256_abs_epi8(w0), a1 = _mm256_abs_epi8(w1);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          int32_t x4;
          std::memcpy(&x4, xq + r * K + g * G + quad * 4, 4);
          const __m256i xb = _mm256_set1_epi32(x4);
          s[r][0] = _mm256_add_epi32(s[r][0],
                                     _mm256_madd_epi16(_mm256_maddubs_epi16(a0, _mm256_sign_epi8(xb, w0)), ones));
          s[r][1] = _mm256_add_epi32(s[r][1],
                                     _mm256_madd_epi16(_mm256_maddubs_epi16(a1, _mm256_sign_epi8(xb, w1)), ones));
        }
      }
      for (int v = 0; v < 2; ++v) {
        const int64_t j0 = half * 16 + 8 * v;
        const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + g * P + j0)));
        for (int r = 0; r < R; ++r) {
          const __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(s[r][v]), _mm256_set1_ps(dx[r * groups + g]));
          _mm256_storeu_ps(acc + r * P + j0, _mm256_fmadd_ps(dv, t, _mm256_loadu_ps(acc + r * P + j0)));
        }
      }
    }
  }
}

// int4: R rows (xq rows at stride K; dx, xs at stride `groups`) against one panel's groups into acc [R][32]: per
// group, one column of 8 outputs at a time, its R rows' int16 sums in registers (R accumulators, the column's weights
// and one broadcast, no spills up to R = 8: 1.5x the rate of both halves' sums at once at 16 rows and more). Each
// output's float sums go group by group as in the portable loop, so the column order changes no bit
template <int R>
static inline void rows_int4(const int8_t* xq, int64_t K, const float* dx, const float* xs, int64_t groups,
                             const uint8_t* q, const at::Half* d, const at::Half* m, float* acc) {
  constexpr int64_t GB = group_bytes<4>();
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* qg = q + g * GB;
    for (int64_t line = 0; line < GB; line += 64)  // the next group: one sequential stream per panel
      _mm_prefetch(reinterpret_cast<const char*>(qg + GB + line), _MM_HINT_T0);
    const int8_t* xg = xq + g * G;
    for (int c = 0; c < 4; ++c) {  // outputs 8c .. 8c + 7
      __m256i s[R];
      for (int r = 0; r < R; ++r) s[r] = _mm256_setzero_si256();
#pragma GCC unroll 8
      for (int quad = 0; quad < 8; ++quad) {
        // byte (i, k) of half c / 2: output 16 h + i in its low nibble, 16 h + 8 + i in its high one
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qg + quad * 64 + (c / 2) * 32));
        const __m256i w = (c % 2) ? _mm256_and_si256(_mm256_srli_epi16(b, 4), low) : _mm256_and_si256(b, low);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          int32_t x4;
          std::memcpy(&x4, xg + r * K + quad * 4, 4);
          // int16 pairs of at most 2 * 15 * 127: eight quads' sums fit an int16 lane
          s[r] = _mm256_add_epi16(s[r], _mm256_maddubs_epi16(w, _mm256_set1_epi32(x4)));
        }
      }
      const int64_t j0 = 8 * c;
      const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + g * P + j0)));
      const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m + g * P + j0)));
      for (int r = 0; r < R; ++r) {
        const __m256i si = _mm256_madd_epi16(s[r], ones);  // int16 pairs to int32
        const __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(si), _mm256_set1_ps(dx[r * groups + g]));
        __m256 a = _mm256_fmadd_ps(dv, t, _mm256_loadu_ps(acc + r * P + j0));
        a = _mm256_fmadd_ps(mv, _mm256_set1_ps(xs[r * groups + g]), a);
        _mm256_storeu_ps(acc + r * P + j0, a);
      }
    }
  }
}

#ifdef SPECDEC_QUANT_VNNI
// int8 at one or two rows (a decode step, a 2-node tree): the AVX2 loop or the VNNI one, the same bits. Which streams
// faster depends on the core: on AMD Zen 4 (family 19h), whose 512-bit instructions run as two 256-bit halves, the
// AVX2 loop was 5% faster; on an Intel Xeon with AVX-512 VNNI the VNNI loop made a one-node int8 verify step of the
// default target 15% faster (13.4 -> 11.3 ms, docs/quantization.md). So: the AVX2 loop on AMD family 19h, VNNI elsewhere;
// SPECDEC_INT8_SMALL_ROWS=avx2|vnni overrides, and set_int8_small_rows changes it at run time (the tests, to cover
// both on one CPU)
inline bool amd_family_19h() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
  char vendor[13] = {0};
  std::memcpy(vendor, &b, 4);
  std::memcpy(vendor + 4, &d, 4);
  std::memcpy(vendor + 8, &c, 4);
  if (std::string(vendor) != "AuthenticAMD" || !__get_cpuid(1, &a, &b, &c, &d)) return false;
  const unsigned base = (a >> 8) & 0xF, ext = (a >> 20) & 0xFF;
  return (base == 0xF ? base + ext : base) == 0x19;
}
#endif

constexpr int64_t INT8_AVX2_ROWS = 2;  // the rows the AVX2 loop takes where it is chosen

// the rows up to which int8 takes the AVX2 loop for a loop's name ("avx2" or "vnni"; anything else is refused)
inline int64_t avx2_rows_for(const std::string& loop) {
  TORCH_CHECK(loop == "avx2" || loop == "vnni",
              "the int8 small-rows loop (SPECDEC_INT8_SMALL_ROWS) is 'avx2' or 'vnni', not '", loop, "'");
  return loop == "avx2" ? INT8_AVX2_ROWS : 0;
}

#ifdef SPECDEC_QUANT_VNNI
inline int64_t& int8_avx2_rows() {  // rows up to which int8 takes the AVX2 loop (0: never)
  static int64_t rows = [] {
    const char* env = std::getenv("SPECDEC_INT8_SMALL_ROWS");
    return env && *env ? avx2_rows_for(env) : amd_family_19h() ? INT8_AVX2_ROWS : 0;
  }();
  return rows;
}
#endif

// the loop int8 takes at one or two rows: "avx2" or "vnni" on a VNNI build ("" elsewhere: there is one loop)
inline std::string int8_small_rows() {
#ifdef SPECDEC_QUANT_VNNI
  return int8_avx2_rows() > 0 ? "avx2" : "vnni";
#else
  return "";
#endif
}

inline void set_int8_small_rows(const std::string& loop) {
  const int64_t rows = avx2_rows_for(loop);
#ifdef SPECDEC_QUANT_VNNI
  int8_avx2_rows() = rows;
#else
  (void)rows;
#endif
}

#ifdef SPECDEC_QUANT_VNNI
#ifndef SPECDEC_QPF
#define SPECDEC_QPF 8  // groups ahead: 8 measured 3-7% faster than 1 at 1-2 rows with the weights streamed from memory
#endif
// one quad of R rows (x: the first row's 4 bytes of xq, rows K apart): each row's bytes broadcast, times the unsigned
// bytes of a into s[r][0] and of b into s[r][1] (vpdpbusd: four products summed into each int32 lane)
template <int R>
static inline void dpbusd_rows(__m512i (&s)[R][2], __m512i a, __m512i b, const int8_t* x, int64_t K) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    int32_t x4;
    std::memcpy(&x4, x + r * K, 4);
    const __m512i xb = _mm512_set1_epi32(x4);
    s[r][0] = _mm512_dpbusd_epi32(s[r][0], a, xb);
    s[r][1] = _mm512_dpbusd_epi32(s[r][1], b, xb);
  }
}

// swaps outputs 8-15 and 16-23 of R rows of 32 (src -> dst): the output order to int4's lane order and back
template <int R>
static inline void swap_middle(const float* src, float* dst) {
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 8; ++i) {
      dst[r * P + i] = src[r * P + i];
      dst[r * P + 8 + i] = src[r * P + 16 + i];
      dst[r * P + 16 + i] = src[r * P + 8 + i];
      dst[r * P + 24 + i] = src[r * P + 24 + i];
    }
}

// int8 with VNNI: R rows against one panel's groups into acc [R][32]. A quad of 16 outputs is 64 bytes of the panel,
// one zmm: flipped to w + 128 (unsigned), one vpdpbusd per row sums (w + 128) x over the quad's 4 features into each
// output's int32 lane; 128 times the group's sum of xq (xi) comes off at the group's end, leaving S exactly
template <int R>
static inline void rows_int8_vnni(const int8_t* xq, int64_t K, const float* dx, const int32_t* xi, int64_t groups,
                                  const uint8_t* q, const at::Half* d, float* acc) {
  constexpr int64_t GB = group_bytes<8>();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* qg = q + g * GB;
    __m512i s[R][2];
    for (int r = 0; r < R; ++r) s[r][0] = s[r][1] = _mm512_setzero_si512();
#pragma GCC unroll 2
    for (int quad = 0; quad < 8; ++quad) {
      // the next group, an eighth (two cache lines) per quad: one sequential stream per panel
      _mm_prefetch(reinterpret_cast<const char*>(qg + SPECDEC_QPF * GB + quad * 128), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(qg + SPECDEC_QPF * GB + quad * 128 + 64), _MM_HINT_T0);
      const __m512i u0 = _mm512_xor_si512(_mm512_loadu_si512(qg + quad * 128), flip);
      const __m512i u1 = _mm512_xor_si512(_mm512_loadu_si512(qg + quad * 128 + 64), flip);
      dpbusd_rows<R>(s, u0, u1, xq + g * G + quad * 4, K);
    }
    const __m512 d0 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + g * P)));
    const __m512 d1 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + g * P + 16)));
    for (int r = 0; r < R; ++r) {
      const __m512i off = _mm512_set1_epi32(128 * xi[r * groups + g]);
      const __m512 x = _mm512_set1_ps(dx[r * groups + g]);
      const __m512 t0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(s[r][0], off)), x);
      const __m512 t1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(s[r][1], off)), x);
      _mm512_storeu_ps(acc + r * P, _mm512_fmadd_ps(d0, t0, _mm512_loadu_ps(acc + r * P)));
      _mm512_storeu_ps(acc + r * P + 16, _mm512_fmadd_ps(d1, t1, _mm512_loadu_ps(acc + r * P + 16)));
    }
  }
}

// int4 with VNNI: R rows against one panel's groups into acc [R][32]. A quad's 64 bytes, one zmm, hold all 32
// outputs' nibbles: the low nibbles are outputs 0-7 and 16-23 (lanes 0-7, 8-15), the high ones 8-15 and 24-31; one
// vpdpbusd per row and nibble. The float sums run in that lane order (perm: lane -> output) and are put back at the end
template <int R>
static inline void rows_int4_vnni(const int8_t* xq, int64_t K, const float* dx, const float* xs, int64_t groups,
                                  const uint8_t* q, const at::Half* d, const at::Half* m, float* acc) {
  constexpr int64_t GB = group_bytes<4>();
  const __m512i low = _mm512_set1_epi8(0x0F);
  // lane order: [0-7, 16-23] then [8-15, 24-31], as float16 loads of d and m (two 8-output halves per vector)
  const auto halves = [](const at::Half* v, int64_t a, int64_t b) {
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v + a));
    const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v + b));
    return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1));
  };
  float pacc[RB * P];  // acc in lane order
  swap_middle<R>(acc, pacc);
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* qg = q + g * GB;
    __m512i s[R][2];
    for (int r = 0; r < R; ++r) s[r][0] = s[r][1] = _mm512_setzero_si512();
#pragma GCC unroll 2
    for (int quad = 0; quad < 8; ++quad) {
      _mm_prefetch(reinterpret_cast<const char*>(qg + SPECDEC_QPF * GB + quad * 64), _MM_HINT_T0);  // the next group's
      const __m512i b = _mm512_loadu_si512(qg + quad * 64);
      const __m512i lo = _mm512_and_si512(b, low);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
      dpbusd_rows<R>(s, lo, hi, xq + g * G + quad * 4, K);
    }
    const at::Half* dg = d + g * P;
    const at::Half* mg = m + g * P;
    const __m512 d0 = halves(dg, 0, 16), d1 = halves(dg, 8, 24);
    const __m512 m0 = halves(mg, 0, 16), m1 = halves(mg, 8, 24);
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(dx[r * groups + g]), sx = _mm512_set1_ps(xs[r * groups + g]);
      const __m512 t0 = _mm512_mul_ps(_mm512_cvtepi32_ps(s[r][0]), x);
      const __m512 t1 = _mm512_mul_ps(_mm512_cvtepi32_ps(s[r][1]), x);
      __m512 a0 = _mm512_fmadd_ps(d0, t0, _mm512_loadu_ps(pacc + r * P));
      __m512 a1 = _mm512_fmadd_ps(d1, t1, _mm512_loadu_ps(pacc + r * P + 16));
      _mm512_storeu_ps(pacc + r * P, _mm512_fmadd_ps(m0, sx, a0));
      _mm512_storeu_ps(pacc + r * P + 16, _mm512_fmadd_ps(m1, sx, a1));
    }
  }
  swap_middle<R>(pacc, acc);
}
#endif
#endif

// the portable loop: R rows against one panel's groups into acc [R][32], the sums one at a time in the SIMD paths'
// order (the reference every path equals bitwise)
template <int BITS>
static inline void rows_portable(int R, const int8_t* xq, int64_t K, const float* dx, const float* xs,
                                 int64_t groups, const uint8_t* q, const at::Half* d, const at::Half* m, float* acc) {
  constexpr int64_t GB = group_bytes<BITS>();
  for (int r = 0; r < R; ++r)
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t j = 0; j < P; ++j) {
        int32_t s = 0;
        for (int64_t k = 0; k < G; ++k) s += weight_at<BITS>(q + g * GB, k, j) * xq[r * K + g * G + k];
        const float t = static_cast<float>(s) * dx[r * groups + g];
        float a = std::fma(static_cast<float>(d[g * P + j]), t, acc[r * P + j]);
        if constexpr (BITS == 4) a = std::fma(static_cast<float>(m[g * P + j]), xs[r * groups + g], a);
        acc[r * P + j] = a;
      }
}

// R rows (at most rows_block<BITS>()) against one panel on this CPU's fastest path into acc [R][32]
template <int BITS>
static inline void rows_simd(int R, const int8_t* xq, int64_t K, const float* dx, const float* xs, const int32_t* xi,
                             int64_t groups, const uint8_t* q, const at::Half* d, const at::Half* m, float* acc) {
#if defined(SPECDEC_QUANT_VNNI)
  if constexpr (BITS == 8)
    if (R <= int8_avx2_rows()) {  // on some cores the AVX2 loop streams a row or two faster (int8_avx2_rows)
      if (R == 2) rows_int8<2>(xq, K, dx, groups, q, d, acc);
      else rows_int8<1>(xq, K, dx, groups, q, d, acc);
      return;
    }
#define SPECDEC_ROWS(n)                                                        \
  case n:                                                                      \
    if constexpr (BITS == 8) rows_int8_vnni<n>(xq, K, dx, xi, groups, q, d, acc); \
    else rows_int4_vnni<n>(xq, K, dx, xs, groups, q, d, m, acc);               \
    break;
  switch (R) {
    SPECDEC_ROWS(8) SPECDEC_ROWS(7) SPECDEC_ROWS(6) SPECDEC_ROWS(5)
    SPECDEC_ROWS(4) SPECDEC_ROWS(3) SPECDEC_ROWS(2) default: SPECDEC_ROWS(1)
  }
#undef SPECDEC_ROWS
#elif defined(SPECDEC_QUANT_AVX2)
  (void)xi;
  if constexpr (BITS == 8) {
    switch (R) {
      case 4: rows_int8<4>(xq, K, dx, groups, q, d, acc); break;
      case 3: rows_int8<3>(xq, K, dx, groups, q, d, acc); break;
      case 2: rows_int8<2>(xq, K, dx, groups, q, d, acc); break;
      default: rows_int8<1>(xq, K, dx, groups, q, d, acc); break;
    }
  } else {
    switch (R) {
      case 8: rows_int4<8>(xq, K, dx, xs, groups, q, d, m, acc); break;
      case 7: rows_int4<7>(xq, K, dx, xs, groups, q, d, m, acc); break;
      case 6: rows_int4<6>(xq, K, dx, xs, groups, q, d, m, acc); break;
      case 5: rows_int4<5>(xq, K, dx, xs, groups, q, d, m, acc); break;
      case 4: rows_int4<4>(xq, K, dx, xs, groups, q, d, m, acc); break;
      case 3: rows_int4<3>(xq, K, dx, xs, groups, q, d, m, acc); break;
      case 2: rows_int4<2>(xq, K, dx, xs, groups, q, d, m, acc); break;
      default: rows_int4<1>(xq, K, dx, xs, groups, q, d, m, acc); break;
    }
  }
#else
  (void)xi;
  rows_portable<BITS>(R, xq, K, dx, xs, groups, q, d, m, acc);
#endif
}

// R rows of one block against one panel: acc [R][32], then y (PORTABLE: the portable loop whatever the CPU)
template <int BITS, bool PORTABLE>
static inline void panel(int R, const int8_t* xq, int64_t K, const float* dx, const float* xs, const int32_t* xi,
                         int64_t groups, const uint8_t* q, const at::Half* d, const at::Half* m, const float* bias,
                         float* y, int64_t ldy, int64_t valid) {
  float acc[RB * P] = {0.f};
  if constexpr (PORTABLE)
    rows_portable<BITS>(R, xq, K, dx, xs, groups, q, d, m, acc);
  else
    rows_simd<BITS>(R, xq, K, dx, xs, xi, groups, q, d, m, acc);
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < valid; ++j) y[r * ldy + j] = bias ? acc[r * P + j] + bias[j] : acc[r * P + j];
}

// x [M, K] float32 contiguous; q int8 [T, K/32, 8, 128] or uint8 [T, K/32, 8, 64]; d (and m for 4 bits) float16
// [T, K/32, 32]; bias float32 [N] or None; returns [M, N] float32. bits = 16: q bfloat16 [T, K/2, 32, 2], d and m
// unused (bf16_gemm.h). PORTABLE: the portable loop (the tests' reference), else this CPU's fastest path
template <bool PORTABLE>
inline torch::Tensor quant_linear_on(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& d,
                                     const c10::optional<torch::Tensor>& m, const c10::optional<torch::Tensor>& bias,
                                     int64_t N, int64_t bits) {
  if (bits == 16) return bf16w::bf16_linear<PORTABLE>(x, q, bias, N);  // bfloat16 weights, float32 activations
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8, 4 or 16");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be a contiguous float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), T = q.size(0), groups = K / G;
  TORCH_CHECK(K % G == 0, "the input size must be a multiple of 32");
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous() && q.size(1) == groups && q.size(2) == 8 &&
                  q.size(3) == (bits == 8 ? 128 : 64) && (q.scalar_type() == at::kChar || q.scalar_type() == at::kByte),
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
  auto xq = torch::empty({M * K}, x.options().dtype(at::kChar));
  auto scales = torch::empty({2, M * groups}, x.options());
  auto sums = torch::empty({M * groups}, x.options().dtype(at::kInt));
  int8_t* xqp = xq.data_ptr<int8_t>();
  float* dxp = scales.data_ptr<float>();
  float* xsp = dxp + M * groups;
  int32_t* xip = sums.data_ptr<int32_t>();
  quantize_rows(x.data_ptr<float>(), M, K, xqp, dxp, xsp, xip);
  const uint8_t* qp = reinterpret_cast<const uint8_t*>(q.data_ptr());
  const at::Half* dp = d.data_ptr<at::Half>();
  const at::Half* mp = m.has_value() ? m->data_ptr<at::Half>() : nullptr;
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t panel_bytes = groups * (bits == 8 ? group_bytes<8>() : group_bytes<4>());
  const int64_t rb = PORTABLE ? RB : bits == 8 ? rows_block<8>() : rows_block<4>();
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t b = 0; b < M; b += rb) {
        const int R = static_cast<int>(std::min(rb, M - b));
        const int64_t valid = std::min(P, N - t * P);
        const at::Half* dt = dp + t * groups * P;
        const at::Half* mt = mp ? mp + t * groups * P : nullptr;
        const float* bt = bp ? bp + t * P : nullptr;
        if (bits == 8)
          panel<8, PORTABLE>(R, xqp + b * K, K, dxp + b * groups, xsp + b * groups, xip + b * groups, groups,
                             qp + t * panel_bytes, dt, mt, bt, yp + b * N + t * P, N, valid);
        else
          panel<4, PORTABLE>(R, xqp + b * K, K, dxp + b * groups, xsp + b * groups, xip + b * groups, groups,
                             qp + t * panel_bytes, dt, mt, bt, yp + b * N + t * P, N, valid);
      }
  });
  return y;
}

inline torch::Tensor quant_linear(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& d,
                                  const c10::optional<torch::Tensor>& m, const c10::optional<torch::Tensor>& bias,
                                  int64_t N, int64_t bits) {
  return quant_linear_on<false>(x, q, d, m, bias, N, bits);
}

// the same product on the portable loop, whatever the CPU: the tests' bitwise reference for the SIMD paths
inline torch::Tensor quant_linear_portable(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& d,
                                           const c10::optional<torch::Tensor>& m,
                                           const c10::optional<torch::Tensor>& bias, int64_t N, int64_t bits) {
  return quant_linear_on<true>(x, q, d, m, bias, N, bits);
}

// which path quant_linear takes on this build: "avx512-vnni", "avx2" or "portable"
inline std::string isa() {
#if defined(SPECDEC_QUANT_VNNI)
  return "avx512-vnni";
#elif defined(SPECDEC_QUANT_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}

// one quantized linear as the layer kernels take it (decoder_layer.h): panels q, scales d, mins m (4 bits), bias,
// N outputs, bits; x [M, K] -> [M, N]
struct Linear {
  torch::Tensor q, d;
  c10::optional<torch::Tensor> m, bias;
  int64_t n, bits;
  torch::Tensor operator()(const torch::Tensor& x) const { return quant_linear(x, q, d, m, bias, n, bits); }
};

}  // namespace quant
