// A whole Llama-style decoder layer of a paged forward, its paged tree attention inside, as one function
// (verifiers/paged/layer_kernel.py runs it through paged_stack.h), on float32 packed panels or int8 / int4 / bf16
// ones.
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

}  // namespace paged_layer
