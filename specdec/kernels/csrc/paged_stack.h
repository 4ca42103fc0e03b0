// Decoder layers of a paged forward in one call (verifiers/paged/layer_kernel.py, PagedStack): the layers' weights
// and settings are handed over once and kept here, so a forward crosses from Python once, not once per layer with
// some forty arguments each (a stack of one layer serves transformers' own layer loop). Each layer runs
// paged_layer.h's layer_with.
#pragma once
#include <vector>

#include "paged_layer.h"

namespace paged_stack {

// one linear of a layer: float32 packed panels (panel_gemm.h) or int8 / int4 / bf16 panels (quant_gemm.h)
struct AnyLinear {
  bool quantized;
  torch::Tensor w, d;  // panels, or q and its scales d
  c10::optional<torch::Tensor> m, bias;
  int64_t n, bits;
  torch::Tensor operator()(const torch::Tensor& x) const {
    return quantized ? quant::quant_linear(x, w, d, m, bias, n, bits) : panel_linear(x, w, bias, n);
  }
};

struct Layer {
  torch::Tensor in_norm, post_norm;
  double in_eps, post_eps, scale;
  AnyLinear qkv, o, gate_up, down;
  int64_t heads, kv_heads, head_dim, idx, window;  // idx: the layer's KV pools
};

class Stack {
 public:
  explicit Stack(double softcap) : softcap_(softcap) {}

  // a layer on float32 panels: each linear as (panels, bias, n)
  // clang-format off: one line per part of the layer
  void add_float(const torch::Tensor& in_norm, double in_eps,
      const torch::Tensor& qkv, const c10::optional<torch::Tensor>& qkv_b, int64_t n_qkv,
      int64_t Hq, int64_t Hkv, int64_t D,
      const torch::Tensor& o, const c10::optional<torch::Tensor>& o_b, int64_t n_o,
      const torch::Tensor& post_norm, double post_eps,
      const torch::Tensor& gu, const c10::optional<torch::Tensor>& gu_b, int64_t n_gu,
      const torch::Tensor& dn, const c10::optional<torch::Tensor>& dn_b, int64_t n_d,
      int64_t idx, double scale, int64_t window) {
    // clang-format on
    auto f = [](const torch::Tensor& w, const c10::optional<torch::Tensor>& b, int64_t n) {
      return AnyLinear{false, w, torch::Tensor(), c10::nullopt, b, n, 32};
    };
    layers_.push_back(Layer{in_norm, post_norm, in_eps, post_eps, scale, f(qkv, qkv_b, n_qkv), f(o, o_b, n_o),
                            f(gu, gu_b, n_gu), f(dn, dn_b, n_d), Hq, Hkv, D, idx, window});
  }

  // a layer on int8 / int4 / bf16 panels: each linear as (q, d, m, bias, n, bits)
  // clang-format off: one line per part of the layer
  void add_quant(const torch::Tensor& in_norm, double in_eps,
      const torch::Tensor& qkv_q, const torch::Tensor& qkv_d, const c10::optional<torch::Tensor>& qkv_m,
      const c10::optional<torch::Tensor>& qkv_b, int64_t n_qkv, int64_t qkv_bits,
      int64_t Hq, int64_t Hkv, int64_t D,
      const torch::Tensor& o_q, const torch::Tensor& o_d, const c10::optional<torch::Tensor>& o_m,
      const c10::optional<torch::Tensor>& o_b, int64_t n_o, int64_t o_bits,
      const torch::Tensor& post_norm, double post_eps,
      const torch::Tensor& gu_q, const torch::Tensor& gu_d, const c10::optional<torch::Tensor>& gu_m,
      const c10::optional<torch::Tensor>& gu_b, int64_t n_gu, int64_t gu_bits,
      const torch::Tensor& d_q, const torch::Tensor& d_d, const c10::optional<torch::Tensor>& d_m,
      const c10::optional<torch::Tensor>& d_b, int64_t n_d, int64_t d_bits,
      int64_t idx, double scale, int64_t window) {
    // clang-format on
    auto q = [](const torch::Tensor& w, const torch::Tensor& d, const c10::optional<torch::Tensor>& m,
                const c10::optional<torch::Tensor>& b, int64_t n, int64_t bits) {
      return AnyLinear{true, w, d, m, b, n, bits};
    };
    layers_.push_back(Layer{in_norm, post_norm, in_eps, post_eps, scale, q(qkv_q, qkv_d, qkv_m, qkv_b, n_qkv, qkv_bits),
                            q(o_q, o_d, o_m, o_b, n_o, o_bits), q(gu_q, gu_d, gu_m, gu_b, n_gu, gu_bits),
                            q(d_q, d_d, d_m, d_b, n_d, d_bits), Hq, Hkv, D, idx, window});
  }

  int64_t size() const { return static_cast<int64_t>(layers_.size()); }

  // h [T, H] -> the last layer's output [T, H]; cos, sin [T, D]; k_stores / v_stores: every layer's pools
  // [H_kv, blocks, bs, D] by KV index; the rest as paged_attention_step takes them
  torch::Tensor run(torch::Tensor h, const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& slots,
                    const std::vector<torch::Tensor>& k_stores, const std::vector<torch::Tensor>& v_stores,
                    const torch::Tensor& row_req, const torch::Tensor& row_node, const torch::Tensor& tables,
                    const torch::Tensor& prefix, const torch::Tensor& mask) const {
    TORCH_CHECK(k_stores.size() == v_stores.size(), "one K and one V pool per layer");
    for (const Layer& l : layers_) {
      TORCH_CHECK(l.idx >= 0 && l.idx < static_cast<int64_t>(k_stores.size()), "no KV pool for layer ", l.idx);
      paged_layer::Paged p{slots,    k_stores[l.idx], v_stores[l.idx], row_req, row_node, tables, prefix,
                           mask,     l.scale,         l.window,        softcap_};
      h = paged_layer::layer_with(h, l.in_norm, l.in_eps, l.qkv, l.qkv.n, cos, sin, l.heads, l.kv_heads, l.head_dim,
                                  l.o, l.o.n, l.post_norm, l.post_eps, l.gate_up, l.down, l.down.n, p);
    }
    return h;
  }

 private:
  std::vector<Layer> layers_;
  double softcap_;
};

}  // namespace paged_stack
