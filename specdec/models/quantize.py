"""Weight-only quantized targets: ``target.quantization=int8|int4|bf16`` swaps a model's linear layers for
:class:`QuantLinear` at load (GGUF's Q8_0 / Q4_1 / BF16 formats, :mod:`specdec.kernels.quant_gemm`).

``bf16`` is the fast bfloat16 on a CPU: the weights rounded to bfloat16 (half of float32's bytes), multiplied by
float32 activations in float32 (no rounding of the activations, unlike ``target.dtype=bfloat16``, which runs the
whole model in bfloat16 through transformers' own layers), as llama.cpp serves a BF16 file.

Every ``nn.Linear`` of the decoder and the LM head is quantized (the head at int8 at least, see :data:`HEAD_BITS`);
embeddings, norms and biases stay float32 (an
embedding reads one row per token, so it costs memory, not bandwidth). Activations stay float32. A layer whose input
size is not a multiple of 32 stays in float (:class:`QuantReport` counts it). Drafters keep their own dtype
(float32): they are small, and their inputs are the quantized target's hidden states.

Refused before anything is quantized, with what to do instead: a quantization other than int8 / int4 / bf16, a model
not on the CPU or not float32, and families that keep weight matrices outside ``nn.Linear`` (GPT-2's ``Conv1D``,
MoE experts stored as one 3D tensor). Every CPU runs it: the C++ kernel's AVX2 path, its portable loop elsewhere, the
torch route without a compiler.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from specdec.errors import ConfigError
from specdec.kernels import quant_gemm
from specdec.kernels.quant_gemm import QuantLinear

QUANTIZATIONS = tuple(quant_gemm.BITS)  # ("int8", "int4", "bf16")
# the LM head is never below int8: its errors move every logit at once (llama.cpp's Q4 files keep it at Q6_K or
# Q8_0 too; the default model's Q4_1 file has a Q8_0 head, and int4 here reproduces that file's tensors)
HEAD_BITS = 8


@dataclass
class QuantReport:
    """What :func:`quantize_model` did: layers quantized, layers kept in float (input size not a multiple of 32),
    and the linear weights' bytes before and after."""

    quantization: str
    quantized: int = 0
    kept: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0


def check_quantizable(model, quantization: str) -> int:
    """The bits of ``quantization`` for ``model``, or a :class:`ConfigError` that says what to do instead."""
    if quantization not in quant_gemm.BITS:
        raise ConfigError(f"unknown target.quantization {quantization!r}; use one of {list(QUANTIZATIONS)} "
                          "(GGUF's Q8_0 / Q4_1 / BF16 formats) or null for none.")
    p = next(model.parameters())
    if p.device.type != "cpu":
        raise ConfigError(f"target.quantization={quantization} runs on the CPU; this target is on {p.device}. "
                          "Drop the quantization, or use target.device=cpu.")
    if p.dtype != torch.float32:
        raise ConfigError(f"target.quantization={quantization} keeps activations in float32; load the target with "
                          f"target.dtype=float32 (it is {str(p.dtype).removeprefix('torch.')}).")
    # every matrix must sit in an nn.Linear (quantized) or an embedding (kept): GPT-2's Conv1D and MoE experts
    # stored as one 3D tensor would otherwise stay float32 behind a quantized name
    others = [f"{name}.{p_name} ({type(m).__name__})" for name, m in model.named_modules()
              if not isinstance(m, (nn.Linear, nn.Embedding))
              for p_name, p in m.named_parameters(recurse=False) if p.dim() >= 2]
    if others:
        raise ConfigError(f"target.quantization={quantization} quantizes nn.Linear layers; this "
                          f"{model.config.model_type} model keeps weights elsewhere: {', '.join(others[:3])}"
                          f"{' ...' if len(others) > 3 else ''}. Serve it unquantized.")
    return quant_gemm.BITS[quantization]


def quantize_model(model, quantization: str) -> QuantReport:
    """Swap every ``nn.Linear`` of ``model`` (decoder layers and LM head, not a drafter's) for a
    :class:`QuantLinear` in place; returns a :class:`QuantReport`."""
    bits = check_quantizable(model, quantization)
    report = QuantReport(quantization)
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    for name, linear in targets:
        n, k = linear.weight.shape
        if k % quant_gemm.GROUP:
            report.kept.append(name)
            continue
        head = linear is model.get_output_embeddings()
        q = QuantLinear(quant_gemm.quantize(linear.weight, max(bits, HEAD_BITS) if head else bits), linear.bias)
        report.quantized += 1
        report.bytes_before += linear.weight.numel() * linear.weight.element_size()
        report.bytes_after += q.panels.nbytes
        set_module(model, name, q)
    model.config.specdec_quantization = quantization
    return report


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name``."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def quantization_of(model) -> str | None:
    """``int8`` / ``int4`` / ``bf16`` for a target quantized here or loaded from a GGUF file's quantized tensors,
    else None."""
    return getattr(model.config, "specdec_quantization", None)
