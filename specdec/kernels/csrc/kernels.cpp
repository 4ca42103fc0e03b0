// Extension specdec_kernels: every C++ kernel of specdec in one translation unit, one Python submodule per kernel
// (specdec/kernels/build.py). Compiling torch's headers takes about 35 s per translation unit on this kind of machine
// and the kernels themselves a few seconds, so nine units took six minutes and one takes about one.
#include <torch/python.h>

#include "attention.h"
#include "decoder_layer.h"
#include "greedy_screen.h"
#include "layers.h"
#include "paged_attention.h"
#include "paged_stack.h"
#include "panel_gemm.h"
#include "quant_gemm.h"
#include "quant_layer.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  auto attention = m.def_submodule("cpu_attention", "a decode step's attention (specdec/kernels/cpu_attention.py)");
  attention.def("dense_attention", &cpu_attention::dense_attention);

  auto decoder = m.def_submodule("decoder_layer", "a Llama-style layer around its attention");
  decoder.def("pre_attention", &pre_attention);
  decoder.def("post_attention", &post_attention);

  auto screen = m.def_submodule("greedy_screen", "the greedy head's screen");
  screen.def("screen", &greedy_screen::screen, "the greedy head's screen: candidate (row, token) pairs");

  auto layers = m.def_submodule("layers", "RMSNorm; silu(gate) * up");
  layers.def("rms_norm", &rms_norm);
  layers.def("silu_mul", &silu_mul);

  auto paged = m.def_submodule("paged_attention", "paged tree attention");
  paged.def("paged_tree_attention", &paged_tree_attention);
  paged.def("paged_attention_step", &paged_attention_step);

  auto paged_layer = m.def_submodule("paged_layer", "a paged forward's decoder layers in one call");
  pybind11::class_<paged_stack::Stack>(paged_layer, "PagedStack", "decoder layers of a paged forward in one call")
      .def(pybind11::init<double>(), pybind11::arg("softcap"))
      .def("add_float", &paged_stack::Stack::add_float)
      .def("add_quant", &paged_stack::Stack::add_quant)
      .def("run", &paged_stack::Stack::run)
      .def("__len__", &paged_stack::Stack::size);

  auto panels = m.def_submodule("panel_gemm", "linears on packed panels (AVX-512 or AVX2)");
  panels.def("panel_linear", &panel_linear);

  auto quant = m.def_submodule("quant_gemm", "int8 / int4 / bf16 linears");
  quant.def("quant_linear", &quant::quant_linear);
  quant.def("quant_linear_portable", &quant::quant_linear_portable, "quant_linear on the portable loop (tests)");
  quant.def("isa", &quant::isa, "the path quant_linear takes on this build");
  quant.def("int8_small_rows", &quant::int8_small_rows, "the loop int8 takes at one or two rows: avx2 or vnni");
  quant.def("set_int8_small_rows", &quant::set_int8_small_rows, "take the 'avx2' or the 'vnni' loop from now on");

  auto quant_layer = m.def_submodule("quant_layer", "a Llama layer on int8 / int4 / bf16 linears");
  quant_layer.def("pre_attention_q", &quant_layer::pre_attention_q);
  quant_layer.def("post_attention_q", &quant_layer::post_attention_q);
}
