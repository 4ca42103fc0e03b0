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

from drafters.growing import DraftVocab, DynamicGrowth, TreeGrower, to_target_vocab
from drafters.tree_shape import TreeShape
from specdec import interop, models
from specdec.algorithms import tree as tree_ops
from specdec.errors import ConfigError, SpecdecError
from specdec.models import checkpoint
from specdec.protocols import Feedback
from specdec.types import DraftContext, DraftTree

KIND = "medusa"


class ResBlock(nn.Module):
    """``h + SiLU(Linear(h))``, ``[..., H] -> [..., H]``, with the linear layer zeroed: a fresh block is the
    identity."""

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


def check_fits(cfg: dict, target, path) -> None:
    """Refuse public heads (``cfg``: their meta config, with ``hidden_size`` and ``vocab_size``) made for another
    target, naming what differs."""
    have = {"hidden_size": int(target.config.hidden_size), "vocab_size": models.vocab_size(target)}
    diffs = [f"{k}: heads {cfg[k]!r} vs target {v!r}" for k, v in have.items()
             if cfg.get(k) is not None and int(cfg[k]) != v]
    if diffs:
        raise checkpoint.CheckpointError(
            f"the Medusa heads at {path} were made for another target ({'; '.join(diffs)}). Use heads trained for "
            "this target (python -m train.medusa target=...) or the target they were made for.")


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
    ``draft_probs`` are reported (the rejection rule treats them as point masses: lossless). Both kinds of tree are
    grown by :class:`drafters.growing.TreeGrower`, whose "forward" for a level is the head of the next depth.
    path may also be a public Medusa directory (vLLM's or FasterDecoding's layout: :mod:`specdec.interop.medusa`);
    allow_pickle: read one stored as a pickle (``medusa_lm_head.pt``; only one you trust).
    """

    needs_hidden_states = True
    returns_probs = True

    def __init__(self, target=None, tokenizer=None, path: str | None = None, heads: MedusaHeads | None = None,
                 choices: list[list[int]] | None = None, depth: int | None = None, width: int = 1,
                 dtype: str | None = None, max_nodes: int | None = None, dynamic: bool = False,
                 top_k: int = 4, min_value: float = 0.0, allow_pickle: bool = False) -> None:
        if target is None:
            raise ConfigError("the medusa drafter runs on the target's hidden states: pass target=... .")
        trained = None
        if heads is None:
            path = path or checkpoint.shipped(KIND)
            state, meta = interop.load_checkpoint(path, kind=KIND, target=target, allow_pickle=allow_pickle)
            cfg = meta["config"]
            if meta.get("target") is None:  # public heads have no target fingerprint: check what they state
                check_fits(cfg, target, path)
            heads = MedusaHeads.for_target(target, int(cfg["num_heads"]), int(cfg["num_layers"]), state["d2t"])
            checkpoint.load_into(heads, state, path)
            trained = cfg.get("choices")
        # on the target's device as well as in its dtype: the heads read the target's hidden states
        self.heads = heads.to(device=models.device_of(target),
                              dtype=models.resolve_dtype(dtype) if dtype else next(target.parameters()).dtype).eval()
        self.vocab_size = models.vocab_size(target)
        self.vocab = DraftVocab(self.vocab_size, self.heads.d2t)
        shape = TreeShape.build(choices, depth=depth, width=width, trained=trained, default=(heads.num_heads, 1),
                                max_nodes=max_nodes)
        if shape.max_depth > heads.num_heads:
            raise ConfigError(f"medusa tree choices reach depth {shape.max_depth} but the drafter has "
                              f"{heads.num_heads} heads; use choices of depth <= {heads.num_heads}.")
        # dynamic trees grow as deep as there are heads
        self.grower = TreeGrower(shape, DynamicGrowth(dynamic, top_k, heads.num_heads, min_value))
        self._logits: torch.Tensor | None = None  # [K, V_draft] this step's head logits

    def modules(self) -> list[nn.Module]:
        return [self.heads]

    def reset(self) -> None:
        """Nothing to forget: the heads keep no state between verify steps."""

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> DraftTree:
        """One forward of all heads on ``ctx.hidden[:, -1]`` (the token before the root), then the tree."""
        ids = ctx.input_ids
        if ids.shape[0] != 1:
            raise ConfigError("the medusa drafter proposes for one request at a time (input_ids [1, T]).")
        if ctx.hidden is None:
            raise SpecdecError("the medusa drafter needs the target's hidden states; the verifier returned none.")
        if ctx.hidden.shape[1] == 0:  # a one-token prompt: no hidden state before the root yet
            return DraftTree(ids[:, -1:], ids.new_full((1, 1), -1))
        self._logits = self.heads.logits(ctx.hidden[0, -1]).float()  # [K, V_draft]
        return self.grower.grow(ctx, self._logits[0], self._head_level, self.vocab).tree

    def _head_level(self, tokens: list[int], parents_t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """The grower's "forward" for nodes ``lo .. hi-1`` (one depth d): head d+1's logits for each of them (a
        Medusa head does not see the path above it)."""
        depth = tree_ops.depth_list(parents_t[0, :lo + 1].tolist())[lo]
        return self._logits[depth].expand(1, hi - lo, -1)

    def observe(self, feedback: Feedback) -> None:
        """Nothing to roll back: the next tree reads the hidden states the loop passes in."""
