"""int8 and int4 linear layers on a CPU, at the memory floor of their bytes (a C++ kernel, torch fallback).

Decoding a small model on a CPU is bound by streaming its weights: SmolLM2-135M reads 536 MB a token in float32,
about 143 MB in int8 with scales and about 90 MB in int4. The formats are GGUF's, so a GGUF file's tensors load as
they are (:mod:`specdec.models.gguf`) and a float checkpoint quantizes the way llama.cpp's does:

- **int8** (Q8_0): groups of 32 input features per output feature, ``w = d q`` with q in -127..127 and a float16
  scale ``d = max|w| / 127``; 8.5 bits a weight.
- **int4** (Q4_1): ``w = d q + m`` with q in 0..15, ``d = (max - min) / 15`` and ``m = min``, both float16; 5 bits
  a weight. GGUF's Q4_0 (``w = d (q - 8)``) is the same with ``m = -8 d``.

The weights are packed into panels of 32 output features (:class:`QuantPanels`), and the activations are
quantized per row and group of 32 as llama.cpp does for these types (:func:`quantize_activations`: 8 bits, scale
``max|x| / 127``), so each group's dot product is an exact integer sum (AVX2 ``vpmaddubsw``, in
``csrc/quant_gemm.h``) and the groups add up in float32 in a fixed order: **a row's result is bitwise the same
whatever the number of rows** and speculative decoding over a quantized target gives that target's own greedy output
token for token. The products equal ``quantize_activations(x) @ dequantize(W).T`` up to float32 rounding.

Where the kernel cannot be built (no compiler) :func:`quant_linear` multiplies the quantized activations by the
dequantized weights (made once per layer and kept): the same results up to rounding, a float32 model's speed and
memory, and no promise that rows are independent (``specdec kernels`` says which route runs).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from specdec.kernels.build import Kernel

GROUP = 32  # input features per group (one scale, and one min for int4)
PANEL = 32  # output features per panel
BITS = {"int8": 8, "int4": 4, "bf16": 16}
VERSION = 5  # bumped when the kernel's speed changes (a cost profile measured with an older one is stale); 3: int4
#             panels one 8-output column at a time, blocks of 8 rows (8 / 16 rows 6-12% faster); 4: AVX-512 VNNI;
#             5: int8 at 1-2 rows on the VNNI loop except on AMD family 19h (int8_small_rows)

_KERNEL = Kernel("quant_gemm", "int8 / int4 / bf16 linears")


def available() -> bool:
    """Whether the C++ kernel is built (building it now if it was not)."""
    return _KERNEL.available()


def failure() -> str | None:
    """Why the kernel is not used (None when it is, or was not tried)."""
    return _KERNEL.failure()


@dataclass(frozen=True)
class QuantPanels:
    """One quantized weight ``[N, K]`` packed for the kernel; T = ceil(N / 32) panels, K / 32 groups.

    q: int8 ``[T, K/32, 8 (quad of k), 128 (32 j x 4 k)]`` (8 bits) or uint8 ``[T, K/32, 8, 64 (2 halves x 8 i x
    4 k)]`` (4 bits: byte (i, k) of half h holds output 16 h + i in its low nibble and 16 h + 8 + i in its high
    one); d, m: float16 ``[T, K/32, 32 (j)]`` (m: 4 bits only); outputs beyond N are zeros; bias: float32 ``[N]`` or
    None. bits 16 (``bf16``): q bfloat16 ``[T, K/2, 32 (j), 2 (k even, k odd)]`` (the weights rounded to
    bfloat16, multiplied by the float32 activations as they are), d an empty float16 tensor, m None."""

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


def pack(bits: int, q: torch.Tensor, d: torch.Tensor | None = None,
         m: torch.Tensor | None = None) -> QuantPanels:
    """Panels from per-group values: q ``[N, K]`` integers (int8 in -128..127, or 0..15 for 4 bits), d and m float16
    ``[N, K/32]``; for 16 bits q is the bfloat16 weights ``[N, K]`` and d, m are not used."""
    n, k = q.shape
    check_shape(n, k)
    g, t = k // GROUP, -(-n // PANEL)
    qp = _pad_rows(q, n)
    if bits == 16:  # [T, K/2, j, pair]
        qp = qp.to(torch.bfloat16).view(t, PANEL, k // 2, 2).transpose(1, 2).contiguous()
        return QuantPanels(16, qp, torch.empty(0, dtype=torch.float16), None, n, k)
    if bits == 8:  # [T, G, quad, j, k]
        qp = qp.to(torch.int8).view(t, PANEL, g, 8, 4).permute(0, 2, 3, 1, 4).reshape(t, g, 8, 128).contiguous()
    else:  # [T, G, quad, half, i, k] bytes, the low nibble output 16 half + i, the high one 16 half + 8 + i
        u = qp.to(torch.uint8).view(t, 2, 2, 8, g, 8, 4).permute(0, 4, 5, 1, 3, 6, 2)  # [T, G, quad, half, i, k, nib]
        qp = (u[..., 0] | (u[..., 1] << 4)).reshape(t, g, 8, 64).contiguous()

    def scales(s: torch.Tensor) -> torch.Tensor:
        return _pad_rows(s.to(torch.float16), n).view(t, PANEL, g).transpose(1, 2).contiguous()

    return QuantPanels(bits, qp, scales(d), scales(m) if bits == 4 else None, n, k)


def unpacked(p: QuantPanels) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The inverse of :func:`pack`: q ``[N, K]`` (int16; bfloat16 for 16 bits), d and m float16 ``[N, K/32]`` (for
    16 bits: d empty, m None)."""
    t, g = p.q.shape[:2]
    if p.bits == 16:
        return p.q.transpose(1, 2).reshape(t * PANEL, p.in_features)[: p.out_features], p.d, None
    if p.bits == 8:
        q = p.q.to(torch.int16).view(t, g, 8, PANEL, 4).permute(0, 3, 1, 2, 4)  # [T, j, G, quad, k]
    else:
        u = p.q.to(torch.int16).view(t, g, 8, 2, 8, 4)
        q = torch.stack([u & 0x0F, u >> 4], dim=-1)  # [T, G, quad, half, i, k, nib]
        q = q.permute(0, 3, 6, 4, 1, 2, 5)  # [T, half, nib, i, G, quad, k]
    q = q.reshape(t * PANEL, g * GROUP)[: p.out_features]

    def rows(s: torch.Tensor) -> torch.Tensor:
        return s.transpose(1, 2).reshape(t * PANEL, g)[: p.out_features]

    return q, rows(p.d), rows(p.m) if p.m is not None else None


def concat(parts: list[QuantPanels]) -> QuantPanels:
    """Weights of one input size and bit width side by side (a layer's q/k/v, gate/up) as one :class:`QuantPanels`:
    the same values, so each part's outputs are bitwise those of its own panels."""
    if len({p.bits for p in parts}) != 1 or len({p.in_features for p in parts}) != 1:
        raise ValueError("concatenated quantized weights need one bit width and one input size")
    cols = [unpacked(p) for p in parts]
    q, d = torch.cat([c[0] for c in cols]), torch.cat([c[1] for c in cols]) if parts[0].bits != 16 else None
    m = torch.cat([c[2] for c in cols]) if parts[0].bits == 4 else None
    biases = [p.bias for p in parts]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else torch.zeros(p.out_features) for b, p in zip(biases, parts)])
    return replace(pack(parts[0].bits, q, d, m), bias=bias)


def dequantize(p: QuantPanels) -> torch.Tensor:
    """The weights the panels stand for, float32 ``[N, K]`` (exact: ``d q (+ m)`` in float32)."""
    q, d, m = unpacked(p)
    if p.bits == 16:
        return q.float()
    w = q.float().view(p.out_features, -1, GROUP) * d.float().unsqueeze(-1)
    if m is not None:
        w = w + m.float().unsqueeze(-1)
    return w.view(p.out_features, p.in_features)


def quantize(weight: torch.Tensor, bits: int) -> QuantPanels:
    """``weight [N, K]`` (any float dtype) quantized as GGUF's Q8_0 (8 bits) or Q4_1 (4 bits) quantizers do, with the
    float16 scale (and min) the values are computed against; 16 bits: rounded to bfloat16 (to nearest even)."""
    with torch.no_grad():
        w = weight.detach().float()
        n, k = w.shape
        check_shape(n, k)
        if bits == 16:
            return pack(16, w.to(torch.bfloat16))
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
    raise ValueError(f"bits must be 8, 4 or 16, not {bits}")


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """The activations ``x [M, K]`` (float32) as the kernel multiplies them: per row and group of 32,
    ``dx = max|x| / 127`` and ``round-to-even(x / dx)`` (llama.cpp's Q8 activations), returned dequantized
    (``dx * xq``, float32 ``[M, K]``)."""
    m, k = x.shape
    blocks = x.float().reshape(m, k // GROUP, GROUP)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    xq = torch.round(blocks * inv).clamp(-127, 127)
    return (xq * d).reshape(m, k)


def isa() -> str | None:
    """The kernel's int8 / int4 path on this CPU: ``avx512-vnni``, ``avx2`` or ``portable`` (None: not built)."""
    return _KERNEL.module.isa() if available() else None


def int8_small_rows() -> str | None:
    """The loop int8 takes at one or two rows on an AVX-512 VNNI build: ``avx2`` or ``vnni`` (the same bits; which
    streams faster depends on the core, ``csrc/quant_gemm.h``; ``SPECDEC_INT8_SMALL_ROWS`` overrides). None: not
    built, or a build with one loop."""
    return (_KERNEL.module.int8_small_rows() or None) if available() else None


def set_int8_small_rows(loop: str) -> None:
    """Take the ``avx2`` or the ``vnni`` loop for int8 at one or two rows from now on (no effect without VNNI)."""
    _KERNEL.module.set_int8_small_rows(loop)


def cost_tag() -> str:
    """What a quantized target's step cost depends on in this kernel: its version and the small-rows loop."""
    loop = int8_small_rows()
    return f"v{VERSION}" + (f"/{loop}" if loop else "")


def quant_linear_portable(x: torch.Tensor, p: QuantPanels, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`quant_linear` on the kernel's portable loop whatever the CPU (the kernel must be built): the reference
    each SIMD path equals bitwise."""
    return _KERNEL.module.quant_linear_portable(x, p.q, p.d, p.m, bias, p.out_features, p.bits)


def quant_linear(x: torch.Tensor, p: QuantPanels, bias: torch.Tensor | None = None,
                 dequantized: torch.Tensor | None = None) -> torch.Tensor:
    """``quantize_activations(x) @ dequantize(p).T + bias`` for ``x [M, K]`` float32 contiguous: ``[M, N]``
    float32, each row's result bitwise independent of the others on the kernel. ``dequantized``: the torch route's
    weights where the kernel is not built (made here when not given)."""
    if available():
        return _KERNEL.module.quant_linear(x, p.q, p.d, p.m, bias, p.out_features, p.bits)
    w = dequantize(p) if dequantized is None else dequantized
    return F.linear(x if p.bits == 16 else quantize_activations(x), w, bias)


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
        kind = "bf16" if self.bits == 16 else f"int{self.bits}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"
