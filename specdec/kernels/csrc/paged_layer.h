// A whole Llama-style decoder layer of a paged forward, its paged tree attention inside, in one call
// (verifiers/paged/layer_kernel.py), on float32 packed panels or int8 / int4 / bf16 ones.
#pragma once
#include "decoder_layer.h"
#include "paged_attention.h"
#include "quant_gemm.h"

namespace paged_layer {

// the paged tree attention's arguments (paged_attention_step's, after q, k and v)
struct Paged {
  const torch::Tensor &slots, &k_store, &v_store, &row_req, &row_node, &tables, &prefix, &mask;
  double scale;
  int64_t window;
  double softcap;
};

// h [T, H] -> the layer's output [T, H]; qkv, o, gate_up, down map x [T, K] to [T, N]
template <class QKV, class O, class GU, class Down>
torch::Tensor layer_with(const torch::Tensor& h, const torch::Tensor& in_norm, double in_eps, const QKV& qkv_linear,
                         int64_t n_qkv, const torch::Tensor& cos, const torch::Tensor& sin, int64_t Hq, int64_t Hkv,
                         int64_t D, const O& o, int64_t n_o, const torch::Tensor& post_norm, double post_eps,
                         const GU& gate_up, const Down& down, int64_t n_d, const Paged& p) {
  const int64_t T = h.size(0);
  auto qkv = pre_attention_with(h, in_norm, in_eps, qkv_linear, n_qkv, cos, sin, Hq + Hkv, D).view({T, Hq + 2 * Hkv, D});
  auto q = qkv.narrow(1, 0, Hq).transpose(0, 1), k = qkv.narrow(1, Hq, Hkv).transpose(0, 1),
       v = qkv.narrow(1, Hq + Hkv, Hkv).transpose(0, 1);  // [heads, T, D]
  auto attn = paged_attention_step(q, k, v, p.slots, p.k_store, p.v_store, p.row_req, p.row_node, p.tables, p.prefix,
                                   p.mask, p.scale, p.window, p.softcap);  // [T, Hq, D]
  return post_attention_with(h, attn.view({T, Hq * D}), o, n_o, post_norm, post_eps, gate_up, down, n_d);
}

// h [T, H] -> the layer's output [T, H] for the T packed rows of a paged forward (see the module docstring), float32
// panels; the attention's arguments are paged_attention_step's
// clang-format off: one line per part of the layer
torch::Tensor paged_decoder_layer(const torch::Tensor& h, const torch::Tensor& in_norm, double in_eps,
    const torch::Tensor& qkv_panels, const c10::optional<torch::Tensor>& qkv_bias, int64_t n_qkv,
    const torch::Tensor& cos, const torch::Tensor& sin, int64_t Hq, int64_t Hkv, int64_t D,
    const torch::Tensor& o_panels, const c10::optional<torch::Tensor>& o_bias, int64_t n_o,
    const torch::Tensor& post_norm, double post_eps,
    const torch::Tensor& gu_panels, const c10::optional<torch::Tensor>& gu_bias, int64_t n_gu,
    const torch::Tensor& d_panels, const c10::optional<torch::Tensor>& d_bias, int64_t n_d,
    const torch::Tensor& slots, const torch::Tensor& k_store, const torch::Tensor& v_store,
    const torch::Tensor& row_req, const torch::Tensor& row_node, const torch::Tensor& tables,
    const torch::Tensor& prefix, const torch::Tensor& mask, double scale, int64_t window, double softcap) {
  // clang-format on
  return layer_with(h, in_norm, in_eps, panels_of(qkv_panels, qkv_bias, n_qkv), n_qkv, cos, sin, Hq, Hkv, D,
                    panels_of(o_panels, o_bias, n_o), n_o, post_norm, post_eps, panels_of(gu_panels, gu_bias, n_gu),
                    panels_of(d_panels, d_bias, n_d), n_d,
                    Paged{slots, k_store, v_store, row_req, row_node, tables, prefix, mask, scale, window, softcap});
}

// the same on int8 / int4 panels: each linear as (q, d, m, bias, n, bits), see quant_gemm.h
// clang-format off: one line per part of the layer
torch::Tensor paged_decoder_layer_q(const torch::Tensor& h, const torch::Tensor& in_norm, double in_eps,
    const torch::Tensor& qkv_q, const torch::Tensor& qkv_d, const c10::optional<torch::Tensor>& qkv_m,
    const c10::optional<torch::Tensor>& qkv_bias, int64_t n_qkv, int64_t qkv_bits,
    const torch::Tensor& cos, const torch::Tensor& sin, int64_t Hq, int64_t Hkv, int64_t D,
    const torch::Tensor& o_q, const torch::Tensor& o_d, const c10::optional<torch::Tensor>& o_m,
    const c10::optional<torch::Tensor>& o_bias, int64_t n_o, int64_t o_bits,
    const torch::Tensor& post_norm, double post_eps,
    const torch::Tensor& gu_q, const torch::Tensor& gu_d, const c10::optional<torch::Tensor>& gu_m,
    const c10::optional<torch::Tensor>& gu_bias, int64_t n_gu, int64_t gu_bits,
    const torch::Tensor& d_q, const torch::Tensor& d_d, const c10::optional<torch::Tensor>& d_m,
    const c10::optional<torch::Tensor>& d_bias, int64_t n_d, int64_t d_bits,
    const torch::Tensor& slots, const torch::Tensor& k_store, const torch::Tensor& v_store,
    const torch::Tensor& row_req, const torch::Tensor& row_node, const torch::Tensor& tables,
    const torch::Tensor& prefix, const torch::Tensor& mask, double scale, int64_t window, double softcap) {
  // clang-format on
  return layer_with(h, in_norm, in_eps, quant::Linear{qkv_q, qkv_d, qkv_m, qkv_bias, n_qkv, qkv_bits}, n_qkv, cos, sin,
                    Hq, Hkv, D, quant::Linear{o_q, o_d, o_m, o_bias, n_o, o_bits}, n_o, post_norm, post_eps,
                    quant::Linear{gu_q, gu_d, gu_m, gu_bias, n_gu, gu_bits},
                    quant::Linear{d_q, d_d, d_m, d_bias, n_d, d_bits}, n_d,
                    Paged{slots, k_store, v_store, row_req, row_node, tables, prefix, mask, scale, window, softcap});
}

}  // namespace paged_layer
