"""The hybrid drafter: several drafters proposing into one tree, the budget following what each gets accepted.

Each step every part drafts with its share of the node budget; their root-to-leaf paths are merged into one trie
(:func:`specdec.algorithms.tree.from_sequences`: a continuation two parts agree on is verified once). Each part's node
confidences (its tree's ``scores``) are calibrated against what that part gets accepted (one
:class:`specdec.algorithms.adaptive.Calibrator` per part), a merged node is worth the best calibrated value any part
gives its path, and the best ``max_nodes`` nodes by that value are kept; they are the merged tree's ``scores``. After
the step each part is told what was accepted *of its own tree* (the longest prefix of the accepted path its tree
contained), so stateful parts (a draft model's KV cache) stay in step, and a moving average of the tokens each part
got accepted sets the next shares (never below ``min_share``, so a part that fell behind can come back).

The merged tree carries no draft probabilities: its nodes are deterministic candidates for the acceptance rule
(point masses), which is lossless whichever part proposed them.

Example (``conf/drafter/hybrid.yaml``): n-gram continuations from the context beside the trained EAGLE-style head's
dynamic tree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import nn

from specdec import registry
from specdec.algorithms import tree as tree_ops
from specdec.algorithms.adaptive import Calibrator
from specdec.errors import ConfigError
from specdec.protocols import Drafter, Feedback, successors_wanted
from specdec.types import Acceptance, DraftContext, DraftTree


def split_budget(draft_nodes: int, rates: list[float], min_share: float) -> list[int]:
    """Draft nodes per part: proportional to ``rates``, each share at least ``min_share`` of the total.

    >>> split_budget(10, [3.0, 1.0], 0.2), split_budget(10, [0.0, 0.0], 0.2), split_budget(1, [1.0, 5.0], 0.2)
    ([8, 2], [5, 5], [0, 1])
    """
    n = len(rates)
    total = sum(rates)
    shares = [r / total if total > 0 else 1 / n for r in rates]
    shares = [max(s, min_share) for s in shares]
    norm = sum(shares)
    exact = [draft_nodes * s / norm for s in shares]
    out = [int(x) for x in exact]
    for i in sorted(range(n), key=lambda i: (-(exact[i] - out[i]), -rates[i], i))[:draft_nodes - sum(out)]:
        out[i] += 1
    return out


def matched_path(tree: DraftTree, tokens: list[int]) -> list[int]:
    """Node indices (root first) of the longest prefix of ``tokens`` that ``tree`` (batch row 0) contains."""
    parents = tree.parents[0].tolist()
    toks = tree.tokens[0].tolist()
    children: dict[int, dict[int, int]] = {}
    for i in range(1, len(parents)):
        if parents[i] >= 0:
            children.setdefault(parents[i], {}).setdefault(toks[i], i)
    path = [0]
    for t in tokens:
        nxt = children.get(path[-1], {}).get(t)
        if nxt is None:
            break
        path.append(nxt)
    return path


# the recommended mix for the default target, as conf/drafter/hybrid.yaml has it (the bench's specdec:adaptive):
# n-gram continuations beside the EAGLE-style head's dynamic trees, which stop growing at a level whose best path
# probability is below 0.6 (the head is overconfident below it, docs/history/07-kv-copies.md)
DEFAULT_PARTS = ({"name": "ngram"}, {"name": "eagle", "dynamic": True, "max_nodes": None, "min_value": 0.6})


class HybridDrafter:
    """Merges the trees of several drafters. ``drafters``: each a config name (``"ngram"``), a dict
    ``{name: ..., **options}`` (as in ``conf/drafter/hybrid.yaml``), or a drafter object (anything implementing
    :class:`specdec.protocols.Drafter`, e.g. one built with custom weights); None: :data:`DEFAULT_PARTS`."""

    returns_probs = False

    def __init__(self, target=None, tokenizer=None, drafters: list | None = None, min_share: float = 0.2,
                 decay: float = 0.9) -> None:
        specs = list(drafters or DEFAULT_PARTS)
        if len(specs) < 2:
            raise ConfigError("the hybrid drafter mixes at least two drafters, e.g. drafters=[ngram,eagle].")
        if not 0 <= min_share <= 1 / len(specs):
            raise ConfigError(f"min_share must be between 0 and 1/{len(specs)}; got {min_share}.")
        self.parts = [_part(spec, target, tokenizer) for spec in specs]
        specs = {p.needs_hidden_states for p in self.parts} - {False}
        if len(specs) > 1:
            raise ConfigError(f"hybrid drafter parts read different target hidden states {sorted(map(str, specs))}; "
                              "mix parts that read the same features (or none).")
        self.needs_hidden_states = specs.pop() if specs else False
        vocabs = {p.vocab_size for p in self.parts} - {None}
        if len(vocabs) > 1:
            raise ConfigError(f"hybrid drafter parts have different vocabularies {sorted(vocabs)}.")
        self.vocab_size = vocabs.pop() if vocabs else None
        # what a recycling part reads after each step (the merged tree's nodes: the target saw them all)
        self.needs_successors = max(successors_wanted(p) for p in self.parts)
        self.min_share, self.decay = min_share, decay
        self.calibrators = [Calibrator() for _ in self.parts]  # kept across requests: they describe the parts
        self.reset()

    def modules(self) -> list[nn.Module]:
        return [m for p in self.parts for m in p.modules()]

    def reset(self) -> None:
        """A new request: parts reset and shares start even; the calibrations (what each part's confidence is
        worth) are kept, they describe the drafters, not the request."""
        for p in self.parts:
            p.reset()
        self.rates = [1.0] * len(self.parts)  # moving average of tokens accepted per step, per part
        self._trees: list[DraftTree] = []

    def propose(self, ctx: DraftContext) -> DraftTree:
        budgets = split_budget(max(ctx.max_nodes - 1, 0), self.rates, self.min_share)
        self._trees = [p.propose(replace(ctx, max_nodes=b + 1)) for p, b in zip(self.parts, budgets)]
        root = int(ctx.input_ids[0, -1])
        seqs, value_of = [], {}  # token path -> the best calibrated value a part gives it
        for tree, calibrator in zip(self._trees, self.calibrators):
            toks, parents = tree.tokens[0].tolist(), tree.parents[0].tolist()
            values = calibrator.values(_raw_scores(tree), tree_ops.depths(tree.parents)[0].tolist(), parents)
            paths: list[tuple[int, ...]] = [()]
            for i in range(1, len(toks)):
                paths.append(paths[parents[i]] + (toks[i],) if parents[i] >= 0 else ())
                if parents[i] >= 0:
                    value_of[paths[i]] = max(value_of.get(paths[i], 0.0), values[i])
            seqs += [[toks[i] for i in path[1:]] for path in tree_ops.root_to_leaf_paths(tree.parents)[0]
                     if len(path) > 1]
        merged = tree_ops.from_sequences(root, seqs, max_nodes=1 + len(value_of), device=ctx.input_ids.device)
        toks, parents = merged.tokens[0].tolist(), merged.parents[0].tolist()
        paths, values = [()], [1.0]
        for i in range(1, len(toks)):
            paths.append(paths[parents[i]] + (toks[i],))
            values.append(value_of[paths[i]])
        keep = tree_ops.best_subtree(parents, values, max(ctx.max_nodes, 1))
        return tree_ops.keep_nodes(replace(merged, scores=torch.tensor([values], device=merged.tokens.device)), keep)

    def observe(self, feedback: Feedback) -> None:
        committed = feedback.new_tokens[0].tolist()  # accepted draft tokens, then the bonus token
        accepted = committed[:-1]
        for i, (part, tree) in enumerate(zip(self.parts, self._trees)):
            path = matched_path(tree, accepted)
            acc = Acceptance.from_paths([path], [committed[len(path) - 1]], device=tree.tokens.device)
            part.observe(Feedback(tree=tree, acceptance=acc, new_tokens=feedback.new_tokens, hidden=feedback.hidden,
                                  successors=feedback.successors))
            self.rates[i] = self.decay * self.rates[i] + (1 - self.decay) * (len(path) - 1)
            on_path = set(path)
            self.calibrators[i].update(_raw_scores(tree), tree_ops.depths(tree.parents)[0].tolist(),
                                       [n in on_path for n in range(tree.num_nodes)])

    @property
    def shares(self) -> list[float]:
        total = sum(self.rates)
        return [r / total if total else 1 / len(self.rates) for r in self.rates]


def _part(spec, target, tokenizer) -> Drafter:
    """One part: a drafter object as it is, or built by name (with options) through the registry."""
    if isinstance(spec, Drafter):
        return spec
    opts = dict(spec) if isinstance(spec, Mapping) else {"name": spec}
    name = opts.pop("name", None)
    if not isinstance(name, str) or name == "hybrid":
        raise ConfigError(f"hybrid drafter part {spec!r} needs the name of another drafter (e.g. ngram), or a "
                          "drafter object.")
    return registry.build_drafter(name, target, tokenizer, **opts)


def _raw_scores(tree: DraftTree) -> list[float]:
    """A part tree's node confidences (1.0 for a part that does not score its nodes: its calibration then learns
    its acceptance by depth alone)."""
    return tree.scores[0].tolist() if tree.scores is not None else [1.0] * tree.num_nodes
