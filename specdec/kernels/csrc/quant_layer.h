// A Llama-style decoder layer around its attention with int8 / int4 / bf16 linears
// (specdec/kernels/cpu_decoder_layer.py): decoder_layer.h's two calls with quant_gemm.h's product.
#pragma once
#include "decoder_layer.h"
#include "quant_gemm.h"

namespace quant_layer {

quant::Linear make(const torch::Tensor& q, const torch::Tensor& d, const c10::optional<torch::Tensor>& m,
                   const c10::optional<torch::Tensor>& bias, int64_t n, int64_t bits) {
  return quant::Linear{q, d, m, bias, n, bits};
}

torch::Tensor pre_attention_q(const torch::Tensor& h, const torch::Tensor& norm_w, double eps, const torch::Tensor& q,
                              const torch::Tensor& d, const c10::optional<torch::Tensor>& m,
                              const c10::optional<torch::Tensor>& bias, int64_t n, int64_t bits,
                              const torch::Tensor& cos, const torch::Tensor& sin, int64_t rope_heads, int64_t D) {
  return pre_attention_with(h, norm_w, eps, make(q, d, m, bias, n, bits), n, cos, sin, rope_heads, D);
}

// o, gate_up, down: (q, d, m, bias, n, bits) each
torch::Tensor post_attention_q(const torch::Tensor& h, const torch::Tensor& attn, const torch::Tensor& o_q,
                               const torch::Tensor& o_d, const c10::optional<torch::Tensor>& o_m,
                               const c10::optional<torch::Tensor>& o_bias, int64_t n_o, int64_t o_bits,
                               const torch::Tensor& norm_w, double eps, const torch::Tensor& gu_q,
                               const torch::Tensor& gu_d, const c10::optional<torch::Tensor>& gu_m,
                               const c10::optional<torch::Tensor>& gu_bias, int64_t n_gu, int64_t gu_bits,
                               const torch::Tensor& d_q, const torch::Tensor& d_d,
                               const c10::optional<torch::Tensor>& d_m, const c10::optional<torch::Tensor>& d_bias,
                               int64_t n_d, int64_t d_bits) {
  return post_attention_with(h, attn, make(o_q, o_d, o_m, o_bias, n_o, o_bits), n_o, norm_w, eps,
                             make(gu_q, gu_d, gu_m, gu_bias, n_gu, gu_bits), make(d_q, d_d, d_m, d_bias, n_d, d_bits),
                             n_d);
}

}  // namespace quant_layer
