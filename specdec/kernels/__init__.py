"""CPU kernels: the C++ in ``csrc/`` and the Python that routes a model's work to it (kernel choice only: every
kernel has a torch route it is tested against, taken where the kernel cannot be built or does not serve the input).

- :mod:`~specdec.kernels.build`: builds ``csrc/kernels.cpp`` (every kernel, one translation unit) once per machine
  with torch's extension loader.
- :mod:`~specdec.kernels.cpu_gemm`: the linears' route during decoding (the packed panels of
  :mod:`~specdec.kernels.skinny_gemm` up to 64 rows, oneDNN beyond), and the module forwards it installs;
  :mod:`~specdec.kernels.cpu_layers` (RMSNorm and the gated MLP in one call each) and
  :mod:`~specdec.kernels.cpu_decoder_layer` (a Llama-style decoder layer in two calls around its attention).
- :mod:`~specdec.kernels.cpu_attention`: one decode step's attention over a dense K/V cache.
- :mod:`~specdec.kernels.greedy_head` and :mod:`~specdec.kernels.screen_cpp`: exact greedy tokens from a bfloat16
  screen of the LM head.

The paged verifier's kernels (``verifiers/paged/cpu_kernel.py``, ``layer_kernel.py``) build from the same ``csrc/``.
This room depends on the contracts only (``specdec.errors``, ``specdec.types``); model plumbing
(:mod:`specdec.models`) and the verifiers and drafters call into it. ``specdec kernels`` builds every kernel and
says which serve this machine.
"""
