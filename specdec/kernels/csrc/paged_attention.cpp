// Extension specdec_paged_attention: paged tree attention (verifiers/paged/cpu_kernel.py).
#include <torch/python.h>
#include "paged_attention.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_tree_attention", &paged_tree_attention);
  m.def("paged_attention_step", &paged_attention_step);
}
