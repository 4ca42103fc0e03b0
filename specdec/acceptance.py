"""Acceptance rules: pure functions ``(tree, target_logits, sampling, generator) -> Acceptance``.

Every rule keeps a root-to-node path of the draft tree plus one token from the target (bonus or recovered),
so a verify step always produces at least one token. ``RULES`` maps config names to rules; ``LOSSY`` names the
rules that do not preserve the target's output (none yet; typical acceptance will be listed there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from specdec.errors import ConfigError
from specdec.types import Acceptance, DraftTree


@dataclass(frozen=True)
class SamplingParams:
    """How the target's next token is chosen; ``do_sample=False`` is greedy (argmax)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


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
    paths, counts, bonus = [], [], []
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
        counts.append(depth[best])
        bonus.append(tn[best])
    width = max(len(p) for p in paths)
    padded = [p + [-1] * (width - len(p)) for p in paths]
    dev = tree.tokens.device
    return Acceptance(
        path=torch.tensor(padded, dtype=torch.long, device=dev),
        num_accepted=torch.tensor(counts, dtype=torch.long, device=dev),
        next_token=torch.tensor(bonus, dtype=torch.long, device=dev),
    )


RULES: dict[str, AcceptanceRule] = {"greedy": greedy}
LOSSY: frozenset[str] = frozenset()


def get_rule(name: str) -> AcceptanceRule:
    """Look up an acceptance rule by config name."""
    try:
        return RULES[name]
    except KeyError:
        raise ConfigError(
            f"unknown acceptance rule {name!r}; choose one of {sorted(RULES)} (e.g. acceptance=greedy)."
        ) from None
