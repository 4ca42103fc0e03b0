// Extension specdec_paged_layer: a whole Llama-style decoder layer of a paged forward, its paged tree attention
// inside, in one call (verifiers/paged/layer_kernel.py).
#include <torch/python.h>
#include "decoder_layer.h"
#include "paged_attention.h"

// h [T, H] -> the layer's output [T, H] for the T packed rows of a paged forward (see the module docstring); the
// attention's arguments are paged_attention_step's
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
  const int64_t T = h.size(0);
  auto qkv =
      pre_attention(h, in_norm, in_eps, qkv_panels, qkv_bias, n_qkv, cos, sin, Hq + Hkv, D).view({T, Hq + 2 * Hkv, D});
  auto q = qkv.narrow(1, 0, Hq).transpose(0, 1), k = qkv.narrow(1, Hq, Hkv).transpose(0, 1),
       v = qkv.narrow(1, Hq + Hkv, Hkv).transpose(0, 1);  // [heads, T, D]
  auto attn = paged_attention_step(q, k, v, slots, k_store, v_store, row_req, row_node, tables, prefix, mask, scale,
                                   window, softcap);  // [T, Hq, D]
  return post_attention(h, attn.view({T, Hq * D}), o_panels, o_bias, n_o, post_norm, post_eps, gu_panels, gu_bias, n_gu,
                        d_panels, d_bias, n_d);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decoder_layer", &paged_decoder_layer);
}
