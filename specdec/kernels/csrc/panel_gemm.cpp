// Extension specdec_panel_gemm: the packed-panel linear kernel (specdec/kernels/skinny_gemm.py).
#include <torch/python.h>
#include "panel_gemm.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("panel_linear", &panel_linear);
}
