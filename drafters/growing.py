"""Growing a draft tree level by level from a drafter's own forward: shared by the draft-model, EAGLE-style and Medusa
drafters (and the layer-skip view, which is a draft model).

A drafter supplies two things: the root's next-token logits, and a :data:`LevelForward` that runs one level of new
nodes (given that every node before them already ran) and returns each one's next-token logits. The grower decides
the rest, the same way for every drafter:

- **static** trees (:class:`~drafters.tree_shape.TreeShape`): node i takes candidate ``ranks[i]`` of its parent's
  candidates, the root's from the root logits, a level's from one forward over the level above;
- **dynamic** trees (EAGLE-2): each level expands the ``top_k`` most valuable new nodes (value = product of draft
  probabilities along the path), each offering its ``top_k`` most probable tokens, and the best ``max_nodes`` nodes
  are kept (:func:`dynamic_tree`, a pure function).

Candidates come from :class:`Candidates`: the top-k tokens for greedy requests (no ``draft_probs``: deterministic
candidates, lossless under any rule), or tokens drawn without replacement from the drafter's warped distribution q
for sampled requests of a static tree (q reported as ``draft_probs``, which the rejection rule needs). A drafter
whose logits cover a draft vocabulary (the most frequent target tokens) says so with :class:`DraftVocab`; ids are
mapped back to the target's here.

:class:`Grown` records the order in which nodes ran through the forward, so a drafter with a KV cache of its own
can keep the accepted ones (:meth:`Grown.cached`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from drafters.tree_shape import TreeShape
from specdec.algorithms import tree as tree_ops
from specdec.algorithms.sampling import SamplingParams, warp_probs
from specdec.errors import ConfigError
from specdec.types import DEAD, DraftContext, DraftTree

LevelForward = Callable[[list[int], torch.Tensor, int, int], torch.Tensor]
"""``forward(tokens, parents, lo, hi) -> logits [1, hi - lo, V']``: run nodes ``lo .. hi-1`` (``tokens`` and
``parents [1, >= hi]`` describe every node run so far, in run order; all nodes before ``lo`` already ran) and return
each one's next-token logits (over the drafter's vocabulary, see :class:`DraftVocab`)."""


@dataclass(frozen=True)
class DraftVocab:
    """How a drafter's logits map to the target's token ids.

    size: the target's vocabulary size; ids: ``[V']`` the target id of each logit when they cover a draft
    vocabulary (ascending), None when logit i is token i.
    """

    size: int
    ids: torch.Tensor | None = None  # [V']

    def token_ids(self, index: torch.Tensor) -> torch.Tensor:
        """Target ids of logit indices ``index``."""
        return index if self.ids is None else self.ids[index]

    def to_target(self, logits: torch.Tensor) -> torch.Tensor:
        """``[..., V']`` -> ``[..., size]`` target-vocabulary logits (-inf outside the draft vocabulary)."""
        return logits if self.ids is None else to_target_vocab(logits, self.ids, self.size)


def to_target_vocab(logits: torch.Tensor, draft_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Draft-vocabulary logits ``[..., V_draft]`` as target-vocabulary logits ``[..., vocab_size]``: entry ``i`` goes
    to token ``draft_ids[i]``, every other token gets -inf.

    >>> to_target_vocab(torch.tensor([1.0, 2.0]), torch.tensor([0, 2]), 3).tolist()
    [1.0, -inf, 2.0]
    """
    out = logits.new_full((*logits.shape[:-1], vocab_size), float("-inf"))
    out[..., draft_ids] = logits
    return out


class Candidates:
    """A node's children: top-k tokens (greedy, ``sampling`` None), or k tokens drawn without replacement from the
    warped draft distribution q, which is recorded at the node's row of ``probs [1, num_nodes, V]``."""

    def __init__(self, vocab: DraftVocab, sampling: SamplingParams | None, generator: torch.Generator | None,
                 num_nodes: int, device: torch.device) -> None:
        self.vocab, self.sampling, self.generator = vocab, sampling, generator
        self.probs = torch.zeros(1, num_nodes, vocab.size, device=device) if sampling is not None else None

    def pick(self, logits: torch.Tensor, k: int, node: int) -> list[int]:
        """Children of ``node`` from its next-token ``logits [V']``: at most ``k`` (fewer when q has fewer left)."""
        if self.sampling is None:
            return self.vocab.token_ids(logits.topk(k).indices).tolist()
        q = warp_probs(self.vocab.to_target(logits), self.sampling)
        self.probs[0, node] = q
        k = min(k, int((q > 0).sum()))
        return torch.multinomial(q, k, replacement=False, generator=self.generator).tolist()


@dataclass(frozen=True)
class Grown:
    """A grown tree and, for each of its nodes, its index in the forward's run order (None: it never ran: a leaf,
    or a node the budget cut). Run index r sits at position ``prefix + r - 1`` of the drafter's own cache."""

    tree: DraftTree
    run_of: list[int | None]

    def cached(self, path: Sequence[int]) -> list[int]:
        """Of an accepted ``path`` (tree nodes, root first), the cache offsets after the prefix of the draft nodes
        that ran: what a drafter with its own KV cache keeps."""
        return [self.run_of[n] - 1 for n in path[1:] if self.run_of[n] is not None]


def grow_static(root: int, root_logits: torch.Tensor, parents: list[int], ranks: list[int], forward: LevelForward,
                candidates: Candidates) -> tuple[list[int], list[int], int]:
    """Fill a static tree level by level: node i takes candidate ``ranks[i]`` of its parent's candidates.

    root_logits: ``[V']``. A node whose parent has too few candidates (sampling from a distribution with fewer tokens
    left than asked for) becomes dead (``parents[i] = -2``), and so does its subtree. Returns ``(tokens, parents,
    ran)``: the nodes ``1 .. ran`` went through ``forward`` (levels are contiguous, so that is a prefix).
    """
    parents = list(parents)
    tokens = [int(root)] + [0] * (len(parents) - 1)
    depths = tree_ops.depth_list(parents)
    wanted: dict[int, int] = {}  # node -> candidates its children need
    for i in range(1, len(parents)):
        wanted[parents[i]] = max(wanted.get(parents[i], 0), ranks[i] + 1)
    cands = {0: candidates.pick(root_logits, wanted[0], 0)} if len(parents) > 1 else {}
    lo, ran = 1, 0
    while lo < len(parents):
        hi = lo
        while hi < len(parents) and depths[hi] == depths[lo]:
            hi += 1
        for i in range(lo, hi):
            options = cands.get(parents[i], [])
            if parents[i] >= 0 and ranks[i] < len(options):
                tokens[i] = options[ranks[i]]
            else:
                parents[i] = DEAD
        if any(lo <= p < hi for p in parents[hi:]):  # some node of this level has children: run the level
            logits = forward(tokens, torch.tensor([parents], device=root_logits.device), lo, hi)
            ran = hi - 1
            for i in range(lo, hi):
                if parents[i] >= 0 and i in wanted:
                    cands[i] = candidates.pick(logits[0, i - lo], wanted[i], i)
        lo = hi
    return tokens, parents, ran


def dynamic_tree(root: int, root_logp: torch.Tensor,
                 expand: Callable[[int, list[int], list[int], list[int]], list[torch.Tensor]],
                 *, top_k: int, depth: int, max_nodes: int, min_value: float = 0.0,
                 vocab: torch.Tensor | None = None,
                 device: torch.device | str | None = None) -> tuple[DraftTree, list[int]]:
    """EAGLE-2's dynamic tree: level by level, the ``top_k`` most valuable new nodes are expanded, each offering
    its ``top_k`` most probable tokens as children (value = product of draft probabilities along the path); then
    the best ``max_nodes`` of all nodes created are kept (:func:`~specdec.algorithms.tree.best_subtree`). Returns the
    tree (its ``scores`` are those values) and, for each of its nodes, the index it had among the nodes created.
    Growth stops early when no node of the new level is worth ``min_value`` (an unsure step does not pay for deep
    draft calls).

    root_logp: ``[V]`` draft log-probabilities of the root's next token. expand(level, tokens, parents, chosen):
    the ``[V]`` log-probabilities of the next token after each ``chosen`` node (level = their depth), given every
    node created so far. vocab: ``[V]`` the token id of each entry when they cover a draft vocabulary; None: entry
    ``i`` is token ``i``. device: where the tree's tensors are made (None: ``root_logp``'s device).

    >>> lp = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    >>> t, keep = dynamic_tree(9, lp, lambda d, tok, par, ch: [lp] * len(ch), top_k=2, depth=2, max_nodes=4)
    >>> t.tokens.tolist(), t.parents.tolist(), [round(v, 2) for v in t.scores[0].tolist()], keep
    ([[9, 0, 1, 0]], [[-1, 0, 0, 1]], [1.0, 0.6, 0.3, 0.36], [0, 1, 2, 3])
    """
    tokens, parents, values = [int(root)], [-1], [1.0]
    frontier = [(0, root_logp)]
    for level in range(1, depth + 1):
        created = []
        for node, logp in frontier:
            top = logp.float().topk(min(top_k, logp.shape[-1]))
            ids = top.indices if vocab is None else vocab[top.indices]
            for lp, t in zip(top.values.tolist(), ids.tolist()):
                tokens.append(t)
                parents.append(node)
                values.append(values[node] * math.exp(lp))
                created.append(len(tokens) - 1)
        if level == depth or max(values[i] for i in created) < min_value:
            break
        chosen = sorted(sorted(created, key=lambda i: (-values[i], i))[:top_k])
        frontier = list(zip(chosen, expand(level, tokens, parents, chosen)))
    keep = tree_ops.best_subtree(parents, values, max_nodes)
    device = root_logp.device if device is None else device
    tree = DraftTree(torch.tensor([[tokens[i] for i in keep]], device=device),
                     torch.tensor([tree_ops.subtree(parents, keep)], device=device),
                     scores=torch.tensor([[values[i] for i in keep]], device=device))
    return tree, keep


def grow_dynamic(root: int, root_logits: torch.Tensor, forward: LevelForward, vocab: DraftVocab, *, top_k: int,
                 depth: int, max_nodes: int, min_value: float, device: torch.device) -> Grown:
    """:func:`dynamic_tree` with each level's expanded nodes run through ``forward`` in one call (in run order, so
    the drafter's cache holds them in that order)."""
    run_tokens, run_parents = [int(root)], [-1]  # the nodes run through the forward, in order
    run = {0: 0}  # created node -> its run index

    def expand(level, tokens, parents, chosen):
        lo = len(run_tokens)
        for i in chosen:
            run_tokens.append(tokens[i])
            run_parents.append(run[parents[i]])
            run[i] = len(run_tokens) - 1
        logits = forward(run_tokens, torch.tensor([run_parents], device=root_logits.device), lo, len(run_tokens))
        return [torch.log_softmax(logits[0, j].float(), dim=-1) for j in range(len(chosen))]

    root_logp = torch.log_softmax(root_logits.float(), dim=-1)
    tree, keep = dynamic_tree(root, root_logp, expand, top_k=top_k, depth=depth, max_nodes=max_nodes,
                              min_value=min_value, vocab=vocab.ids, device=device)
    return Grown(tree, [run.get(i) for i in keep])


@dataclass(frozen=True)
class DynamicGrowth:
    """EAGLE-2-style dynamic trees: ``enabled``; ``top_k`` children per expanded node and nodes expanded per level;
    ``depth`` levels at most; growth stops at a level whose best path value is below ``min_value``."""

    enabled: bool = False
    top_k: int = 4
    depth: int = 6
    min_value: float = 0.0

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1; got {self.top_k}.")
        if not 0.0 <= self.min_value < 1.0:
            raise ConfigError(f"min_value is a path probability threshold in [0, 1); got {self.min_value}.")


class TreeGrower:
    """A drafter's tree, every step: its :class:`~drafters.tree_shape.TreeShape` (static) or
    :class:`DynamicGrowth`, cut to the step's budget and depth limit, filled from its root logits and forward."""

    def __init__(self, shape: TreeShape, dynamic: DynamicGrowth | None = None) -> None:
        self.shape = shape
        self.dynamic = dynamic or DynamicGrowth()

    def grow(self, ctx: DraftContext, root_logits: torch.Tensor, forward: LevelForward, vocab: DraftVocab) -> Grown:
        """This step's tree rooted at ``ctx.input_ids[0, -1]``; ``root_logits [V']``."""
        root, device = int(ctx.input_ids[0, -1]), ctx.input_ids.device
        budget = self.shape.budget(ctx.max_nodes)
        if self.dynamic.enabled:
            # a tree of `budget` nodes is at most budget - 1 deep and never needs more expanded nodes per level
            d = self.dynamic
            return grow_dynamic(root, root_logits, forward, vocab, top_k=min(d.top_k, max(budget - 1, 1)),
                                depth=min(d.depth, ctx.max_depth, budget - 1), max_nodes=budget,
                                min_value=d.min_value, device=device)
        parents, ranks = self.shape.cut(ctx.max_nodes, ctx.max_depth)
        sampling = ctx.sampling if ctx.sampling is not None and ctx.sampling.do_sample else None
        candidates = Candidates(vocab, sampling, ctx.generator, len(parents), device)
        tokens, parents, ran = grow_static(root, root_logits, parents, ranks, forward, candidates)
        tree = DraftTree(torch.tensor([tokens], device=device), torch.tensor([parents], device=device),
                         candidates.probs)
        return Grown(tree, [i if i <= ran else None for i in range(len(parents))])
