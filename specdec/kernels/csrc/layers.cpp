// Extension specdec_cpu_layers: RMSNorm and silu(gate) * up (specdec/kernels/cpu_layers.py).
#include <torch/python.h>
#include "layers.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm);
  m.def("silu_mul", &silu_mul);
}
