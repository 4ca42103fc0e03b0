"""Sampling parameters and logit warping with transformers' meaning.

``warp_probs`` applies, in transformers' order, temperature, then top-k, then top-p (nucleus; at least one token
kept), then a softmax. The same warping is applied to target and draft distributions, so the rejection rules
preserve exactly the distribution ``model.generate(do_sample=True, temperature=..., top_k=..., top_p=...)``
samples from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.errors import SpecdecError


@dataclass(frozen=True)
class SamplingParams:
    """How the target's next token is chosen; ``do_sample=False`` is greedy (argmax).

    temperature > 0; top_k: keep the k most likely tokens (0 = off); top_p: keep the smallest set of most likely
    tokens whose probability reaches top_p (1.0 = off).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.do_sample:
            if not self.temperature > 0:
                raise SpecdecError(f"temperature must be > 0 when sampling; got {self.temperature}. "
                                   "For greedy decoding use do_sample=False.")
            if self.top_k < 0:
                raise SpecdecError(f"top_k must be >= 0 (0 turns it off); got {self.top_k}.")
            if not 0 < self.top_p <= 1:
                raise SpecdecError(f"top_p must be in (0, 1] (1 turns it off); got {self.top_p}.")


def warp_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``[..., V]`` float32 logits after temperature, top-k and top-p (removed tokens at -inf)."""
    scores = logits.float()
    if params.temperature != 1.0:
        scores = scores / params.temperature
    if params.top_k and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - params.top_p)
        remove_sorted[..., -1:] = False  # keep at least the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


def warp_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``[..., V]`` the distribution sampling draws from (float32)."""
    return warp_logits(logits, params).softmax(dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One token id drawn from ``probs [V]`` (a ``generator`` must be on ``probs``' device)."""
    return int(torch.multinomial(probs, 1, generator=generator))


def uniform(generator: torch.Generator | None = None) -> float:
    """One draw from U[0, 1), made on the generator's device (a CUDA generator cannot draw a CPU tensor); from
    torch's global CPU RNG without one."""
    return float(torch.rand((), generator=generator, device=generator.device if generator is not None else "cpu"))
