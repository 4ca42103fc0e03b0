"""Faster linear layers on CPU for decoding (kernel choice only; the model code is untouched).

``F.linear`` with few rows (a decode step, a small tree) takes a slow BLAS path on CPU, so a verify step over a few
tree nodes costs much more than one token. oneDNN's matmul on weights reordered once into its blocked layout
(``torch.ops.mkldnn``, the kernel Inductor uses on CPU) is faster for one row and grows slowly with the rows: a
draft token's price falls, so more drafting pays (measured in docs/history/05-onednn.md). The reordered weights are a
second copy of the weights, made on first use and kept while the module lives (re-made when a weight changes, e.g.
during training: a `fast_linears` block checks each weight when it first uses it, so weights must not change inside a
block).

Where oneDNN is missing (some non-x86 builds) the route is ``(W @ x.T).T`` for 2..``MAX_ROWS`` rows, made
contiguous: a transposed result would reach attention with a last-dim stride other than 1, which sends
``scaled_dot_product_attention`` to its slow math kernel.

``fast_linears(*modules)`` swaps the forward of the ``nn.Linear`` modules of the target (and of a drafter's own
modules, see :meth:`specdec.protocols.Drafter.modules`), only while the context is active; on the oneDNN route a
layer's sibling projections that read one input (q/k/v, gate/up) run as one product. Results differ from ``F.linear``
only by float32 rounding (summation order). :func:`kernel` names the route, e.g. for a cost profile's key.

Inputs of at most :func:`specdec.kernels.skinny_gemm.max_rows` rows (a decode step, a tree, a batch of trees) go to the
skinny kernel instead where it is built (AVX-512): it reads a copy of each weight packed in panels once, at the memory
floor, and a row's result does not depend on the other rows. Its panels are kept like oneDNN's reordered weights (so a
layer used at both sizes holds three copies of its weights: its own and the two packed ones). It is also the route of
bfloat16 models (larger inputs take ``F.linear`` there). RMSNorm and gated SiLU MLP modules run as whole-layer kernels
inside the same context (:mod:`specdec.kernels.cpu_layers`).
"""

from __future__ import annotations

import functools
import types
import weakref
from collections.abc import Iterable
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from specdec.kernels import cpu_decoder_layer, cpu_layers, skinny_gemm

MAX_ROWS = 32  # the (W @ x.T).T fallback's range
PACK_HINT = 16  # the row count oneDNN's weight layout is chosen for (measured: 16-64 are alike here)

_packs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # nn.Linear -> ((ptr, version), packed weight)


@functools.cache
def onednn_available() -> bool:
    """True when this torch build has oneDNN's packed linear (checked once on a tiny product)."""
    try:
        w, x = torch.ones(2, 3), torch.ones(1, 3)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_HINT)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return bool(torch.equal(y, x @ w.T))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def best_route() -> str:
    """The route :func:`fast_linears` takes by default: ``onednn`` where this build has it, else ``wxt``."""
    return "onednn" if onednn_available() else "wxt"


def kernel(model) -> str:
    """Which route :func:`fast_linears` takes for ``model`` by default: ``onednn+siblings`` (oneDNN, sibling
    projections fused), ``onednn+siblings+panels64`` (and :mod:`~specdec.kernels.skinny_gemm`'s packed panels up to
    its ``MAX_ROWS`` rows, named so a cost profile measured with another limit is measured again; ``+layers``:
    RMSNorm and the gated MLP as whole-layer kernels, ``+decoder``: Llama-style decoder layers fused,
    :mod:`~specdec.kernels.cpu_decoder_layer`), ``wxt``, ``panels-bf16`` (a bfloat16 model: the skinny kernel up to
    ``MAX_ROWS_BF16`` rows, ``F.linear`` beyond) or ``off``."""
    if not wanted(model):
        return "off"
    if next(model.parameters()).dtype == torch.bfloat16:
        return "panels-bf16"
    if best_route() != "onednn":
        return "wxt"
    return "onednn+siblings" + (f"+panels{skinny_gemm.MAX_ROWS}" if skinny_gemm.available() else "") + (
        "+layers" if cpu_layers.available() else "") + (
        "+decoder" if cpu_layers.available() and cpu_decoder_layer.available() else "")  # it needs the panels too


def wanted(model) -> bool:
    """True when the route helps: a float32 model on CPU, or a bfloat16 one where the skinny kernel is built and the
    CPU has AVX-512 BF16 (without it the kernel's bfloat16 loop is scalar, slower than ``F.linear``)."""
    p = next(model.parameters(), None)
    return p is not None and p.device.type == "cpu" and (
        p.dtype == torch.float32 or (p.dtype == torch.bfloat16 and skinny_gemm.bf16_available()))


FAST_DTYPES = (torch.float32, torch.bfloat16)  # the weights fast_linears takes (bfloat16: the skinny kernel only)


def version(t: torch.Tensor) -> int:
    """``t``'s version counter (it moves on every in-place change), -1 for an inference tensor: a module built under
    ``torch.inference_mode`` (e.g. a drafter made for a request that joins a running batch) has no counter, and its
    tensors cannot change outside inference mode, so their pointer and shape identify them."""
    return -1 if t.is_inference() else t._version


def _packed(m: torch.nn.Linear) -> torch.Tensor:
    w = m.weight
    key = (w.data_ptr(), version(w), tuple(w.shape))
    cached = _packs.get(m)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACK_HINT))
        _packs[m] = cached
    return cached[1]


def _fast_float32(x: torch.Tensor) -> bool:
    """True when ``x`` takes a fast float32 route (oneDNN, the layer kernels): a non-empty float32 CPU input with
    gradients off (else the model's own ops)."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and bool(x.numel()) and not torch.is_grad_enabled()


def _skinny_for(linears: list[torch.nn.Linear]) -> bool:
    """True when the skinny kernel should serve these layers: it reads their weights (and biases) where they are, so
    they must be contiguous; bfloat16 ones need AVX-512 BF16 (without it its bfloat16 loop is scalar)."""
    return all(m.weight.is_contiguous() and (m.bias is None or m.bias.is_contiguous()) for m in linears) and (
        linears[0].weight.dtype == torch.float32 or skinny_gemm.bf16_available())


def _takes_skinny(x: torch.Tensor, on: bool, dtype: torch.dtype) -> bool:
    """True when the skinny kernel takes ``x``: ``on``, at most its row count, the weights' dtype, a non-empty CPU
    input with gradients off."""
    return (on and x.dtype == dtype and 0 < x.numel() <= skinny_gemm.max_rows(dtype) * x.shape[-1]
            and x.device.type == "cpu" and not torch.is_grad_enabled())


_panel_packs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # first layer -> (key, skinny_gemm.Panels)


def _weights_key(linears: list[torch.nn.Linear]) -> tuple:
    """What a packed copy of the layers' weights and biases depends on: it is re-made when this changes."""
    return tuple((id(m), m.weight.data_ptr(), version(m.weight), tuple(m.weight.shape),
                  None if m.bias is None else (m.bias.data_ptr(), version(m.bias))) for m in linears)


def _panels(linears: list[torch.nn.Linear]) -> skinny_gemm.Panels:
    """The layers' weights packed side by side for the skinny kernel, re-made when a weight or bias changes."""
    key = _weights_key(linears)
    cached = _panel_packs.get(linears[0])
    if cached is None or cached[0] != key:
        cached = (key, skinny_gemm.pack([m.weight for m in linears], [m.bias for m in linears]))
        _panel_packs[linears[0]] = cached
    return cached[1]


_quant_packs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> (key, its quantized weights)


def _quant_weights(layer: torch.nn.Module) -> tuple:
    """A quantized Llama layer's weights as its kernels take them (q/k/v and gate/up concatenated: a third of a
    second for SmolLM2's 30 layers), kept across generate calls and re-made when a quantized tensor changes."""
    attn, mlp = layer.self_attn, layer.mlp
    parts = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    key = tuple((id(m), *((t.data_ptr(), version(t)) for t in (m.q, m.d, m.m, m.bias) if t is not None))
                for m in parts)
    cached = _quant_packs.get(layer)
    if cached is None or cached[0] != key:
        cached = (key, cpu_decoder_layer.quant_weights(layer))
        _quant_packs[layer] = cached
    return cached[1]


def _skinny(x: torch.Tensor, panels: skinny_gemm.Panels) -> torch.Tensor:
    """The skinny kernel on ``x [..., K]``: ``[..., sum of the weights' rows]``."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    return skinny_gemm.panel_linear(rows, panels).reshape(*x.shape[:-1], -1)


class _Single:
    """A linear layer's forward on the oneDNN route; its packed weight is checked against the weight once per
    context (one is made on entering :func:`fast_linears`), not on every call of a decode."""

    def __init__(self, linear: torch.nn.Linear, skinny: bool = False) -> None:
        self.linear = linear
        self.skinny = skinny and _skinny_for([linear])
        self._now: torch.Tensor | None = None
        self._panels: skinny_gemm.Panels | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.linear
        if _takes_skinny(x, self.skinny, m.weight.dtype):
            if self._panels is None:
                self._panels = _panels([m])
            return _skinny(x, self._panels)
        if _fast_float32(x) and m.weight.dtype == torch.float32:
            if self._now is None:
                self._now = _packed(m)
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self._now, m.bias, "none", [], "")
        return F.linear(x, m.weight, m.bias)


def _wxt_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    if 2 <= rows <= MAX_ROWS and x.dtype == torch.float32 and x.device.type == "cpu":
        y = torch.matmul(self.weight, x.reshape(rows, x.shape[-1]).T).T.contiguous().reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias
    return F.linear(x, self.weight, self.bias)


def _linears(modules: Iterable[torch.nn.Module]) -> list[torch.nn.Linear]:
    seen, out = set(), []
    for module in modules:
        for m in module.modules():
            if type(m) is torch.nn.Linear and m.weight.dtype in FAST_DTYPES and id(m) not in seen:
                seen.add(id(m))
                out.append(m)
    return out


class _Siblings:
    """Sibling linears that read the same input (a layer's q/k/v or gate/up projections) run as one product.

    The first member called on an input computes every member's output with one oneDNN call on the concatenated
    (reordered) weights; the others take theirs when called on the **same tensor object** (the model reads the
    projections of one hidden state one after the other). Any other call computes afresh, so the results never
    depend on call order. The concatenated weights are cached per group (:data:`_fused`), re-made when a weight
    changes.
    """

    def __init__(self, members: list[torch.nn.Linear], skinny: bool = False) -> None:
        self.members = members
        self.skinny = skinny and _skinny_for(members)
        self.dtype = members[0].weight.dtype
        self.sizes = [m.out_features for m in members]
        self.input: torch.Tensor | None = None
        self.outputs: dict[int, torch.Tensor] = {}
        self._now: tuple[torch.Tensor, torch.Tensor | None] | None = None  # packed() in this context
        self._panels: skinny_gemm.Panels | None = None  # the skinny kernel's, in this context

    def packed(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The concatenated packed weights and bias, checked against the weights once per context (a group is
        made on entering :func:`fast_linears`; weights do not change inside the block of a decode)."""
        if self._now is None:
            self._now = self._packed()
        return self._now

    def _packed(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = _weights_key(self.members)
        cached = _fused.get(self.members[0])
        if cached is None or cached[0] != key:
            with torch.no_grad():
                w = torch.cat([m.weight.detach() for m in self.members])
                biases = [m.bias for m in self.members]
                bias = None if all(b is None for b in biases) else torch.cat(
                    [b.detach() if b is not None else w.new_zeros(m.out_features)
                     for b, m in zip(biases, self.members)])
                cached = (key, torch.ops.mkldnn._reorder_linear_weight(w, PACK_HINT), bias)
            _fused[self.members[0]] = cached
        return cached[1], cached[2]

    def output(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Member ``i``'s output for input ``x``."""
        if self.input is x and i in self.outputs:
            out = self.outputs.pop(i)
            if not self.outputs:
                self.input = None
            return out
        if not (_takes_skinny(x, self.skinny, self.dtype) or (_fast_float32(x) and self.dtype == torch.float32)):
            return F.linear(x, self.members[i].weight, self.members[i].bias)
        parts = self.product(x).split(self.sizes, -1)
        self.input, self.outputs = x, {j: p for j, p in enumerate(parts) if j != i}
        return parts[i]

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's output for ``x [..., K]`` (a CPU input of the members' dtype, gradients off; bfloat16 only
        within the skinny kernel's rows), side by side: ``[..., sum of out_features]``."""
        if _takes_skinny(x, self.skinny, self.dtype):
            if self._panels is None:
                self._panels = _panels(self.members)
            return _skinny(x, self._panels)
        weight, bias = self.packed()
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")

    def clear(self) -> None:
        self.input, self.outputs, self._now, self._panels = None, {}, None, None


# projections that read the same input, by attribute name (Llama, Mistral, Qwen2, ... and EAGLE's head layer)
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_fused: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # first member -> (key, packed weight, bias)


def sibling_groups(modules: Iterable[torch.nn.Module]) -> list[list[torch.nn.Linear]]:
    """The :data:`SIBLINGS` groups in ``modules``: ``nn.Linear`` members with one input size and one dtype
    (float32 or bfloat16)."""
    seen, out = set(), []
    for module in modules:
        for m in module.modules():
            for names in SIBLINGS:
                members = [getattr(m, n, None) for n in names]
                if (all(type(x) is torch.nn.Linear for x in members) and len({x.in_features for x in members}) == 1
                        and len({x.weight.dtype for x in members}) == 1 and members[0].weight.dtype in FAST_DTYPES
                        and not any(id(x) in seen for x in members)):
                    seen.update(id(x) for x in members)
                    out.append(members)
    return out


class _NormForward:
    """An RMSNorm module's forward inside :func:`fast_linears`: :func:`specdec.kernels.cpu_layers.rms_norm` for
    float32 inputs, the module's own forward otherwise."""

    def __init__(self, norm: torch.nn.Module) -> None:
        self.norm = norm
        self.original = type(norm).forward.__get__(norm)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.norm.weight
        if _fast_float32(x) and w.dtype == torch.float32 and w.is_contiguous():
            return cpu_layers.rms_norm(x, w, self.norm.variance_epsilon)
        return self.original(x)


class _MLPForward:
    """A gated SiLU MLP's forward inside :func:`fast_linears`: gate and up as one product (their sibling group),
    then :func:`specdec.kernels.cpu_layers.silu_mul`, then ``down_proj``; the module's own forward otherwise."""

    def __init__(self, mlp: torch.nn.Module, gate_up: _Siblings) -> None:
        self.mlp, self.gate_up = mlp, gate_up
        self.original = type(mlp).forward.__get__(mlp)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if _fast_float32(x) and self.gate_up.dtype == torch.float32:
            return self.mlp.down_proj(cpu_layers.silu_mul(self.gate_up.product(x)))
        return self.original(x)


def _decoder_layer(m: torch.nn.Module, groups: dict[int, _Siblings], float_layers: bool = True,
                   quantized: bool = True) -> cpu_decoder_layer.DecoderLayerForward | None:
    """The fused forward of a Llama-style decoder layer whose q/k/v and gate/up are skinny sibling groups and whose
    weights are float32 (``float_layers``), or whose linears are all int8 / int4 (``quantized``); None for any other
    module."""
    if quantized and cpu_decoder_layer.is_quant_llama_layer(m) and cpu_decoder_layer.quant_available():
        return cpu_decoder_layer.DecoderLayerForward(m, functools.partial(_quant_weights, m),
                                                     max_rows=cpu_decoder_layer.QUANT_MAX_ROWS)
    if not float_layers or not cpu_decoder_layer.is_llama_layer(m):
        return None
    attn, mlp = m.self_attn, m.mlp
    qkv, gu = groups.get(id(attn.q_proj)), groups.get(id(mlp.gate_proj))
    if qkv is None or gu is None or len(qkv.members) != 3 or len(gu.members) != 2 or not (qkv.skinny and gu.skinny):
        return None
    singles = [attn.o_proj, mlp.down_proj]
    if not all(x.weight.dtype == torch.float32 for x in [*qkv.members, *gu.members, *singles]) \
            or not _skinny_for(singles):
        return None
    return cpu_decoder_layer.DecoderLayerForward(
        m, lambda: (_panels(qkv.members), _panels([attn.o_proj]), _panels(gu.members), _panels([mlp.down_proj])))


def _layer_forwards(modules: Iterable[torch.nn.Module], groups: list[_Siblings],
                    decoder_layers: bool = True, quantized_layers: bool = True) -> list[torch.nn.Module]:
    """Give the RMSNorm and gated SiLU MLP modules of ``modules`` their whole-layer kernels, and Llama-style decoder
    layers their fused forward (``decoder_layers``: float32 ones; ``quantized_layers``: int8 / int4 ones); returns
    those patched."""
    gate_up = {id(g.members[0]): g for g in groups if len(g.members) == 2}
    first = {id(g.members[0]): g for g in groups}
    done, seen = [], set()
    for module in modules:
        for m in module.modules():
            if id(m) in seen or "forward" in m.__dict__:
                continue
            seen.add(id(m))
            fused = _decoder_layer(m, first, decoder_layers, quantized_layers)
            if fused is not None:
                m.forward = fused
            elif cpu_layers.is_rms_norm(m):
                m.forward = _NormForward(m)
            elif cpu_layers.is_gated_silu_mlp(m) and id(m.gate_proj) in gate_up:
                m.forward = _MLPForward(m, gate_up[id(m.gate_proj)])
            else:
                continue
            done.append(m)
    return done


@contextmanager
def fast_linears(*modules: torch.nn.Module, enabled: bool = True, route: str | None = None, fuse: bool = True,
                 skinny: bool | None = None, layers: bool | None = None, decoder_layers: bool | None = None):
    """Use the fast route (``route``: ``onednn`` or ``wxt``; None = the best this build has) in the float32 and
    bfloat16 ``nn.Linear`` layers of ``modules`` inside the ``with`` block (bfloat16: the skinny kernel only).
    Gradients enabled: ``F.linear`` as usual.

    fuse (oneDNN route): sibling projections that read the same input (q/k/v, gate/up) run as one product
    (:class:`_Siblings`): fewer, larger calls, each reading its input once.
    skinny (oneDNN route): inputs of at most :func:`specdec.kernels.skinny_gemm.max_rows` rows go to the skinny
    kernel (None: where it is available, see :func:`specdec.kernels.skinny_gemm.available`).
    layers (oneDNN route): RMSNorm modules, and gated SiLU MLPs whose gate/up are fused, run as whole-layer kernels
    (:mod:`specdec.kernels.cpu_layers`; None: where they are built).
    decoder_layers (with ``layers`` and the skinny kernel): Llama-style decoder layers run as two C++ calls around
    their attention for inputs of at most the skinny kernel's rows (:mod:`specdec.kernels.cpu_decoder_layer`; None:
    where it is built).
    """
    if not enabled:
        yield
        return
    route = route or best_route()
    if route not in ("onednn", "wxt"):
        raise ValueError(f"unknown linear route {route!r}; choose onednn or wxt.")
    patched = [m for m in _linears(modules) if "forward" not in m.__dict__]
    free = {id(m) for m in patched}
    skinny = route == "onednn" and (skinny_gemm.available() if skinny is None else bool(skinny))
    groups = [_Siblings(g, skinny) for g in sibling_groups(modules) if all(id(m) in free for m in g)] \
        if route == "onednn" and fuse else []
    grouped = {id(m) for g in groups for m in g.members}
    for m in patched:
        if id(m) not in grouped:
            m.forward = _Single(m, skinny) if route == "onednn" else types.MethodType(_wxt_forward, m)
    for g in groups:
        for i, m in enumerate(g.members):
            m.forward = functools.partial(g.output, i)
    fused = skinny and (cpu_decoder_layer.available() if decoder_layers is None else bool(decoder_layers))
    whole = _layer_forwards(modules, groups, fused, decoder_layers is not False) if route == "onednn" and (
        cpu_layers.available() if layers is None else bool(layers)) else []
    try:
        yield
    finally:
        for m in [*patched, *whole]:
            m.__dict__.pop("forward", None)
        for g in groups:
            g.clear()
