"""Exact greedy tokens from the LM head for half its weight traffic: a bfloat16 screen, float32 where it matters.

A greedy verify step needs only ``argmax(W h)`` at each tree node, not the logits. On a small target the LM head
is a large share of a forward (for SmolLM2-135M about a fifth of its weights) and a forward over a few nodes is bound
by reading weights. :class:`ScreenedArgmax` reads a bfloat16 copy of the head instead (half the bytes), then
recomputes in float32 only the tokens the screen cannot rule out.

Why it is exact. Let ``u = 2**-8`` (bfloat16's unit roundoff), ``t_i`` a float32 logit (any summation order) and
``a_i`` the screened one (bfloat16 weights and input, float32 accumulation, bfloat16 result). Rounding ``W`` and
``h`` moves each product ``W_ij h_j`` by at most ``(2u + u^2) |W_ij h_j|``; float32 accumulation, here and in
the reference, adds at most ``H 2**-24`` of ``sum_j |W_ij h_j| <= ||W_i|| ||h||`` each (Cauchy-Schwarz); the
bfloat16 result adds ``u |a_i| / (1 - u)``. So ``|t_i - a_i| <= b_i = c ||W_i|| ||h|| + u' |a_i|``. Any token's
``a_j - b_j`` is a lower bound of the best float32 logit, and a token with ``a_i + b_i`` below it cannot be the
argmax. The rest (typically 1-5 of 49152) are recomputed in float32; the largest wins, the lowest id on ties,
as ``torch.argmax``. The float32 logits differ from the model's own GEMM by summation order only, as any kernel
choice does (:mod:`specdec.kernels.cpu_gemm`).

Used by the hf verifier for greedy steps of targets whose logits are ``lm_head(last hidden state)`` up to an
increasing map (``SCREENABLE``), on CPUs where oneDNN runs bfloat16 matmuls natively (:func:`available`).
Sampling needs the whole distribution and keeps the float32 head.
"""

from __future__ import annotations

import functools

import torch

from specdec.kernels import cpu_gemm, screen_cpp, skinny_gemm

U_BF16 = 2.0 ** -8
U_FP32 = 2.0 ** -24

# model types whose causal-LM logits are lm_head(decoder's last_hidden_state), or an increasing function of it
# (gemma2's soft cap, granite's and cohere's positive scale): the argmax of the head's output is the model's
SCREENABLE = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "olmo", "olmo2",
                        "granite", "cohere", "starcoder2", "smollm3"})


@functools.cache
def available() -> bool:
    """True where oneDNN runs bfloat16 matmuls on packed weights natively (checked once on a tiny product)."""
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        w = torch.ones(2, 3, dtype=torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 16)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 3, dtype=torch.bfloat16), packed, None, "none", [], "")
        return bool(torch.equal(y.float(), torch.full((1, 2), 3.0)))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def kind() -> str:
    """The screen's name in a cost profile's key: its candidate pass in C++ or in torch ops."""
    return "bf16-screen+cpp" if screen_cpp.available() else "bf16-screen"


def screenable(model) -> bool:
    """True when ``model``'s greedy token can be taken from its decoder's last hidden state by
    :class:`ScreenedArgmax`: a known model type, a float32 bias-free ``nn.Linear`` head on CPU, and the kernel."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (getattr(model.config, "model_type", None) in SCREENABLE and hasattr(model, "get_decoder")
            and type(head) is torch.nn.Linear and head.bias is None and head.weight.dtype == torch.float32
            and head.weight.device.type == "cpu" and available())


class ScreenedArgmax:
    """``argmax(hidden @ W.T)`` over the last dim, exactly, streaming a bfloat16 copy of ``W [V, H]``: the weight
    of ``head`` (a bias-free ``nn.Linear``, e.g. the target's LM head) or a weight tensor itself.

    The copy (packed in the skinny kernel's bfloat16 panels, or for oneDNN) and the row norms are made on first use
    and re-made when the weight changes.
    """

    def __init__(self, head: torch.nn.Linear | torch.Tensor) -> None:
        self.head = head
        self._key = None

    @property
    def weight(self) -> torch.Tensor:
        return self.head if isinstance(self.head, torch.Tensor) else self.head.weight

    def _prepare(self) -> None:
        w = self.weight
        key = (w.data_ptr(), cpu_gemm.version(w), tuple(w.shape))
        if key != self._key:
            with torch.no_grad():
                w = w.detach()
                # the skinny kernel's bfloat16 panels where the CPU has AVX-512 BF16 (~30% faster at 1-8 rows on
                # the default target's head, docs/history/10-packed-panels.md), else oneDNN's packed layout
                self._panels = skinny_gemm.pack([w.to(torch.bfloat16)], [None]) if skinny_gemm.bf16_available() \
                    else None
                self._packed = None if self._panels is not None else torch.ops.mkldnn._reorder_linear_weight(
                    w.to(torch.bfloat16), 16)
                self._row_norm = w.norm(dim=1)  # [V]
                self._max_norm = float(self._row_norm.max())
                self._finite = bool(torch.isfinite(self._row_norm).all())
            self._key = key

    def bound_factors(self) -> tuple[float, float]:
        """``(c, u')`` of the bound ``b_i = c ||W_i|| ||h|| + u' |a_i|`` (module docstring), each with a 1% margin
        for the rounding of the bound's own arithmetic."""
        c = 2 * U_BF16 + U_BF16 ** 2 + 2.1 * self.weight.shape[1] * U_FP32
        return 1.01 * c, 1.01 * U_BF16 / (1 - U_BF16)

    @torch.inference_mode()
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [..., H]`` float32 -> greedy tokens ``[...]`` (long)."""
        self._prepare()
        h = hidden.reshape(-1, hidden.shape[-1]).float().contiguous()  # [R, H]
        if not (self._finite and bool(torch.isfinite(h).all())):  # no bound holds: the plain product decides
            return (h @ self.weight.T).argmax(-1).reshape(hidden.shape[:-1])
        c, u = self.bound_factors()
        hb = h.to(torch.bfloat16)
        a = skinny_gemm.panel_linear(hb, self._panels) if self._panels is not None else \
            torch.ops.mkldnn._linear_pointwise(hb, self._packed, None, "none", [], "")  # [R, V] bfloat16
        scale = c * h.norm(dim=1, keepdim=True)  # [R, 1]: b_i = scale * ||W_i|| + u |a_i|
        if screen_cpp.available():  # the same screen in one pass per row (specdec.kernels.screen_cpp)
            rows, toks = screen_cpp.candidates(a, self._row_norm, scale[:, 0], self._max_norm, u)
        else:
            rows, toks = self._screen(a, scale, u)
        exact = (self.weight[toks] * h[rows]).sum(-1)  # [C] float32 logits of the candidates
        r = h.shape[0]
        best = exact.new_full((r,), float("-inf")).scatter_reduce(0, rows, exact, "amax")
        win = exact == best[rows]  # ties: the lowest id, as torch.argmax
        out = toks.new_full((r,), self.weight.shape[0]).scatter_reduce(0, rows[win], toks[win], "amin")
        return out.reshape(hidden.shape[:-1])

    def _screen(self, a: torch.Tensor, scale: torch.Tensor, u: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The screen in torch ops: ``(rows, tokens)`` of the candidates in ``a [R, V]``; ``scale [R, 1]``."""
        top, arg = a.max(dim=-1, keepdim=True)  # the screened best, a float32 lower bound of its logit below
        top = top.float()
        floor = top - scale * self._row_norm[arg] - u * top.abs()  # [R, 1] <= the best float32 logit
        # a candidate has a_i + scale ||W_i|| + u |a_i| >= floor. When floor >= scale * max ||W_i||, no a_i < 0
        # can reach it and u |a_i| <= u max(top, 0); otherwise bound u |a_i| by the row's largest |a_i|
        slack = u * top.clamp(min=0)
        low = floor < scale * self._max_norm
        if bool(low.any()):
            lo_a, hi_a = torch.aminmax(a, dim=-1, keepdim=True)
            slack = torch.where(low, u * torch.maximum(lo_a.abs(), hi_a.abs()).float(), slack)
        # float32 arithmetic (a bfloat16 a_i widens exactly); 1e-30: float32 underflow of flushed products
        return (torch.addcmul(a, self._row_norm[None], scale) >= floor - slack - 1e-30).nonzero(as_tuple=True)
