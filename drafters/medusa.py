"""Medusa drafter: K heads on the target's last hidden state each guess one token further ahead.

Head ``k`` (k = 1..K) reads ``h_t``, the target's last hidden state (after its final norm) at the token just before
the draft tree's root, and predicts the token at depth ``k`` of the tree: the root is ``x_{t+1}``, so head ``k``
guesses ``x_{t+1+k}``. One forward of all heads gives every depth's candidates at once; the tree shape is a list of
Medusa "choices" (paths of candidate ranks), and a node at depth ``d`` takes its rank's candidate of head ``d``.

A head is ``num_layers`` residual blocks ``h + SiLU(W h + b)`` (W, b zero at the start, so a fresh head is the
target's LM head) and a draft LM head over a reduced vocabulary (the most frequent target tokens, mapped back
through ``d2t``), initialised from the target's LM-head rows.
"""

from __future__ import annotations

import torch
from torch import nn

from drafters.draft_model import check_contiguous_ranks, to_target_vocab
from specdec import models
from specdec.algorithms import tree as tree_ops
from specdec.algorithms.sampling import SamplingParams, warp_probs
from specdec.errors import ConfigError, SpecdecError
from specdec.models import checkpoint
from specdec.protocols import Feedback
from specdec.types import DEAD, DraftContext, DraftTree

KIND = "medusa"


class ResBlock(nn.Module):
    """``h + SiLU(Linear(h))`` with the linear layer zeroed, so a fresh block is the identity. ``[..., H] -> [..., H]``."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + nn.functional.silu(self.linear(h))


class MedusaHeads(nn.Module):
    """All K Medusa heads: per head, residual blocks then a draft LM head over ``d2t [V_draft]`` (target ids).

    Shapes: ``head_logits(h [..., H], k) -> [..., V_draft]`` for head index ``k`` (0-based: head k+1, depth k+1);
    ``logits(h) -> [K, ..., V_draft]``; ``full_logits(h, V) -> [K, ..., V]`` (-inf outside the draft vocabulary).

    Example: ``MedusaHeads(576, 4, 1, torch.arange(4096)).full_logits(h_t, 49152)[0]`` is the depth-1 guess.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_layers: int, d2t: torch.Tensor) -> None:
        super().__init__()
        if num_heads < 1 or num_layers < 0:
            raise ConfigError(f"medusa needs num_heads >= 1 and num_layers >= 0; got {num_heads}, {num_layers}.")
        self.blocks = nn.ModuleList(
            nn.Sequential(*[ResBlock(hidden_size) for _ in range(num_layers)]) for _ in range(num_heads))
        self.lm_heads = nn.ModuleList(nn.Linear(hidden_size, len(d2t), bias=False) for _ in range(num_heads))
        self.register_buffer("d2t", d2t.long().clone())

    @classmethod
    def for_target(cls, target, num_heads: int, num_layers: int, d2t: torch.Tensor) -> MedusaHeads:
        return cls(int(target.config.hidden_size), num_heads, num_layers, d2t)

    @property
    def num_heads(self) -> int:
        return len(self.lm_heads)

    def init_from_target(self, target) -> None:
        """Every draft LM head starts as the target's LM-head rows of the draft vocabulary."""
        rows = target.get_output_embeddings().weight.detach()[self.d2t.to(target.device)]
        with torch.no_grad():
            for lm in self.lm_heads:
                lm.weight.copy_(rows.to(lm.weight.dtype))

    def head_logits(self, h: torch.Tensor, k: int) -> torch.Tensor:
        """``[..., V_draft]`` head ``k``'s (0-based) draft logits for hidden states ``h [..., H]``."""
        return self.lm_heads[k](self.blocks[k](h.to(self.lm_heads[k].weight.dtype)))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """``[K, ..., V_draft]`` every head's draft logits."""
        return torch.stack([self.head_logits(h, k) for k in range(self.num_heads)])

    def full_logits(self, h: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """``[K, ..., V]`` logits over the target vocabulary (-inf outside the draft vocabulary)."""
        return to_target_vocab(self.logits(h), self.d2t, vocab_size)


def candidates(logits: torch.Tensor, k: int, sampling: SamplingParams | None,
               generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
    """``(tokens, q)``: the top-``k`` tokens of ``logits [V]`` (greedy, q None), or ``k`` tokens drawn without
    replacement from the warped ``q [V]`` (sampling; fewer when q has fewer tokens left)."""
    if sampling is None:
        return logits.topk(k).indices.tolist(), None
    q = warp_probs(logits, sampling)
    k = min(k, int((q > 0).sum()))
    return torch.multinomial(q, k, replacement=False, generator=generator).tolist(), q


class MedusaDrafter:
    """Proposes Medusa trees (``choices``) from K heads on the target's hidden state; lossless with greedy and
    sampled requests.

    Greedy requests: a depth-``d`` node is head ``d``'s rank-r token (siblings under different parents share head
    ``d``'s ranking). Sampled requests: each parent draws its children without replacement from head ``d``'s warped
    distribution q (the head does not see the parent's token, so every parent at a depth has the same q) and the
    tree reports q at the parent's row of ``draft_probs``, which keeps the rejection rule lossless.

    path: a checkpoint written by ``python -m train.medusa`` (None: the one shipped for the default target).
    choices: tree shape (default: the tree the training job chose from validation accuracy); ``depth``/``width``
    build a simple shape instead. dtype: the heads' dtype (default: the target's). dynamic: grow each tree by
    expected acceptance instead (EAGLE-2 style over the heads' top-``top_k`` tokens; a path's value is the product
    of its tokens' head probabilities), cut to the step's node budget; its candidates are deterministic, so no
    ``draft_probs`` are reported (the rejection rule treats them as point masses: lossless).
    """

    needs_hidden_states = True
    returns_probs = True
    min_value = 0.0  # dynamic trees: stop growing at a level whose best path value is below this

    def __init__(self, target=None, tokenizer=None, path: str | None = None, heads: MedusaHeads | None = None,
                 choices: list[list[int]] | None = None, depth: int | None = None, width: int = 1,
                 dtype: str | None = None, max_nodes: int | None = None, dynamic: bool = False,
                 top_k: int = 4, min_value: float = 0.0) -> None:
        if target is None:
            raise ConfigError("the medusa drafter runs on the target's hidden states: pass target=... .")
        if top_k < 1:
            raise ConfigError(f"top_k must be >= 1; got {top_k}.")
        self.dynamic, self.top_k, self.min_value = bool(dynamic), int(top_k), float(min_value)
        meta_choices = None
        if heads is None:
            path = path or checkpoint.shipped(KIND)
            state, meta = checkpoint.load(path, kind=KIND, target=target)
            cfg = meta["config"]
            heads = MedusaHeads.for_target(target, int(cfg["num_heads"]), int(cfg["num_layers"]), state["d2t"])
            checkpoint.load_into(heads, state, path)
            meta_choices = cfg.get("choices")
        # on the target's device as well as in its dtype: the heads read the target's hidden states
        self.heads = heads.to(device=models.device_of(target),
                              dtype=models.resolve_dtype(dtype) if dtype else next(target.parameters()).dtype).eval()
        self.vocab_size = models.vocab_size(target)
        if choices is None:
            choices = tree_ops.choices_for_shape(depth, width) if depth else (
                meta_choices or tree_ops.choices_for_shape(heads.num_heads, 1))
        self.parents, self.ranks = tree_ops.topology_from_choices(choices)
        check_contiguous_ranks(self.parents, self.ranks)
        self.depths = tree_ops.depth_list(self.parents)
        trained = choices is meta_choices
        self.priority = tree_ops.choice_priority(choices) if trained else list(range(1, len(self.parents)))
        self.max_nodes = max_nodes
        if max(self.depths) > heads.num_heads:
            raise ConfigError(f"medusa tree choices reach depth {max(self.depths)} but the drafter has "
                              f"{heads.num_heads} heads; use choices of depth <= {heads.num_heads}.")

    def reset(self) -> None:
        """Nothing to forget: the heads keep no state between verify steps."""

    def _shape(self, max_nodes: int, max_depth: int) -> tuple[list[int], list[int], list[int]]:
        """The configured tree cut to the node budget (and ``max_nodes`` cap) and depth limit, best nodes first
        (trained trees list their most valuable paths first): ``(parents, ranks, depths)``."""
        cap = min(max_nodes, self.max_nodes or max_nodes)
        parents, ranks = tree_ops.cut_tree(self.parents, self.ranks, self.priority, cap, max_depth)
        return parents, ranks, tree_ops.depth_list(parents)

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> DraftTree:
        """One forward of all heads on ``ctx.hidden[:, -1]`` (the token before the root), then fill the tree.

        Node ``i`` at depth ``d`` takes candidate ``ranks[i]`` of its parent's candidates from head ``d``; a node
        whose parent has too few candidates (sampling from a q with fewer tokens left) is dead, with its subtree.
        """
        ids = ctx.input_ids
        if ids.shape[0] != 1:
            raise ConfigError("the medusa drafter proposes for one request at a time (input_ids [1, T]).")
        if ctx.hidden is None:
            raise SpecdecError("the medusa drafter needs the target's hidden states; the verifier returned none.")
        if self.dynamic:
            return self._dynamic(int(ids[0, -1]), ctx)
        parents, ranks, depths = self._shape(ctx.max_nodes, ctx.max_depth)
        if ctx.hidden.shape[1] == 0:  # a one-token prompt: no hidden state before the root yet
            parents, ranks, depths = parents[:1], ranks[:1], depths[:1]
        n = len(parents)
        tokens = [int(ids[0, -1])] + [0] * (n - 1)
        sampling = ctx.sampling if ctx.sampling is not None and ctx.sampling.do_sample else None
        probs = torch.zeros(1, n, self.vocab_size, device=ids.device) if sampling else None
        if n > 1:
            logits = self.heads.full_logits(ctx.hidden[0, -1], self.vocab_size).float()  # [K, V]
            wanted: dict[int, int] = {}  # parent -> candidates its children need
            for i in range(1, n):
                wanted[parents[i]] = max(wanted.get(parents[i], 0), ranks[i] + 1)
            cands: dict[int, list[int]] = {}
            for i in range(1, n):
                p = parents[i]
                if p > 0 and parents[p] == DEAD:
                    parents[i] = DEAD
                    continue
                if p not in cands:
                    cands[p], q = candidates(logits[depths[i] - 1], wanted[p], sampling, ctx.generator)
                    if q is not None:
                        probs[0, p] = q
                if ranks[i] < len(cands[p]):
                    tokens[i] = cands[p][ranks[i]]
                else:
                    parents[i] = DEAD
        return DraftTree(torch.tensor([tokens], device=ids.device), torch.tensor([parents], device=ids.device), probs)

    def _dynamic(self, root: int, ctx: DraftContext) -> DraftTree:
        """:func:`specdec.algorithms.tree.grow_dynamic` with head ``d+1``'s log-probabilities as every depth-``d`` node's
        children (Medusa heads do not depend on the path above them)."""
        cap = min(ctx.max_nodes, self.max_nodes or ctx.max_nodes)
        depth = min(self.heads.num_heads, ctx.max_depth, cap - 1) if ctx.hidden.shape[1] > 0 else 0
        if not depth:
            return tree_ops.chain(root, [], device=ctx.input_ids.device)
        logp = torch.log_softmax(self.heads.full_logits(ctx.hidden[0, -1], self.vocab_size).float(), dim=-1)
        tree, _ = tree_ops.grow_dynamic(root, logp[0], lambda level, tokens, parents, chosen: [logp[level]] * len(chosen),
                                        top_k=self.top_k, depth=depth, max_nodes=cap,
                                        min_value=self.min_value, device=ctx.input_ids.device)
        return tree

    def observe(self, feedback: Feedback) -> None:
        """Nothing to roll back: the next tree reads the hidden states the loop passes in."""
