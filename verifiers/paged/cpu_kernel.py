"""Tree attention over the paged KV cache in one C++ call on a CPU: no gather of the blocks, no padding.

The torch kernels (:mod:`verifiers.paged.kernels`) copy every request's cached K/V out of its blocks into a padded
``[B, H_kv, P, D]`` grid each layer of each step (a gather of the whole batch's context), then run one attention over
the grid. This kernel reads each key and value where it lies in its block, for exactly the positions a query may
see: its request's cached prefix and its own ancestors in the tree (whose K/V the verifier has already written right
after the prefix). One call serves every live node of a forward, whatever the requests' tree sizes and prefix
lengths, so no attention groups are needed either.

Work is split over (query row, KV head) pairs with ATen's thread pool; each pair computes its ``G`` query heads
(grouped-query attention: the ``G`` heads sharing a KV head read each key once) with a two-pass softmax (float32 accumulation; float64 for a float64 model),
the same function as :func:`verifiers.paged.kernels.paged_tree_attention_torch` up to float rounding, sliding window
and softcapping included (a windowed query walks only the blocks its window reaches).

The C++ source is built once per machine (:class:`specdec.models.cpp_build.CppKernel`: a C++ compiler is needed,
the first build takes about a minute); where it cannot be built, :func:`available` is False and the paged verifier
uses the SDPA kernel.
"""

from __future__ import annotations

import torch

from specdec.models.cpp_build import SIMD_HELPERS, CppKernel

_SOURCE = (r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <sleef.h>
#define SPECDEC_AVX2 1
#endif

""" + SIMD_HELPERS + r"""
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
  at::parallel_for(0, T * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qf(G * D), s, acc(G * D), total(G);
    std::vector<int64_t> pos;
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t t = idx / Hkv, h = idx % Hkv, r = rr[t], node = rn[t], L = pl[r];
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
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = static_cast<acc_t>(qp[(t * H + h * G + g) * D + d]) * sc;
      s.resize(G * P);
      const scalar_t* kh = kp + h * NB * BS * D;
      const scalar_t* vh = vp + h * NB * BS * D;
      for (int64_t j = 0; j < P; ++j) {  // each key read once for the G query heads that share it
        const scalar_t* kr = kh + pos[j] * D;
        for (int64_t g = 0; g < G; ++g) s[g * P + j] = dot<acc_t, scalar_t>(qf.data() + g * D, kr, D);
      }
      if (cap > 0)  // logit softcapping (Gemma 2): cap * tanh(score / cap), before the softmax
        for (int64_t j = 0; j < G * P; ++j) s[j] = cap * std::tanh(s[j] / cap);
      for (int64_t g = 0; g < G; ++g) {
        acc_t* sg = s.data() + g * P;
        acc_t mx = -std::numeric_limits<acc_t>::infinity();
        for (int64_t j = 0; j < P; ++j) mx = std::max(mx, sg[j]);
        for (int64_t j = 0; j < P; ++j) sg[j] -= mx;
        exp_inplace<acc_t>(sg, P);
        acc_t sum = 0;
        for (int64_t j = 0; j < P; ++j) sum += sg[j];
        total[g] = sum;
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j = 0; j < P; ++j) {
        const scalar_t* vr = vh + pos[j] * D;
        for (int64_t g = 0; g < G; ++g) {
          const acc_t w = s[g * P + j];
          acc_t* a = acc.data() + g * D;
          for (int64_t d = 0; d < D; ++d) a[d] += w * static_cast<acc_t>(vr[d]);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const acc_t inv = total[g] > 0 ? acc_t(1) / total[g] : acc_t(0);
        scalar_t* o = op + (t * H + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[g * D + d] * inv);
      }
    }
  });
}

torch::Tensor paged_tree_attention(torch::Tensor q, torch::Tensor k_store, torch::Tensor v_store,
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("paged_tree_attention", &paged_tree_attention); }
""")

_KERNEL = CppKernel("specdec_paged_attention", _SOURCE)


def available() -> bool:
    """Whether the kernel is built (building it now if it was not; False where that fails)."""
    return _KERNEL.available()


def failure() -> str | None:
    """Why the kernel could not be built (None if it was, or was not tried)."""
    return _KERNEL.failure()


def paged_tree_attention_cpp(query: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                             row_req: torch.Tensor, row_node: torch.Tensor, block_tables: torch.Tensor,
                             prefix_lens: torch.Tensor, tree_mask: torch.Tensor, scale: float,
                             window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Attention of each live node of a forward over its request's paged prefix and its tree ancestors.

    query: ``[T, H, D]`` (the forward's live nodes, packed); k_pool, v_pool: ``[num_blocks, H_kv, block_size, D]``
    views of ``[H_kv, num_blocks, block_size, D]`` storage (as :class:`~verifiers.paged.cache.PagedKVCache` keeps
    them) holding every request's prefix **and** the new tokens' K/V at positions ``prefix_len + node``;
    row_req / row_node: ``[T]`` each row's request (index into the next three) and node in its tree;
    block_tables: ``[B, blocks]``; prefix_lens: ``[B]``; tree_mask: ``[B, N, N]`` bool (node i sees node j);
    window, softcap: the layer's sliding window and logit softcapping (:mod:`verifiers.paged.kernels`; None: none).
    Returns ``[T, H, D]``. Example: one request, ``prefix_lens = [0]``, a causal ``tree_mask``: causal attention.
    """
    k_store, v_store = k_pool.transpose(0, 1), v_pool.transpose(0, 1)  # the storage: [H_kv, num_blocks, bs, D]
    return _KERNEL.module.paged_tree_attention(query.contiguous(), k_store, v_store, row_req.long(), row_node.long(),
                                        block_tables.long(), prefix_lens.long(), tree_mask.bool(), float(scale),
                                               int(window or 0), float(softcap or 0.0))
