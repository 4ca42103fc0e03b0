// Extension specdec_decoder_layer: the two calls around a decoder layer's attention
// (specdec/kernels/cpu_decoder_layer.py).
#include <torch/python.h>
#include "decoder_layer.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pre_attention", &pre_attention);
  m.def("post_attention", &post_attention);
}
