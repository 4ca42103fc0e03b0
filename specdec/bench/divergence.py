"""Where a method's greedy output leaves the reference's, and how close the target's call was there.

In bfloat16 or float16 two forwards that compute the same thing in a different order (a tree forward, a batch, another
kernel) may round a logit differently, so greedy argmaxes can flip where the target's top two logits are nearly tied.
For every mismatch the bench records the **top-2 logit gap** of the target at the first differing token: the largest
minus the second-largest logit of one plain target forward (no cache, no specdec kernel) over prompt + the common
prefix of the two outputs, in the model's own dtype. A gap of a step or two of the dtype's resolution says "a tie the
dtype cannot resolve"; a wide gap says "a bug".

Units: ``gap_ulps`` is the gap divided by :func:`ulp` of the larger of the two logits' magnitudes, i.e. the spacing of
the logits' dtype there (bfloat16 near 12.3: 2**-7 * 8 = 0.0625), so ``gap_ulps == 1`` means "adjacent values
of the dtype" (it can be fractional when the second logit lies in a finer binade).

>>> first_difference([5, 6, 7], [5, 6, 9]), first_difference([5, 6], [5, 6, 1]), first_difference([5], [5])
(2, 2, None)
>>> ulp(12.3, torch.bfloat16), ulp(1.0, torch.float16), ulp(-3.0, torch.float32) == 2**-22
(0.0625, 0.0009765625, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from specdec.bench.report import REFERENCE, Measurement


@dataclass(frozen=True)
class Divergence:
    """The first token where two greedy outputs differ, and the target's top-2 logit gap there."""

    position: int  # index into the new tokens (prompt excluded) of the first differing token
    gap: float  # top-1 minus top-2 logit of the target at that position, exact (float64 of the dtype's values)
    gap_ulps: float  # gap / ulp(max(|top-1|, |top-2|)) in the logits' dtype
    top_logit: float  # the largest logit there
    dtype: str  # the logits' dtype, e.g. "bfloat16"


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first index where two token lists differ (a length difference counts: the shorter one's length), or
    None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def ulp(x: float, dtype: torch.dtype) -> float:
    """The spacing of ``dtype``'s values at magnitude ``|x|``: ``eps * 2**floor(log2 |x|)`` (subnormal spacing below
    the smallest normal number), e.g. bfloat16 at 12.3: ``2**-7 * 2**3 = 0.0625``."""
    info = torch.finfo(dtype)
    x = abs(float(x))
    if x < info.smallest_normal:
        return info.eps * info.smallest_normal
    return math.ldexp(info.eps, math.frexp(x)[1] - 1)  # frexp: x = m * 2**e with m in [0.5, 1)


def top2_gap(logits: torch.Tensor) -> tuple[float, float, float]:
    """``(gap, gap_ulps, top)`` of one position's logits ``[V]``, in their own dtype (see the module docstring)."""
    top1, top2 = (float(v) for v in logits.topk(2).values)
    gap = top1 - top2  # both are values of the dtype, so float64 subtracts them exactly
    return gap, gap / ulp(max(abs(top1), abs(top2)), logits.dtype), top1


def first_divergence(model, prompt_ids: torch.Tensor, a: Sequence[int], b: Sequence[int]) -> Divergence | None:
    """The first differing index of two greedy outputs of the same prompt and the target's top-2 logit gap there.

    ``prompt_ids``: ``[1, T]``; ``a``, ``b``: new tokens (prompt excluded). One plain forward of ``model`` over
    ``[1, T + position]`` (prompt + common prefix) gives the logits ``[V]`` of the token at ``position``. None when
    ``a == b``.

    >>> first_divergence(model, prompt, [5, 6, 7], [5, 6, 9]).position  # doctest: +SKIP
    2
    """
    position = first_difference(a, b)
    if position is None:
        return None
    prefix = torch.tensor([list(a[:position])], dtype=prompt_ids.dtype, device=prompt_ids.device)
    ids = torch.cat([prompt_ids, prefix], dim=1)  # [1, T + position]
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]  # [V]
    gap, gap_ulps, top = top2_gap(logits)
    return Divergence(position, gap, gap_ulps, top, str(logits.dtype).removeprefix("torch."))


def add_divergences(runs: list[dict], measurements: Sequence[Measurement], model, inputs: Sequence[torch.Tensor],
                    question_ids: Sequence[object], reference: str = REFERENCE) -> None:
    """Give each greedy run dict ``divergences`` (one per prompt whose output differs from ``reference``'s) and
    ``max_divergence_gap`` (None without any). ``inputs[i]``: prompt i's ids ``[1, T_i]``.

    An entry: ``{"prompt_index", "question_id", "position", "reference_token", "token", "top_logit", "gap",
    "gap_ulps", "dtype"}``; a token is None where that output had already ended.
    """
    ref = {m.prompt_index: m.tokens for m in measurements if m.method == reference}
    seen: dict[tuple[int, int], Divergence] = {}  # methods that leave the reference at the same token share it
    for run in runs:
        entries = []
        for m in (m for m in measurements if m.method == run["method"]):
            other = ref.get(m.prompt_index, ())
            position = first_difference(other, m.tokens)
            if position is None:
                continue
            key = (m.prompt_index, position)
            if key not in seen:
                seen[key] = first_divergence(model, inputs[m.prompt_index], other, m.tokens)
            d = seen[key]
            entries.append({"prompt_index": m.prompt_index, "question_id": question_ids[m.prompt_index],
                            "position": d.position, "reference_token": _at(other, d.position),
                            "token": _at(m.tokens, d.position), "top_logit": d.top_logit, "gap": d.gap,
                            "gap_ulps": d.gap_ulps, "dtype": d.dtype})
        run["divergences"] = entries
        run["max_divergence_gap"] = max((e["gap"] for e in entries), default=None)


def _at(tokens: Sequence[int], i: int) -> int | None:
    return int(tokens[i]) if i < len(tokens) else None
