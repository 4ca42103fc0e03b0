"""The decode loop: one generator, read top to bottom.

prefill -> (propose -> score -> accept -> commit -> observe -> yield step)*

The step around the verifier call is :class:`specdec.algorithms.step.RequestDecoding`'s, which the batching
engine (:mod:`specdec.serving.engine`) uses too.

Greedy and sampling share it; only the acceptance rule differs. Stopping on EOS and stop strings lives in
:mod:`specdec.generate`, which consumes this generator; the loop only stops itself at ``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from specdec.algorithms.acceptance import AcceptanceRule, is_argmax
from specdec.algorithms.adaptive import AdaptiveBudget
from specdec.algorithms.sampling import SamplingParams
from specdec.algorithms.step import RequestDecoding, Step
from specdec.protocols import Drafter, Verifier


def decode(
    verifier: Verifier,
    drafter: Drafter,
    rule: AcceptanceRule,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    max_nodes: int,
    sampling: SamplingParams | None = None,
    generator: torch.Generator | None = None,
    budget: AdaptiveBudget | None = None,
) -> Iterator[Step]:
    """Speculatively decode from ``input_ids [1, T]`` until ``max_new_tokens`` tokens are committed.

    The last prompt token is the first tree's root; the cache holds every committed token but the current root.
    ``budget`` (optional) re-decides the node budget before each step from measured costs and this request's
    acceptance so far (:mod:`specdec.algorithms.adaptive`); otherwise every tree gets ``max_nodes``.
    Yields one :class:`~specdec.algorithms.step.Step` per verify step; a caller may stop iterating at any time
    (closing the generator): the verifier is then told the request is over (:meth:`Verifier.finish`), as it is when
    the loop ends or fails.
    """
    sampling = sampling or SamplingParams()
    needs_hidden = drafter.needs_hidden_states
    argmax_only = is_argmax(rule, sampling)  # the rule reads only the logits' argmax: the verifier may skip them
    drafter.reset()
    request = RequestDecoding(drafter, rule, input_ids, prompt_len=input_ids.shape[1], remaining=max_new_tokens,
                              sampling=sampling, generator=generator, budget=budget)
    try:
        request.hidden = verifier.prefill(input_ids[:, :-1], output_hidden=needs_hidden)  # [1, T-1, H] or None
        while request.remaining > 0:
            drafted = request.draft(max_nodes)
            out = verifier.score(drafted.tree, output_hidden=needs_hidden, greedy=argmax_only)
            yield request.settle(drafted, out, lambda acceptance: verifier.commit(drafted.tree, acceptance))
    finally:
        verifier.finish()
