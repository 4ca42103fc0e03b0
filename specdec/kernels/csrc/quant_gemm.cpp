// Extension specdec_quant_gemm: linears on int8 / int4 weight panels (specdec/kernels/quant_gemm.py).
#include <torch/python.h>
#include "quant_gemm.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quant_linear", &quant::quant_linear);
}
