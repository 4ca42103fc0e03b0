"""EAGLE-style drafter: one decoder layer that autoregresses on the target's features.

At pair position ``i`` the head reads the target's last hidden state ``f_i`` (after its final norm) and the
embedding of token ``x_{i+1}`` (the target's own frozen embedding), and predicts ``f_{i+1}``; a draft LM head turns
that into a distribution over ``x_{i+2}``. Drafting feeds the head its own predicted features, level by level down a
top-k tree. The draft LM head may cover a reduced vocabulary (the most frequent target tokens, mapped back through
``d2t``), which matters on a small target: its full LM head costs as much as several decoder layers.

The head's layer is the target architecture's own decoder layer class (no copied model code), run with a
``DynamicCache`` of its own. After each verify step the draft nodes leave that cache and the accepted path's pairs
go in with the target's *true* features.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from drafters import eagle_batch
from drafters.growing import DraftVocab, DynamicGrowth, TreeGrower
from drafters.tree_shape import TreeShape
from specdec import interop, models
from specdec.algorithms import tree as tree_ops
from specdec.errors import ConfigError, SpecdecError
from specdec.models import checkpoint, hf_cache
from specdec.models.gqa_attention import gqa_attention_on
from specdec.models.surgery import decoder
from specdec.types import DraftContext, DraftTree

KIND = "eagle"


def head_config(target_config, attn_implementation: str = "sdpa"):
    """The target's config cut to one layer (the head's decoder layer has the target's shapes)."""
    cfg = copy.deepcopy(target_config)
    cfg.num_hidden_layers = 1
    cfg._attn_implementation = attn_implementation
    return cfg


class EagleHead(nn.Module):
    """fc(concat(embedding of x_{i+1}, f_i)) -> one decoder layer -> predicted f_{i+1}; ``logits`` over the draft vocab.
    ``input_norm=False``: the layer has no input RMSNorm (EAGLE-1's layout, :mod:`specdec.interop.eagle1`).

    Shapes: ``feats [B, L, H]``, ``embeds [B, L, H]``, ``position_ids [B, L]``, ``mask [B, 1, L, past + L]``
    (additive, or None for causal without a cache) -> ``[B, L, H]``. ``d2t [V_draft]`` maps draft ids to target ids.
    """

    def __init__(self, target_config, layer_cls: type, rotary_cls: type, d2t: torch.Tensor,
                 input_norm: bool = True) -> None:
        super().__init__()
        cfg = head_config(target_config)
        h = cfg.hidden_size
        self.config = cfg
        self.fc = nn.Linear(2 * h, h, bias=True)
        self.layer = layer_cls(cfg, layer_idx=0)
        if not input_norm:  # EAGLE-1's layer: fc's output goes to attention without the input RMSNorm
            if not isinstance(getattr(self.layer, "input_layernorm", None), nn.Module):
                raise ConfigError(f"{layer_cls.__name__} has no input_layernorm to leave out; a head without an "
                                  "input norm (EAGLE-1) needs a Llama-style decoder layer.")
            self.layer.input_layernorm = nn.Identity()
        self.rotary = rotary_cls(config=cfg)
        self.lm_head = nn.Linear(h, len(d2t), bias=False)
        self.register_buffer("d2t", d2t.long().clone())

    @classmethod
    def for_target(cls, target, d2t: torch.Tensor, input_norm: bool = True) -> EagleHead:
        base = decoder(target)
        return cls(target.config, type(base.layers[0]), type(base.rotary_emb), d2t, input_norm)

    def init_from_target(self, target, layer: int = -1) -> None:
        """Warm start: the decoder layer from one of the target's with its output projections zeroed (so the head
        starts as the identity), the draft LM head from the target's rows, fc passing the feature through."""
        base = decoder(target)
        self.layer.load_state_dict(base.layers[layer].state_dict())
        with torch.no_grad():
            for name, p in self.layer.named_parameters():  # the layer starts as the identity on its residual
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    p.zero_()
            rows = target.get_output_embeddings().weight
            self.lm_head.weight.copy_(rows[self.d2t.to(rows.device)])
            h = self.fc.out_features
            self.fc.weight.mul_(0.1)
            self.fc.weight[:, h:].copy_(torch.eye(h, device=self.fc.weight.device))
            self.fc.bias.zero_()

    def attention_modules(self) -> list[nn.Module]:
        """The modules whose ``config`` picks the attention implementation (for ``gqa_attention_on``)."""
        return [self]

    def forward(self, feats: torch.Tensor, embeds: torch.Tensor, position_ids: torch.Tensor,
                mask: torch.Tensor | None = None, cache=None, from_target: bool = True) -> torch.Tensor:
        """``from_target``: whether ``feats`` are the target's or the head's own predictions; the same to this
        head (it predicts target features), not to an EAGLE-3 head."""
        x = self.fc(torch.cat([embeds, feats.to(embeds.dtype)], dim=-1))
        pos_emb = self.rotary(x, position_ids)
        out = self.layer(x, attention_mask=mask, position_ids=position_ids, use_cache=cache is not None,
                         position_embeddings=pos_emb, **hf_cache.cache_kwargs(self.layer, cache))
        return out[0] if isinstance(out, tuple) else out

    def logits(self, g: torch.Tensor) -> torch.Tensor:
        """``[..., V_draft]`` draft logits for predicted features ``g [..., H]``."""
        return self.lm_head(g)


def causal_mask(past: int, n: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Additive ``[1, 1, n, past + n]`` mask: query i sees keys ``0..past + i``."""
    allowed = torch.arange(past + n, device=device)[None] <= (past + torch.arange(n, device=device))[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def reduced_vocab(counts: torch.Tensor, size: int, always: list[int] = ()) -> torch.Tensor:
    """``d2t``: the ``size`` most frequent token ids (``always`` included), ascending. ``size <= 0``: every token."""
    v = len(counts)
    if size <= 0 or size >= v:
        return torch.arange(v)
    keep = {int(t) for t in always if 0 <= int(t) < v}
    order = torch.argsort(counts, descending=True, stable=True).tolist()
    for t in order:
        if len(keep) >= size:
            break
        keep.add(t)
    return torch.tensor(sorted(keep))


def check_fits(cfg: dict, embedding: torch.Tensor | None, target, path) -> None:
    """Refuse a public head (no target fingerprint) made for another target, naming what differs.

    ``cfg``: the checkpoint's meta config (``hidden_size``, ``vocab_size``, ``model_type`` and ``layer``: settings of
    its layer by transformers' config names, e.g. ``rms_norm_eps``); the head runs the target's own layer class
    with the target's settings, so any difference would be an approximation. ``embedding [V, H]``: a token
    embedding the checkpoint carries (EAGLE-1 copies the target's); it must be the target's, up to half-precision
    rounding."""
    tc = target.config
    own = target.get_input_embeddings().weight
    have = {"hidden_size": int(tc.hidden_size), "vocab_size": int(own.shape[0]),
            "model_type": getattr(tc, "model_type", None)}
    want = {k: cfg.get(k) for k in have} | dict(cfg.get("layer") or {})
    diffs = [f"{k}: head {v!r} vs target {have.get(k, getattr(tc, k, None))!r}" for k, v in want.items()
             if v is not None and v != have.get(k, getattr(tc, k, None))]
    if not diffs and embedding is not None and not (
            embedding.shape == own.shape and torch.allclose(embedding.float(), own.detach().float().cpu(),
                                                            rtol=1e-2, atol=1e-3)):
        diffs.append("its token embedding (embed_tokens.weight) is not the target's")
    if diffs:
        raise checkpoint.CheckpointError(
            f"the EAGLE head at {path} was made for another target ({'; '.join(diffs)}). Use a head trained for "
            "this target (python -m train.eagle target=...) or the target it was made for.")


class EagleDrafter:
    """Proposes top-k trees (``choices``) from an EAGLE-style head; lossless with greedy and sampled requests.

    path: a checkpoint written by ``python -m train.eagle`` (None: the one shipped for the default target).
    choices: tree shape (default: the tree the training job chose from validation accuracy, best paths first);
    ``depth``/``width`` build a simple shape instead. max_nodes: this drafter's own node budget (root included),
    when smaller than the decoder's (small trees pay off when verifying many nodes costs more than one).
    dynamic: grow each tree by expected acceptance instead (EAGLE-2; ``top_k`` children per expanded node,
    ``depth`` levels at most, default 6, fewer when a level's best path value is below ``min_value``), cut to the
    step's node budget. The tree is grown by :class:`drafters.growing.TreeGrower` from this head's forward.
    trained: the trained tree shape of ``head`` (when passed in place of a path). allow_pickle: read a public
    pickle checkpoint (an EAGLE-1 ``pytorch_model.bin``; only one you trust). A public EAGLE-1 directory
    (:mod:`specdec.interop.eagle1`) runs with the target's own LM head and is checked against the target
    (:func:`check_fits`). batched: with several greedy requests in a batch, draft one chain per request for all of
    them in one head forward per level (:mod:`drafters.eagle_batch`, as vLLM's EAGLE drafts) instead of each request
    growing its own tree in forwards of its own.
    """

    needs_hidden_states = True
    returns_probs = True

    def __init__(self, target=None, tokenizer=None, path: str | None = None, head: EagleHead | None = None,
                 choices: list[list[int]] | None = None, depth: int | None = None, width: int = 1,
                 dtype: str | None = None, max_nodes: int | None = None, dynamic: bool = False,
                 top_k: int = 4, min_value: float = 0.0, trained: list[list[int]] | None = None,
                 allow_pickle: bool = False, batched: bool = True) -> None:
        if target is None:
            raise ConfigError("the eagle drafter runs on the target's features: pass target=... .")
        growth = DynamicGrowth(dynamic, top_k, int(depth) if depth else 6, min_value)
        if head is None:
            path = path or checkpoint.shipped(KIND)
            state, meta = interop.load_checkpoint(path, kind=KIND, target=target, allow_pickle=allow_pickle)
            cfg = meta["config"]
            if meta.get("target") is None:  # a public head has no target fingerprint: check what it states
                check_fits(cfg, state.pop("embed_tokens.weight", None), target, path)
            head = EagleHead.for_target(target, state["d2t"], input_norm=cfg.get("input_norm", True))
            if cfg.get("lm_head") == "target":  # EAGLE-1: the target's own LM head, in the target's dtype (exact)
                rows = target.get_output_embeddings().weight.detach()
                head.to(rows.dtype)
                state = {**state, "lm_head.weight": rows[state["d2t"].to(rows.device)]}
            checkpoint.load_into(head, state, path)
            trained = cfg.get("choices")
        self.embed = target.get_input_embeddings()
        self.vocab_size = int(self.embed.weight.shape[0])
        d2t = head.d2t
        identity = len(d2t) == self.vocab_size and torch.equal(d2t, torch.arange(self.vocab_size, device=d2t.device))
        # on the target's device as well as in its dtype: the head reads the target's features and embeddings
        self.head = head.to(device=models.device_of(target),
                            dtype=models.resolve_dtype(dtype) if dtype else next(target.parameters()).dtype).eval()
        # top-k and log-softmax run over the draft vocabulary (4096 rows of logits, not 49152), ids mapped back
        self.vocab = DraftVocab(self.vocab_size, None if identity else self.head.d2t)
        # a trained tree lists its best paths first: a smaller node budget keeps those (TreeShape.cut)
        self.grower = TreeGrower(TreeShape.build(choices, depth=depth, width=width, trained=trained, default=(5, 2),
                                                 max_nodes=max_nodes), growth)
        self.batched = batched
        self.reset()

    def spawn(self) -> EagleDrafter:
        """A drafter for another request sharing this one's head (and so its batched forwards)."""
        other = copy.copy(self)
        other.reset()
        return other

    def batches_with(self, other) -> bool:
        return isinstance(other, EagleDrafter) and other.head is self.head

    def propose_batch(self, drafters: list[EagleDrafter], ctxs: list[DraftContext]) -> list[DraftTree]:
        """One chain per greedy request (``drafters[i]`` drafts for ``ctxs[i]``; all spawned from one drafter, so
        they share this head), one head forward per level for all of them (:func:`drafters.eagle_batch.propose_chains`).
        A chain is as long as the tree this drafter would grow for the request's budget (its deepest level when
        dynamic), and a dynamic drafter's ``min_value`` stops it early."""
        if not all(self.batches_with(d) for d in drafters):
            raise SpecdecError("propose_batch takes drafters that share this drafter's head (made with spawn()).")
        trees: list[DraftTree | None] = [None] * len(ctxs)
        rows = []
        for i, (d, ctx) in enumerate(zip(drafters, ctxs)):
            if ctx.hidden is None:
                raise SpecdecError("the eagle drafter needs the target's hidden states; the verifier returned none.")
            if ctx.hidden.shape[1] == 0 and d._pairs == 0:  # a one-token prompt: no feature yet
                root = ctx.input_ids[:, -1:]
                trees[i] = DraftTree(root, root.new_full(root.shape, -1))
            else:
                rows.append(i)
        growth = self.grower.dynamic
        deepest = growth.depth if growth.enabled else self.grower.shape.max_depth
        lengths = [max(0, min(self.grower.shape.budget(ctxs[i].max_nodes) - 1, ctxs[i].max_depth, deepest))
                   for i in rows]
        if rows:
            chains = eagle_batch.propose_chains(self, [drafters[i] for i in rows], [ctxs[i] for i in rows], lengths,
                                                growth.min_value if growth.enabled else 0.0)
            for i, tree in zip(rows, chains):
                trees[i] = tree
        return trees

    def modules(self) -> list[nn.Module]:
        return [self.head]

    def reset(self) -> None:
        self.cache = hf_cache.new_cache()
        self._pairs = 0  # (feature, next token) pairs with true features in the head's cache
        self._g: dict[int, torch.Tensor] = {}  # predicted feature of each node run this step (run order)

    @property
    def dtype(self) -> torch.dtype:
        return self.head.lm_head.weight.dtype

    def propose(self, ctx: DraftContext) -> DraftTree:
        if ctx.input_ids.shape[0] != 1:
            raise ConfigError("the eagle drafter proposes for one request at a time (input_ids [1, T]).")
        if ctx.hidden is None:
            raise SpecdecError("the eagle drafter needs the target's hidden states; the verifier returned none.")
        if ctx.hidden.shape[1] == 0 and self._pairs == 0:
            root = ctx.input_ids[:, -1:]  # a one-token prompt: no feature yet
            return DraftTree(root, root.new_full(root.shape, -1))
        return self.grower.grow(ctx, self._advance(ctx), self._forward_level, self.vocab).tree

    @torch.inference_mode()
    def _advance(self, ctx: DraftContext) -> torch.Tensor:
        """The new (feature, next token) pairs into the head's cache; the root's draft logits ``[V_draft]``."""
        hf_cache.crop(self.cache, self._pairs)
        start, m = self._pairs, ctx.hidden.shape[1]
        nxt = ctx.input_ids[:, start + 1:start + m + 1]
        if nxt.shape[1] != m:
            raise SpecdecError(f"eagle drafter out of step: {m} new features but {nxt.shape[1]} new tokens "
                               f"(had {start} pairs, {ctx.input_ids.shape[1]} committed tokens).")
        pos = torch.arange(start, start + m, device=nxt.device)[None]
        mask = causal_mask(start, m, self.dtype, nxt.device) if m > 1 else None
        with gqa_attention_on(*self.head.attention_modules()):
            g = self.head(ctx.hidden, self.embed(nxt).to(self.dtype), pos, mask, self.cache)
        self._pairs = start + m
        self._g = {0: g[:, -1]}
        return self.head.logits(g[0, -1])

    @torch.inference_mode()
    def _forward_level(self, tokens: list[int], parents_t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """The grower's :data:`~drafters.growing.LevelForward`: each node's predicted feature from its parent's
        predicted feature and its own token's embedding, under a tree mask over the head's cache."""
        sub = parents_t[:, :hi]
        par = sub[0, lo:hi].tolist()
        feats = torch.stack([self._g[max(p, 0)][0] for p in par])[None]  # dead nodes: any feature
        seg = torch.tensor([tokens[lo:hi]], device=parents_t.device)
        mask = tree_ops.segment_mask(sub, lo, hi, self._pairs, self.dtype)
        pos = self._pairs - 1 + tree_ops.depths(sub)[:, lo:hi]
        with gqa_attention_on(*self.head.attention_modules()):
            g = self.head(feats, self.embed(seg).to(self.dtype), pos, mask, self.cache, from_target=False)
        for j, i in enumerate(range(lo, hi)):
            self._g[i] = g[:, j]
        return self.head.logits(g)  # [1, n, V_draft]

    def observe(self, feedback) -> None:
        """Drop every draft node from the head's cache: accepted pairs come back with true features next time."""
        hf_cache.crop(self.cache, self._pairs)
