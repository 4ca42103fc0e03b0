"""The greedy head's screen pass in one C++ call: which tokens the bfloat16 screen cannot rule out, row by row.

:class:`specdec.kernels.greedy_head.ScreenedArgmax` screens ``a = W h`` in bfloat16 and keeps every token whose upper
bound reaches the row's floor (its module docstring has the bound). In torch that pass is six to eight ops over the
whole ``[R, V]`` screen (max, aminmax, a float32 ``addcmul`` copy, a comparison, ``nonzero``), ~0.4 ms for one row and
~0.75 ms for eight of the default target's 49152-token head, a third of the head's time beside its bfloat16 product
(docs/history/13-batch-rounds.md). Here each row is read three times in registers (max and min, the first index of the
max, the candidates) without a float32 copy. The candidate set may differ from torch's by the rounding of the bound's
own arithmetic, which the bound's 1% margin covers; the float32 recomputation that picks the winner is unchanged.
"""

from __future__ import annotations

import torch

from specdec.kernels.build import Kernel

_KERNEL = Kernel("greedy_screen", "the greedy head's screen")


def available() -> bool:
    """Whether the kernel is built (building it now if it was not; False where that fails or is turned off)."""
    return _KERNEL.available()


def candidates(a: torch.Tensor, row_norm: torch.Tensor, scale: torch.Tensor, max_norm: float,
               u: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, tokens)`` (int64 ``[C]`` each) of the tokens the screen keeps: ``a [R, V]`` bfloat16 screened logits,
    ``row_norm [V]`` float32, ``scale [R]`` float32 (the bound's ``c ||h||``), ``u`` the bound's ``u'``."""
    out = _KERNEL.module.screen(a.contiguous(), row_norm, scale.contiguous(), float(max_norm), float(u))
    return out[0], out[1]
