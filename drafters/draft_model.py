"""Draft-model drafter: a small causal LM that shares the target's vocabulary proposes a chain or a top-k tree.

The tree shape is a list of Medusa-style "choices" (paths of candidate ranks); by default ``width`` candidates at
depth 1, each continued greedily to ``depth`` (``width=1``: a plain chain). The tree grows level by level: one
draft-model forward per level over all of that level's nodes, with a tree mask over the draft model's own KV cache.
After each verify step the draft cache keeps the committed prefix plus the accepted nodes it already ran, so it
never recomputes what it has, and never keeps what the target rejected.

The draft model is a hub id / HF directory, or a checkpoint written by ``python -m train.draft_model``: a few
decoder layers (initialised from the target's own, then distilled) plus a final norm, shipped without the embedding
and LM head, which are the target's own and are taken from it at load time (:func:`load_checkpoint_model`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from drafters.growing import DraftVocab, DynamicGrowth, Grown, TreeGrower
from drafters.tree_shape import TreeShape
from specdec import models
from specdec.algorithms import tree as tree_ops
from specdec.errors import ConfigError
from specdec.models import checkpoint, hf_cache
from specdec.models.families import check_servable
from specdec.models.hf_forward import forward_masked, forward_tokens
from specdec.models.surgery import DraftVocabHead, from_state
from specdec.protocols import Feedback
from specdec.types import DraftContext, DraftTree


class DraftModelDrafter:
    """Proposes trees from a small causal LM.

    Greedy requests: each node's children are the draft model's top-k tokens (deterministic candidates, no
    draft probabilities). Sampled requests: children are drawn without replacement from the draft model's
    distribution q, warped like the target's (temperature, top-k, top-p), and the tree reports q as
    ``draft_probs`` so the rejection rule stays lossless.

    path: hub id or local path of the draft model, or a checkpoint directory written by ``python -m
    train.draft_model`` (built on ``target``'s embedding and LM head, in the target's dtype); or pass ``model=``
    directly (it is moved to the target's device, when a target is given). depth / width: tree shape when no
    ``choices`` are given (None: the checkpoint's recommended values, else 4 / 1). dtype: of a hub/HF draft model
    (None: float32). A trained checkpoint with a draft vocabulary scores only those tokens
    (:class:`~specdec.models.surgery.DraftVocabHead`); ``full_vocab=True`` uses the target's whole LM head instead.
    dynamic: grow each tree by expected acceptance (EAGLE-2; ``top_k`` children per expanded node, ``depth``
    levels at most, fewer when a level's best path value is below ``min_value``), cut to the step's node budget.
    """

    needs_hidden_states = False
    returns_probs = True  # when sampling

    def __init__(self, target=None, tokenizer=None, path: str | None = None, model=None, depth: int | None = None,
                 width: int | None = None, choices: list[list[int]] | None = None, dtype: str | None = None,
                 dynamic: bool = False, top_k: int = 4, min_value: float = 0.0, full_vocab: bool = False) -> None:
        recommended: dict = {}
        if model is None:
            if not path:
                raise ConfigError(
                    "the draft_model drafter needs a model: set drafter.path=<hub id or local path> "
                    "(a causal LM sharing the target's tokenizer), or pass model=... in Python."
                )
            if checkpoint.is_checkpoint(path):
                model, meta = load_checkpoint_model(target, path, dtype, full_vocab=full_vocab)
                recommended = meta["config"]
            else:
                device = models.device_of(target) if target is not None else "cpu"
                model, _ = models.load_target(path, dtype=dtype or "float32", device=device, role="draft model")
        elif target is not None and models.device_of(model) != models.device_of(target):
            model = model.to(models.device_of(target))  # its tokens come from the target's cache and go back there
        depth = int(depth if depth is not None else recommended.get("depth") or 4)
        width = int(width if width is not None else recommended.get("width") or 1)
        if depth < 1 or width < 1:
            raise ConfigError(f"draft_model needs depth >= 1 and width >= 1; got depth={depth}, width={width}.")
        check_servable(model, role="draft model")
        self.model = model.eval()
        head = self.model.get_output_embeddings()
        # logits over a draft vocabulary (ids mapped back through d2t), or over the model's whole vocabulary
        self.vocab = DraftVocab(head.vocab_size, head.d2t) if isinstance(head, DraftVocabHead) else \
            DraftVocab(models.vocab_size(self.model))
        self.vocab_size = self.vocab.size
        self.grower = TreeGrower(TreeShape.build(choices, depth=depth, width=width),
                                 DynamicGrowth(dynamic, top_k, depth, min_value))
        self.reset()

    @property
    def device(self) -> torch.device:
        """The draft model's device (the target's): where its inputs go (tree masks follow its logits)."""
        return models.device_of(self.model)

    def modules(self) -> list[nn.Module]:
        return [self.model]

    def reset(self) -> None:
        self.cache = hf_cache.new_cache()
        self._prefix = 0  # committed tokens in the draft cache when the last tree was grown (root included)
        self._grown: Grown | None = None  # the last tree and which of its nodes ran through the draft model

    def propose(self, ctx: DraftContext) -> DraftTree:
        if ctx.input_ids.shape[0] != 1:
            raise ConfigError(f"the {type(self).__name__} proposes for one request at a time (input_ids [1, T]).")
        # bring the draft cache up to the committed tokens; the root's entry is the last of the prefix
        tail = ctx.input_ids[:, hf_cache.cache_length(self.cache):].to(self.device)
        self._prefix = ctx.input_ids.shape[1]
        root_logits = forward_tokens(self.model, self.cache, tail).logits[0, -1]  # [V']
        self._grown = self.grower.grow(ctx, root_logits, self._forward_level, self.vocab)
        return self._grown.tree

    def _forward_level(self, tokens: list[int], parents_t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """The grower's :data:`~drafters.growing.LevelForward`: nodes ``lo .. hi-1`` through the draft model, each
        seeing the prefix and its own ancestors in the draft cache (a chain needs no mask)."""
        seg = torch.tensor([tokens[lo:hi]], device=parents_t.device)
        sub = parents_t[:, :hi]
        mask = None if tree_ops.is_chain(sub) else tree_ops.segment_mask(sub, lo, hi, self._prefix, self.model.dtype)
        pos = self._prefix - 1 + tree_ops.depths(sub)[:, lo:hi]
        key_pos = None if mask is None else tree_ops.segment_key_positions(sub, hi, self._prefix)
        return forward_masked(self.model, self.cache, seg, mask, pos, key_pos=key_pos).logits

    def observe(self, feedback: Feedback) -> None:
        """Keep the accepted nodes the draft model already ran; drop the rest of the tree from its cache."""
        keep = self._grown.cached(feedback.acceptance.accepted_nodes(0)) if self._grown is not None else []
        hf_cache.keep_positions(self.cache, self._prefix, keep)
        self._grown = None


# ---------------------------------------------------------------------------------------------- distilled draft models

KIND = "draft_model"


def load_checkpoint_model(target, path: str | Path, dtype: str | None = None,
                          full_vocab: bool = False) -> tuple[nn.Module, dict]:
    """``(draft model, checkpoint meta)`` for a checkpoint of ``python -m train.draft_model``: kind and target
    fingerprint checked, built on the target's embedding and LM head (its draft vocabulary's rows, when the
    checkpoint has one and ``full_vocab`` is False), in the target's dtype."""
    if target is None:
        raise ConfigError(f"{path} is a train/ checkpoint: the draft model is built on the target's embedding and "
                          "LM head, so pass target=... .")
    if dtype is not None and models.resolve_dtype(dtype) != target.dtype:
        raise ConfigError(f"a trained draft model runs in the target's dtype ({target.dtype}); leave drafter.dtype "
                          f"unset (got {dtype!r}).")
    state, meta = checkpoint.load(path, kind=KIND, target=target)
    hf_config = meta["config"].get("hf_config")
    if not isinstance(hf_config, dict):
        raise checkpoint.CheckpointError(f"{path}/{checkpoint.META} lacks config.hf_config; re-export it with "
                                         "python -m train.draft_model.")
    return from_state(target, hf_config, state, path, full_vocab=full_vocab), meta
