"""Linear layers on a few rows at the speed of reading their weights once (a C++ kernel for CPUs with AVX-512 or AVX2).

A decode step of a small model on a CPU is bound by streaming its weights from memory: SmolLM2-135M's 540 MB of
float32 weights take about 14 ms to read on this machine's two cores (``tensor.sum()`` over them), but oneDNN's
packed matmul takes about 18-22 ms for them at one row, and ``F.linear`` (MKL's gemv) about 45 ms.

This kernel reads a copy of the weights packed once into **panels** of 32 output features, input feature by input
feature (``[N/32, K, 32]``): a panel is one sequential stream (which the hardware prefetcher follows) and each 64-byte
load of it serves 16 outputs. For every input feature, each input row's value is broadcast and multiplied into two
registers of 16 outputs per row, for up to eight rows at once (more rows: eight at a time over a panel still in cache).
No horizontal sums, so the cost per weight byte barely grows with the rows: the 121 linears of a SmolLM2-135M step take
about the same time at eight rows as at one (measured in docs/history/10-packed-panels.md), where a row-major kernel
pays a chain of multiply-adds per extra row. From about 16 rows the kernel is bound by the CPU's multiply-add rate, as
oneDNN is; up to 48 rows it stays ahead of oneDNN's packed matmul (a layer's four products, 24 rows: 19.4 against 21.5
ms for 30 layers; 48: 35.3 against 41.4), they tie at 64 and oneDNN leads beyond (docs/history/16-fused-layers.md):
:func:`specdec.kernels.cpu_gemm.fast_linears` takes this kernel up to :func:`max_rows` rows and oneDNN beyond.

Every output is one float32 sum over the input features in their order, whatever the number of rows and wherever the
row sits in the input: **a row's result is bitwise the same in a batch of any size** (a tree of 12 nodes verifies
each node with the products a one-token step would compute). Results differ from ``F.linear`` by float32 rounding
only (the order of the sum).

bfloat16 weights are packed in pairs of input features (``[N/32, K/2, 32, 2]``) for AVX-512 BF16's pairwise dot
products (``vdpbf16ps``): float32 accumulation, one rounding to bfloat16 at the end, as oneDNN does; on AVX2 each 32-bit pair is
split into two float32 weights by a shift and a mask (:func:`bf16_available`). Half the bytes, so about half the time
of a float32 step where reading the weights is the bound.

The packed panels are a second copy of the weights (:func:`pack`; :func:`specdec.kernels.cpu_gemm.fast_linears` keeps
one per layer, or per group of sibling projections packed side by side, while the module lives). Output features are
split over torch's OpenMP threads, a panel each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.kernels.build import Kernel, cpu_flags

# float32 rows fast_linears sends here, by instruction set: beyond, oneDNN is as fast or faster (AVX-512:
# docs/history/16-fused-layers.md; AVX2, 16 registers of 8 floats, three rows a pass: the 121 linears of a
# SmolLM2-135M step took 29 / 31 / 53 / 102 ms at 1 / 4 / 8 / 16 rows against oneDNN's 35 / 46 / 55 / 83,
# docs/history/19-quantized-targets.md)
ROWS = {"avx512": 64, "avx2": 8}
MAX_ROWS_BF16 = 16  # bfloat16 rows: beyond, F.linear (oneDNN, with AMX where the CPU has it)
PANEL = 32  # output features per panel (two AVX-512 registers of float32)

_KERNEL = Kernel("panel_gemm", "linears on packed panels (AVX-512 or AVX2)")


def isa() -> str | None:
    """The kernel's instruction set on this CPU: ``avx512``, ``avx2`` (with FMA) or None (no fast path)."""
    flags = cpu_flags()
    if " avx512f " in flags:
        return "avx512"
    if " avx2 " in flags and " fma " in flags:
        return "avx2"
    return None


MAX_ROWS = ROWS.get(isa(), ROWS["avx512"])


def max_rows(dtype: torch.dtype) -> int:
    """The most rows of ``dtype`` inputs that :func:`specdec.kernels.cpu_gemm.fast_linears` sends to this kernel."""
    return MAX_ROWS_BF16 if dtype == torch.bfloat16 else MAX_ROWS


def available() -> bool:
    """Whether the kernel is built and pays: a CPU with AVX-512 or AVX2 + FMA (elsewhere oneDNN is as fast or
    faster)."""
    return isa() is not None and _KERNEL.available()


def failure() -> str | None:
    """Why the kernel is not used (None when it is, or was not tried)."""
    return _KERNEL.failure() if isa() else "this CPU has neither AVX-512 nor AVX2 with FMA"


def bf16_available() -> bool:
    """Whether bfloat16 takes the kernel at its speed: built, with AVX-512 BF16's pairwise dot products or AVX2's
    shift-and-multiply-add path (either reads half a float32 panel's bytes)."""
    return available()


@dataclass(frozen=True)
class Panels:
    """Weights packed for :func:`panel_linear`: ``panels`` ``[N/32, K, 32]`` (float32) or ``[N/32, K/2, 32, 2]``
    (bfloat16; K padded to even), the output features padded to a whole panel with zeros; ``bias`` float32 ``[N]`` or
    None; ``out_features`` N, ``in_features`` K."""

    panels: torch.Tensor
    bias: torch.Tensor | None
    out_features: int
    in_features: int


def pack(weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> Panels:
    """Pack ``cat(weights)`` (each ``[N_i, K]``, one dtype: float32 or bfloat16) and their biases (one per weight, or
    None) into panels: a copy, made once per layer (or group of layers that read one input)."""
    with torch.no_grad():
        w = torch.cat([t.detach() for t in weights]) if len(weights) > 1 else weights[0].detach()
        n, k = w.shape
        t = -(-n // PANEL)
        w = torch.nn.functional.pad(w, (0, k % 2 if w.dtype == torch.bfloat16 else 0, 0, t * PANEL - n))
        if w.dtype == torch.bfloat16:
            panels = w.view(t, PANEL, w.shape[1] // 2, 2).permute(0, 2, 1, 3).contiguous()
        else:
            panels = w.view(t, PANEL, k).transpose(1, 2).contiguous()
        bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach().float() if b is not None else torch.zeros(m.shape[0]) for b, m in zip(biases, weights)])
    return Panels(panels, bias, n, k)


def panel_linear(x: torch.Tensor, packed: Panels) -> torch.Tensor:
    """``x @ W.T + b`` for the packed ``W``, ``b``: x ``[M, K]`` contiguous, of the weights' dtype. Returns
    ``[M, N]``; each row's result is bitwise independent of the other rows."""
    return _KERNEL.module.panel_linear(x, packed.panels, packed.bias, packed.out_features)


def skinny_linear(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> torch.Tensor:
    """``x @ cat(weights).T + cat(biases)`` (packing the weights for this one call): x ``[M, K]`` contiguous, weights
    ``[N_i, K]``, one bias (or None) per weight, all float32 or all bfloat16 (float32 accumulation, one rounding to
    bfloat16). Returns ``[M, sum N_i]``."""
    if any(w.dim() != 2 or w.shape[1] != x.shape[-1] for w in weights):
        raise RuntimeError("weights must be [N, K] with the input's K")
    if x.dtype not in (torch.float32, torch.bfloat16) or any(w.dtype != x.dtype for w in weights):
        raise RuntimeError("x and the weights must be all float32 or all bfloat16")
    return panel_linear(x, pack(weights, biases))
