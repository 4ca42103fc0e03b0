"""Pure functions over draft trees: constructors, depths, masks, position ids, paths.

A tree is described by ``parents [B, N]`` (node 0 = root with parent -1; dead padding nodes have parent -2;
every live parent index is smaller than its child's). Everything else is derived here, never stored.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch

from specdec.errors import SpecdecError
from specdec.types import DEAD, DraftTree

# ---------------------------------------------------------------- constructors


def chain(root: int, tokens: Sequence[int], device: torch.device | str | None = None) -> DraftTree:
    """A single chain ``root -> tokens[0] -> tokens[1] -> ...`` (batch of one), on ``device`` (None: CPU).

    >>> chain(7, [3, 4]).parents.tolist()
    [[-1, 0, 1]]
    """
    toks = [int(root), *map(int, tokens)]
    parents = [-1] + list(range(len(toks) - 1))
    return DraftTree(torch.tensor([toks], device=device), torch.tensor([parents], device=device))


def from_sequences(root: int, sequences: Sequence[Sequence[int]], max_nodes: int,
                   weights: Sequence[float] | None = None, device: torch.device | str | None = None) -> DraftTree:
    """Merge candidate continuations into a trie and keep the best ``max_nodes`` nodes (root included).

    A node's score is the summed weight of the continuations that pass through it, so a parent always scores at
    least as high as its children; nodes are taken best-first (ties: shallower, then earlier), which keeps every
    chosen node's parent in the tree. Node order is the order taken, so parents precede children. The tree's
    ``scores`` are each node's share of the total weight (the fraction of candidates that agree with its path).
    The tree's tensors are made on ``device`` (None: CPU).

    Example: ``from_sequences(0, [[5, 6], [5, 7], [9]], max_nodes=4)`` takes 5 (weight 2), then 9 (weight 1,
    shallower than 6 and 7), then 6 (inserted before 7): tokens ``[[0, 5, 9, 6]]``, parents ``[[-1, 0, 0, 1]]``.
    """
    if max_nodes < 1:
        raise SpecdecError(f"max_nodes must be >= 1 (the root); got {max_nodes}.")
    weights = [1.0] * len(sequences) if weights is None else list(weights)
    # trie: node id -> {token: child id}; score and token per node
    children: list[dict[int, int]] = [{}]
    score = [0.0]
    token = [int(root)]
    depth = [0]
    for seq, w in zip(sequences, weights):
        node = 0
        for t in seq:
            t = int(t)
            nxt = children[node].get(t)
            if nxt is None:
                nxt = len(token)
                children[node][t] = nxt
                children.append({})
                score.append(0.0)
                token.append(t)
                depth.append(depth[node] + 1)
            score[nxt] += w
            node = nxt
    # best-first selection
    out_tokens, out_parents, out_scores = [int(root)], [-1], [1.0]
    total = sum(weights) or 1.0
    heap = [(-score[c], depth[c], c, 0) for c in children[0].values()]
    heapq.heapify(heap)
    while heap and len(out_tokens) < max_nodes:
        _, _, node, parent_pos = heapq.heappop(heap)
        pos = len(out_tokens)
        out_tokens.append(token[node])
        out_parents.append(parent_pos)
        out_scores.append(min(1.0, score[node] / total))
        for c in children[node].values():
            heapq.heappush(heap, (-score[c], depth[c], c, pos))
    return DraftTree(torch.tensor([out_tokens], device=device), torch.tensor([out_parents], device=device),
                     scores=torch.tensor([out_scores], device=device))


# ---------------------------------------------------------------- derived quantities


def depths(parents: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` depth of each node (root 0, dead nodes 0).

    >>> depths(torch.tensor([[-1, 0, 0, 1]])).tolist()
    [[0, 1, 1, 2]]
    """
    return torch.tensor([depth_list(row) for row in parents.tolist()], dtype=torch.long, device=parents.device)


def depth_list(parents: Sequence[int]) -> list[int]:
    """Depth of each node of one tree given as a parents list (root 0, dead nodes 0): :func:`depths` without
    tensors, for drafters' bookkeeping.

    >>> depth_list([-1, 0, 0, 1])
    [0, 1, 1, 2]
    """
    d = [0] * len(parents)
    for i in range(1, len(parents)):
        p = parents[i]
        d[i] = d[p] + 1 if p >= 0 else 0
    return d


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """``[B, N, N]`` bool: ``mask[b, i, j]`` is True when node j is node i or one of its ancestors.

    Dead nodes see only themselves (so attention over them stays finite; their outputs are ignored).

    >>> ancestor_mask(torch.tensor([[-1, 0, 0]])).int().tolist()
    [[[1, 0, 0], [1, 1, 0], [1, 0, 1]]]
    """
    b, n = parents.shape
    mask = torch.eye(n, dtype=torch.bool, device=parents.device).repeat(b, 1, 1)
    rows = torch.arange(b, device=parents.device)
    for i in range(1, n):
        p = parents[:, i]
        live = p >= 0
        if bool(live.any()):
            inherited = mask[rows, p.clamp(min=0)] & live[:, None]
            mask[:, i] |= inherited
    return mask


def position_ids(parents: torch.Tensor, prefix_len: int | torch.Tensor) -> torch.Tensor:
    """``[B, N]`` position of each node: length of the cached prefix + depth.

    ``prefix_len`` is an int or ``[B]`` tensor (per-request lengths).
    """
    d = depths(parents)
    if isinstance(prefix_len, torch.Tensor):
        return d + prefix_len.to(d.device)[:, None]
    return d + int(prefix_len)


def verify_mask(parents: torch.Tensor, prefix_len: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, 1, N, prefix_len + N]`` additive attention mask for one verify step, in the model's dtype.

    0 where a node may attend (every cached prefix position, itself and its ancestors), ``finfo(dtype).min``
    elsewhere. transformers' eager attention adds the mask to the scores, so a bool mask would be silently wrong.
    """
    return additive_mask(ancestor_mask(parents), prefix_len, dtype)


def additive_mask(allowed: torch.Tensor, prefix_len: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, 1, n, prefix_len + m]`` from ``allowed [B, n, m]``: every prefix column visible (0), then 0 where
    allowed and ``finfo(dtype).min`` elsewhere."""
    b, n, m = allowed.shape
    mask = torch.zeros(b, 1, n, prefix_len + m, dtype=dtype, device=allowed.device)
    mask[:, 0, :, prefix_len:].masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask


def segment_mask(parents: torch.Tensor, lo: int, hi: int, prefix_len: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, 1, hi-lo, prefix_len + hi - 1]`` additive mask to forward nodes ``lo..hi-1`` of a tree whose root
    is the last of ``prefix_len`` cached tokens and whose nodes ``1..lo-1`` are cached right after it (in order).

    Used by drafters that grow a tree level by level through their own causal LM.
    """
    allowed = ancestor_mask(parents)[:, lo:hi, 1:hi]  # [B, hi-lo, hi-1]; the root lies inside the prefix
    return additive_mask(allowed, prefix_len, dtype)


def segment_key_positions(parents: torch.Tensor, hi: int, prefix_len: int) -> torch.Tensor:
    """``[B, prefix_len + hi - 1]`` positions of the keys :func:`segment_mask` covers: the prefix ``0 ..
    prefix_len - 1`` (the root is its last), then nodes ``1 .. hi-1`` at ``prefix_len - 1 + depth``.

    >>> segment_key_positions(torch.tensor([[-1, 0, 0, 1]]), 4, 2).tolist()
    [[0, 1, 2, 2, 3]]
    """
    b = parents.shape[0]
    prefix = torch.arange(prefix_len, device=parents.device).expand(b, prefix_len)
    return torch.cat([prefix, prefix_len - 1 + depths(parents[:, :hi])[:, 1:]], dim=1)


def is_chain(parents: torch.Tensor) -> bool:
    """True when every live node's parent is the node just before it (the causal mask is then exact)."""
    n = parents.shape[1]
    expected = torch.arange(-1, n - 1, device=parents.device)
    return bool((parents == expected).all())


def root_to_leaf_paths(parents: torch.Tensor) -> list[list[list[int]]]:
    """Per batch row, every root-to-leaf path as node indices (root first), leaves in index order.

    >>> root_to_leaf_paths(torch.tensor([[-1, 0, 0, 1]]))
    [[[0, 2], [0, 1, 3]]]
    """
    out = []
    for row in parents.tolist():
        live = [i == 0 or p >= 0 for i, p in enumerate(row)]
        has_child = [False] * len(row)
        for i in range(1, len(row)):
            if live[i]:
                has_child[row[i]] = True
        paths = []
        for i in range(len(row)):
            if live[i] and not has_child[i]:
                path = [i]
                while row[path[-1]] >= 0:
                    path.append(row[path[-1]])
                paths.append(path[::-1])
        out.append(sorted(paths, key=lambda p: p[-1]))
    return out


def path_to(parents_row: Sequence[int], node: int) -> list[int]:
    """Node indices from the root to ``node`` (both included) in one tree."""
    path = [node]
    while parents_row[path[-1]] >= 0:
        path.append(parents_row[path[-1]])
    return path[::-1]


def limit_depth(tree: DraftTree, max_depth: int) -> DraftTree:
    """Drop (remove, for one tree) nodes deeper than ``max_depth``; returns ``tree`` itself when none are.

    Used by the decode loop so a tree never drafts past ``max_new_tokens``.
    """
    d = depths(tree.parents)
    if int(d.max()) <= max_depth:
        return tree
    keep_mask = d <= max_depth
    if tree.batch_size == 1:
        return keep_nodes(tree, keep_mask[0].nonzero().flatten().tolist())
    parents = torch.where(keep_mask, tree.parents, torch.full_like(tree.parents, DEAD))
    return DraftTree(tree.tokens, parents, tree.draft_probs, tree.scores)


def keep_nodes(tree: DraftTree, keep: Sequence[int]) -> DraftTree:
    """The one-request tree cut to the nodes ``keep`` (ascending, ancestor-closed, root first), renumbered;
    tokens, draft probabilities and scores follow their nodes.

    >>> keep_nodes(from_sequences(0, [[5, 6], [9]], max_nodes=4), [0, 1, 3]).tokens.tolist()
    [[0, 5, 6]]
    """
    idx = torch.tensor(list(keep), dtype=torch.long, device=tree.tokens.device)
    parents = torch.tensor([subtree(tree.parents[0].tolist(), list(keep))], device=tree.parents.device)
    probs = None if tree.draft_probs is None else tree.draft_probs[:, idx]
    scores = None if tree.scores is None else tree.scores[:, idx]
    return DraftTree(tree.tokens[:, idx], parents, probs, scores)


def pad_trees(trees: Sequence[DraftTree], num_nodes: int | None = None) -> DraftTree:
    """Stack one-request trees into one batch, padding each to ``num_nodes`` (default: the largest) with dead nodes.

    Dead nodes get token 0 and parent -2; ``draft_probs`` are padded with zeros (all trees must have them, or none).

    >>> t = pad_trees([chain(5, [6, 7]), chain(9, [])])
    >>> t.tokens.tolist(), t.parents.tolist()
    ([[5, 6, 7], [9, 0, 0]], [[-1, 0, 1], [-1, -2, -2]])
    """
    n = num_nodes or max(t.num_nodes for t in trees)
    with_probs = [t.draft_probs is not None for t in trees]
    if any(with_probs) and not all(with_probs):
        raise SpecdecError("pad_trees: either every tree carries draft_probs or none does.")
    tokens, parents, probs = [], [], []
    for t in trees:
        pad = n - t.num_nodes
        if pad < 0:
            raise SpecdecError(f"a tree has {t.num_nodes} nodes, more than the batch's node budget {n}.")
        tokens.append(torch.nn.functional.pad(t.tokens, (0, pad)))
        parents.append(torch.nn.functional.pad(t.parents, (0, pad), value=DEAD))
        if t.draft_probs is not None:
            probs.append(torch.nn.functional.pad(t.draft_probs, (0, 0, 0, pad)))
    return DraftTree(torch.cat(tokens), torch.cat(parents), torch.cat(probs) if probs else None)


def best_subtree(parents: Sequence[int], values: Sequence[float], max_nodes: int) -> list[int]:
    """The ``max_nodes`` best nodes by value (root included, ascending indices), closed under ancestors.

    ``values`` must not increase from a node to its children (e.g. the product of draft probabilities along the
    path, EAGLE-2's ranking) and parents must come before children; ties go to the lower index, so a parent is
    always taken before its child.

    >>> best_subtree([-1, 0, 0, 1, 1], [1.0, 0.6, 0.3, 0.5, 0.05], 3)
    [0, 1, 3]
    """
    order = sorted(range(1, len(parents)), key=lambda i: (-values[i], i))
    kept = {0}
    for i in order:
        if len(kept) >= max(1, max_nodes):
            break
        if parents[i] in kept:
            kept.add(i)
    return sorted(kept)


def subtree(parents: Sequence[int], keep: Sequence[int]) -> list[int]:
    """Parents of the nodes ``keep`` (ascending, ancestor-closed, root first), renumbered; a kept dead node
    (parent -2) stays dead.

    >>> subtree([-1, 0, 0, 1, 1], [0, 1, 3]), subtree([-1, 0, -2, 1], [0, 1, 2, 3])
    ([-1, 0, 1], [-1, 0, -2, 1])
    """
    new = {old: j for j, old in enumerate(keep)}
    return [-1] + [new[parents[i]] if parents[i] >= 0 else parents[i] for i in keep[1:]]
