// A Llama-style decoder layer around its attention: pre_attention (RMSNorm, q/k/v product, rotary embedding) and
// post_attention (o_proj, residual, RMSNorm, gated MLP, residual), float32 (specdec/kernels/cpu_decoder_layer.py).
#pragma once

#include "layers.h"
#include "panel_gemm.h"

// one head x [D] rotated in place with cos, sin [D]: products and sum rounded one by one (no fused multiply-add), as
// transformers' ops round them. Its own function, never inlined: an `optimize` attribute does not reach a lambda's
// body, and GCC contracts by default, so the lambda below compiled once inlined (one work chunk) and once through
// the thread pool would round differently with the number of rows
__attribute__((optimize("fp-contract=off"), noinline)) static void rope_head(float* x, const float* c, const float* s,
                                                                             int64_t half) {
  for (int64_t d = 0; d < half; ++d) {
    const float lo = x[d], hi = x[d + half];
    x[d] = lo * c[d] + (-hi) * s[d];
    x[d + half] = hi * c[d + half] + lo * s[d + half];
  }
}

// q and k heads (the first `heads` of each row of qkv [M, N]) rotated in place: x * cos + rotate_half(x) * sin, with
// cos, sin [M, D]
static void rope_inplace(torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin, int64_t heads,
                         int64_t D) {
  const int64_t M = qkv.size(0), N = qkv.size(1), half = D / 2;
  float* xp = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::parallel_for(0, M * heads, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t m = i / heads, h = i % heads;
      rope_head(xp + m * N + h * D, cp + m * D, sp + m * D, half);
    }
  });
}

// h [M, H] -> qkv [M, N_qkv]: RMSNorm, the q/k/v product (`qkv_linear`: x [M, H] -> [M, n]), rotary embedding of
// the first `rope_heads` heads of size D in place
template <class Linear>
inline torch::Tensor pre_attention_with(const torch::Tensor& h, const torch::Tensor& norm_w, double eps,
                                        const Linear& qkv_linear, int64_t n, const torch::Tensor& cos,
                                        const torch::Tensor& sin, int64_t rope_heads, int64_t D) {
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == h.size(0) && cos.size(1) == D && cos.is_contiguous() &&
                  sin.sizes() == cos.sizes() && sin.is_contiguous() && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat,
              "cos and sin must be contiguous float32 [M, D]");
  TORCH_CHECK(D % 2 == 0 && rope_heads * D <= n, "bad head layout");
  auto qkv = qkv_linear(rms_norm(h, norm_w, eps));
  rope_inplace(qkv, cos, sin, rope_heads, D);
  return qkv;
}

static void add_into(torch::Tensor& y, const torch::Tensor& x) {  // y += x, both contiguous float32 of one size
  float* yp = y.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const int64_t n = y.numel();
  for (int64_t i = 0; i < n; ++i) yp[i] = xp[i] + yp[i];
}

// h [M, H], attn [M, H_q * D] -> the layer's output [M, H]: h + o(attn), then that + down(silu(gate) * up) of its
// RMSNorm; o, gate_up and down map x [M, K] to [M, N]
template <class O, class GU, class Down>
inline torch::Tensor post_attention_with(const torch::Tensor& h, const torch::Tensor& attn, const O& o, int64_t n_o,
                                         const torch::Tensor& norm_w, double eps, const GU& gate_up, const Down& down,
                                         int64_t n_d) {
  TORCH_CHECK(
      h.is_contiguous() && h.scalar_type() == at::kFloat && h.dim() == 2 && n_o == h.size(1) && n_d == h.size(1),
      "h must be contiguous float32 [M, H], and o_proj and down_proj give H features");
  auto mid = o(attn);
  add_into(mid, h);  // residual + attention output
  auto out = down(silu_mul(gate_up(rms_norm(mid, norm_w, eps))));
  add_into(out, mid);  // residual + MLP output
  return out;
}

// the float32 packed panels' versions (specdec/kernels/skinny_gemm.py)
inline auto panels_of(const torch::Tensor& panels, const c10::optional<torch::Tensor>& bias, int64_t n) {
  return [&panels, &bias, n](const torch::Tensor& x) { return panel_linear(x, panels, bias, n); };
}

inline torch::Tensor pre_attention(const torch::Tensor& h, const torch::Tensor& norm_w, double eps,
                                   const torch::Tensor& panels, const c10::optional<torch::Tensor>& bias, int64_t n,
                                   const torch::Tensor& cos, const torch::Tensor& sin, int64_t rope_heads, int64_t D) {
  return pre_attention_with(h, norm_w, eps, panels_of(panels, bias, n), n, cos, sin, rope_heads, D);
}

inline torch::Tensor post_attention(const torch::Tensor& h, const torch::Tensor& attn, const torch::Tensor& o_panels,
                                    const c10::optional<torch::Tensor>& o_bias, int64_t n_o,
                                    const torch::Tensor& norm_w, double eps, const torch::Tensor& gu_panels,
                                    const c10::optional<torch::Tensor>& gu_bias, int64_t n_gu,
                                    const torch::Tensor& d_panels, const c10::optional<torch::Tensor>& d_bias,
                                    int64_t n_d) {
  return post_attention_with(h, attn, panels_of(o_panels, o_bias, n_o), n_o, norm_w, eps,
                             panels_of(gu_panels, gu_bias, n_gu), panels_of(d_panels, d_bias, n_d), n_d);
}
