"""Weight-only int8 and int4 linear layers on a CPU, at the memory floor of their bytes (a C++ kernel, torch fallback).

Decoding a small model on a CPU is bound by streaming its weights: SmolLM2-135M reads 536 MB a token in float32,
about 143 MB in int8 with scales and about 90 MB in int4. The formats are GGUF's, so a GGUF file's tensors load as
they are (:mod:`specdec.models.gguf`) and a float checkpoint quantizes the way llama.cpp's does:

- **int8** (Q8_0): groups of 32 input features per output feature, ``w = d q`` with q in -127..127 and a float16
  scale ``d = max|w| / 127``; 8.5 bits a weight.
- **int4** (Q4_1): ``w = d q + m`` with q in 0..15, ``d = (max - min) / 15`` and ``m = min``, both float16; 5 bits
  a weight. GGUF's Q4_0 (``w = d (q - 8)``) is the same with ``m = -8 d``.

The weights are packed into panels of 32 output features (:class:`QuantPanels`) and unpacked in registers by the
kernel (``csrc/quant_gemm.h``): activations stay float32 and every sum is float32, taken in input-feature order, so
**a row's result is bitwise the same whatever the number of rows** and speculative decoding over a quantized target
gives that target's own greedy output token for token. The products equal ``x @ dequantize(W).T`` up to float32
rounding (the order of the sums): ``d q`` and ``d q + m`` are exact in float32 for float16 ``d``, ``m``.

Where the kernel cannot be built (no compiler) :func:`quant_linear` multiplies by the dequantized weights (made once
per layer and kept): the same results up to rounding, a float32 model's speed and memory, and no promise that rows
are independent (``specdec kernels`` says which route runs).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from specdec.kernels.build import CppKernel

GROUP = 32  # input features per group (one scale, and one min for int4)
PANEL = 32  # output features per panel
BITS = {"int8": 8, "int4": 4}

_KERNEL = CppKernel("specdec_quant_gemm", "quant_gemm.cpp", "int8 / int4 weight-only linears")


def available() -> bool:
    """Whether the C++ kernel is built (building it now if it was not)."""
    return _KERNEL.available()


def failure() -> str | None:
    """Why the kernel is not used (None when it is, or was not tried)."""
    return _KERNEL.failure()


@dataclass(frozen=True)
class QuantPanels:
    """One quantized weight ``[N, K]`` packed for the kernel; T = ceil(N / 32) panels, K / 32 groups.

    q: int8 ``[T, K/32, 32 (k), 32 (j)]`` (8 bits) or uint8 ``[T, K/32, 32 (k), 16]`` (4 bits: byte b holds output b
    in its low nibble and output b + 16 in its high one); d, m: float16 ``[T, K/32, 32 (j)]`` (m: 4 bits only);
    outputs beyond N are zeros; bias: float32 ``[N]`` or None."""

    bits: int
    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None
    out_features: int
    in_features: int
    bias: torch.Tensor | None = None  # float32 [N], added by the layer kernels (quant_linear takes its own)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.d, self.m) if t is not None)


def check_shape(out_features: int, in_features: int, where: str = "this layer") -> None:
    if in_features % GROUP:
        raise ValueError(f"{where}: {in_features} input features is not a multiple of {GROUP}, the quantization "
                         "group; keep it in float (or pad the model's hidden size).")
    if out_features <= 0:
        raise ValueError(f"{where}: no output features")


def _pad_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` [N, ...] padded with zero rows to a whole number of panels."""
    rows = -(-n // PANEL) * PANEL
    return torch.cat([t, t.new_zeros(rows - n, *t.shape[1:])]) if rows > n else t


def pack(bits: int, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None) -> QuantPanels:
    """Panels from per-group values: q ``[N, K]`` integers (int8 in -128..127, or 0..15 for 4 bits), d and m float16
    ``[N, K/32]``."""
    n, k = q.shape
    check_shape(n, k)
    g, t = k // GROUP, -(-n // PANEL)
    qp = _pad_rows(q, n).view(t, PANEL, g, GROUP).permute(0, 2, 3, 1)  # [T, G, k, j]
    if bits == 8:
        qp = qp.to(torch.int8).contiguous()
    else:
        u = qp.to(torch.uint8)
        qp = (u[..., : PANEL // 2] | (u[..., PANEL // 2:] << 4)).contiguous()

    def scales(s: torch.Tensor) -> torch.Tensor:
        return _pad_rows(s.to(torch.float16), n).view(t, PANEL, g).transpose(1, 2).contiguous()

    return QuantPanels(bits, qp, scales(d), scales(m) if bits == 4 else None, n, k)


def unpacked(p: QuantPanels) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The inverse of :func:`pack`: q ``[N, K]`` (int16), d and m float16 ``[N, K/32]``."""
    t, g = p.q.shape[:2]
    if p.bits == 8:
        q = p.q.to(torch.int16)
    else:
        u = p.q.to(torch.int16)
        q = torch.cat([u & 0x0F, u >> 4], dim=-1)
    q = q.permute(0, 3, 1, 2).reshape(t * PANEL, g * GROUP)[: p.out_features]

    def rows(s: torch.Tensor) -> torch.Tensor:
        return s.transpose(1, 2).reshape(t * PANEL, g)[: p.out_features]

    return q, rows(p.d), rows(p.m) if p.m is not None else None


def concat(parts: list[QuantPanels]) -> QuantPanels:
    """Weights of one input size and bit width side by side (a layer's q/k/v, gate/up) as one :class:`QuantPanels`:
    the same values, so each part's outputs are bitwise those of its own panels."""
    if len({p.bits for p in parts}) != 1 or len({p.in_features for p in parts}) != 1:
        raise ValueError("concatenated quantized weights need one bit width and one input size")
    cols = [unpacked(p) for p in parts]
    q, d = torch.cat([c[0] for c in cols]), torch.cat([c[1] for c in cols])
    m = torch.cat([c[2] for c in cols]) if parts[0].bits == 4 else None
    biases = [p.bias for p in parts]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else torch.zeros(p.out_features) for b, p in zip(biases, parts)])
    return replace(pack(parts[0].bits, q, d, m), bias=bias)


def dequantize(p: QuantPanels) -> torch.Tensor:
    """The weights the panels stand for, float32 ``[N, K]`` (exact: ``d q (+ m)`` in float32)."""
    q, d, m = unpacked(p)
    w = q.float().view(p.out_features, -1, GROUP) * d.float().unsqueeze(-1)
    if m is not None:
        w = w + m.float().unsqueeze(-1)
    return w.view(p.out_features, p.in_features)


def quantize(weight: torch.Tensor, bits: int) -> QuantPanels:
    """``weight [N, K]`` (any float dtype) quantized as GGUF's Q8_0 (8 bits) or Q4_1 (4 bits) quantizers do, with the
    float16 scale (and min) the values are computed against."""
    with torch.no_grad():
        w = weight.detach().float()
        n, k = w.shape
        check_shape(n, k)
        blocks = w.view(n, k // GROUP, GROUP)
        if bits == 8:
            d = (blocks.abs().amax(-1) / 127).to(torch.float16)
            inv = torch.where(d.float() > 0, 1 / d.float(), torch.zeros_like(d, dtype=torch.float32))
            q = torch.round(blocks * inv.unsqueeze(-1)).clamp(-127, 127)
            return pack(8, q.view(n, k), d)
        if bits == 4:
            lo, hi = blocks.amin(-1), blocks.amax(-1)
            d, m = ((hi - lo) / 15).to(torch.float16), lo.to(torch.float16)
            inv = torch.where(d.float() > 0, 1 / d.float(), torch.zeros_like(d, dtype=torch.float32))
            q = torch.round((blocks - m.float().unsqueeze(-1)) * inv.unsqueeze(-1)).clamp(0, 15)
            return pack(4, q.view(n, k), d, m)
    raise ValueError(f"bits must be 8 or 4, not {bits}")


def quant_linear(x: torch.Tensor, p: QuantPanels, bias: torch.Tensor | None = None,
                 dequantized: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequantize(p).T + bias`` for ``x [M, K]`` float32 contiguous: ``[M, N]`` float32, each row's result
    bitwise independent of the others on the kernel. ``dequantized``: the torch route's weights where the kernel
    is not built (made here when not given)."""
    if available():
        return _KERNEL.module.quant_linear(x, p.q, p.d, p.m, bias, p.out_features, p.bits)
    w = dequantize(p) if dequantized is None else dequantized
    return F.linear(x, w, bias)


class QuantLinear(nn.Module):
    """A linear layer on quantized panels: ``forward(x [..., K]) -> [..., N]`` (float32; other float inputs are
    computed in float32 and cast back). ``weight`` is the dequantized float32 ``[N, K]``, made on each access (for
    code that copies rows of an LM head, e.g. a drafter's initialisation), never kept."""

    def __init__(self, panels: QuantPanels, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.bits, self.in_features, self.out_features = panels.bits, panels.in_features, panels.out_features
        self.register_buffer("q", panels.q)
        self.register_buffer("d", panels.d)
        self.register_buffer("m", panels.m)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self._fallback: torch.Tensor | None = None  # the torch route's dequantized weights (no C++ kernel)

    @property
    def panels(self) -> QuantPanels:
        """The layer's weights and bias as the kernels take them."""
        return QuantPanels(self.bits, self.q, self.d, self.m, self.out_features, self.in_features, self.bias)

    @property
    def weight(self) -> torch.Tensor:
        return dequantize(self.panels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float().contiguous()
        if not available() and self._fallback is None:
            self._fallback = dequantize(self.panels)
        y = quant_linear(rows, self.panels, self.bias, self._fallback)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}"
