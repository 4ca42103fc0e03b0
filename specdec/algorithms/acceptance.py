"""Acceptance rules: pure functions ``(tree, target_logits, sampling, generator) -> Acceptance``.

Every rule keeps a root-to-node path of the draft tree plus one token from the target (bonus or recovered),
so a verify step always produces at least one token. ``RULES`` maps config names to rules:

- ``greedy``: argmax matching (``do_sample=False``); lossless.
- ``rejection``: chain and tree speculative sampling (:mod:`specdec.algorithms.rejection`); lossless at any temperature,
  for drafters with draft probabilities and for deterministic drafters alike; greedy when ``do_sample=False``.
- ``typical``: Medusa's typical acceptance (:mod:`specdec.algorithms.typical`); **lossy**, listed in ``LOSSY``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from specdec.algorithms import typical as typical_rule
from specdec.algorithms.rejection import speculative_sampling
from specdec.algorithms.sampling import SamplingParams
from specdec.errors import ConfigError
from specdec.types import Acceptance, DraftTree

AcceptanceRule = Callable[[DraftTree, torch.Tensor, SamplingParams, "torch.Generator | None"], Acceptance]


def greedy(tree: DraftTree, logits: torch.Tensor, sampling: SamplingParams | None = None,
           generator: torch.Generator | None = None) -> Acceptance:
    """Greedy rule: the longest path whose every token equals the target's argmax at its parent, plus the bonus.

    logits: ``[B, N, V]`` target logits at every node. A node is accepted when its parent is accepted and its token
    is ``argmax(logits[parent])``; the deepest accepted node (lowest index on ties) ends the path and the bonus token
    is ``argmax(logits[deepest])``. Output equals the target's own greedy decoding token for token.

    Example: tokens ``[[r, 5, 9, 6]]``, parents ``[[-1, 0, 0, 1]]``, argmax per node ``[5, 6, 2, 8]`` ->
    node 1 (5) accepted, node 2 (9) rejected, node 3 (6) accepted: path ``[0, 1, 3]``, bonus 8.
    """
    target_next = logits.argmax(dim=-1)  # [B, N]
    return accept_matching(tree, target_next)


def accept_matching(tree: DraftTree, target_next: torch.Tensor) -> Acceptance:
    """The accepted path when the target's choice at each node is known: ``target_next [B, N]``.

    Shared by greedy decoding and by sampling against deterministic drafts once the target token is drawn.
    """
    tokens = tree.tokens.tolist()
    parents = tree.parents.tolist()
    nxt = target_next.tolist()
    paths, bonus = [], []
    for toks, pars, tn in zip(tokens, parents, nxt):
        n = len(toks)
        ok = [False] * n
        depth = [0] * n
        ok[0] = True
        best = 0
        for i in range(1, n):
            p = pars[i]
            if p >= 0 and ok[p] and toks[i] == tn[p]:
                ok[i] = True
                depth[i] = depth[p] + 1
                if depth[i] > depth[best]:
                    best = i
        path = [best]
        while pars[path[-1]] >= 0:
            path.append(pars[path[-1]])
        paths.append(path[::-1])
        bonus.append(tn[best])
    return Acceptance.from_paths(paths, bonus, tree.tokens.device)


def rejection(tree: DraftTree, logits: torch.Tensor, sampling: SamplingParams | None = None,
              generator: torch.Generator | None = None) -> Acceptance:
    """Lossless speculative sampling over chains and trees; the greedy rule when not sampling."""
    if sampling is None or not sampling.do_sample:
        return greedy(tree, logits, sampling, generator)
    return speculative_sampling(tree, logits, sampling, generator)


def typical(tree: DraftTree, logits: torch.Tensor, sampling: SamplingParams | None = None,
            generator: torch.Generator | None = None) -> Acceptance:
    """LOSSY: Medusa's typical acceptance (see :mod:`specdec.algorithms.typical`)."""
    return typical_rule.typical(tree, logits, sampling, generator)


RULES: dict[str, AcceptanceRule] = {"greedy": greedy, "rejection": rejection, "typical": typical}
LOSSY: frozenset[str] = frozenset({"typical"})


def is_argmax(rule: AcceptanceRule, sampling: SamplingParams | None) -> bool:
    """True when ``rule`` reads nothing of the logits but their argmax at each node: the greedy rule, and the
    rejection rule when not sampling. A verifier may then compute only the greedy tokens."""
    return rule is greedy or (rule is rejection and (sampling is None or not sampling.do_sample))


def get_rule(name: str) -> AcceptanceRule:
    """Look up an acceptance rule by config name."""
    try:
        return RULES[name]
    except KeyError:
        raise ConfigError(
            f"unknown acceptance rule {name!r}; choose one of {sorted(RULES)} (e.g. acceptance=greedy)."
        ) from None
