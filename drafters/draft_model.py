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

import copy
from pathlib import Path

import torch
from torch import nn

from specdec import models
from specdec.algorithms import tree as tree_ops
from specdec.algorithms.sampling import warp_probs
from specdec.errors import ConfigError
from specdec.models import checkpoint, hf_cache
from specdec.models.hf_forward import forward_masked, forward_tokens
from specdec.protocols import Feedback
from specdec.types import DEAD, DraftContext, DraftTree


class DraftModelDrafter:
    """Proposes trees from a small causal LM.

    Greedy requests: each node's children are the draft model's top-k tokens (deterministic candidates, no
    draft probabilities). Sampled requests: children are drawn without replacement from the draft model's
    distribution q, warped like the target's (temperature, top-k, top-p), and the tree reports q as
    ``draft_probs`` so the rejection rule stays lossless.

    path: hub id or local path of the draft model, or a checkpoint directory written by ``python -m
    train.draft_model`` (built on ``target``'s embedding and LM head, in the target's dtype); or pass ``model=``
    directly (it is moved to the target's device, when a target is given). depth / width: tree shape when no
    ``choices`` are given (None: the checkpoint's recommended values,
    else 4 / 1). dtype: of a hub/HF draft model (None: float32). ``vocab_size`` is checked against the target's by
    :func:`specdec.generate`. A trained checkpoint with a draft vocabulary scores only those tokens
    (:class:`DraftVocabHead`); ``full_vocab=True`` uses the target's whole LM head instead.
    """

    needs_hidden_states = False
    returns_probs = True  # when sampling
    dynamic = False  # grow trees by expected acceptance (EAGLE-2 style) instead of a fixed shape
    # the target id of each logit the draft model returns, when it scores a draft vocabulary (EAGLE's reduced
    # LM head) rather than the target's; None: logit i is token i
    draft_ids: torch.Tensor | None = None
    top_k = 4
    dynamic_depth = 6
    min_value = 0.0

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
                model, _ = models.load_target(path, dtype=dtype or "float32", device=device)
        elif target is not None and models.device_of(model) != models.device_of(target):
            model = model.to(models.device_of(target))  # its tokens come from the target's cache and go back there
        depth = int(depth if depth is not None else recommended.get("depth") or 4)
        width = int(width if width is not None else recommended.get("width") or 1)
        if depth < 1 or width < 1:
            raise ConfigError(f"draft_model needs depth >= 1 and width >= 1; got depth={depth}, width={width}.")
        self.model = model.eval()
        head = self.model.get_output_embeddings()
        if isinstance(head, DraftVocabHead):  # logits over the draft vocabulary, ids mapped back through d2t
            self.draft_ids = head.d2t
            self.vocab_size = head.vocab_size
        else:
            self.vocab_size = models.vocab_size(self.model)
        set_dynamic(self, dynamic, top_k, depth, min_value)
        choices = choices if choices is not None else tree_ops.choices_for_shape(depth, width)
        self.parents, self.ranks = tree_ops.topology_from_choices(choices)
        check_contiguous_ranks(self.parents, self.ranks)
        self.depths = tree_ops.depth_list(self.parents)
        self.reset()

    @property
    def device(self) -> torch.device:
        """The draft model's device (the target's): where its inputs go (tree masks follow its logits)."""
        return models.device_of(self.model)

    def reset(self) -> None:
        self.cache = hf_cache.new_cache()
        self._prefix = 0  # committed tokens in the draft cache when the last tree was grown (root included)
        self._ran = 0  # tree nodes (after the root) whose K/V sit in the draft cache after the prefix

    def _shape(self, max_nodes: int, max_depth: int) -> tuple[list[int], list[int]]:
        """The configured tree cut to the node budget (and the drafter's own ``max_nodes`` cap, if any) and the
        depth limit: nodes taken in ``self.priority`` order (default: node order; trained trees: best first)."""
        cap = getattr(self, "max_nodes", None)
        priority = getattr(self, "priority", None) or list(range(1, len(self.parents)))
        return tree_ops.cut_tree(self.parents, self.ranks, priority, min(max_nodes, cap or max_nodes), max_depth)

    def propose(self, ctx: DraftContext) -> DraftTree:
        ids = ctx.input_ids
        if ids.shape[0] != 1:
            raise ConfigError(f"the {type(self).__name__} proposes for one request at a time (input_ids [1, T]).")
        root_logits = self._advance(ctx)  # [1, V]
        self._run_of = None
        if self.dynamic:
            return self._grow_dynamic(int(ids[0, -1]), root_logits, ctx.max_nodes, ctx.max_depth, ids.device)
        parents, ranks = self._shape(ctx.max_nodes, ctx.max_depth)
        tokens = [int(ids[0, -1])] + [0] * (len(parents) - 1)
        self._ran = 0
        sampling = ctx.sampling if ctx.sampling is not None and ctx.sampling.do_sample else None
        vocab = root_logits.shape[-1] if self.draft_ids is None else self.vocab_size
        probs = torch.zeros(1, len(parents), vocab, device=ids.device) if sampling else None
        if len(parents) > 1:
            self._grow(tokens, parents, ranks, root_logits, sampling, ctx.generator, probs)
        return DraftTree(torch.tensor([tokens], device=ids.device), torch.tensor([parents], device=ids.device), probs)

    def _advance(self, ctx: DraftContext) -> torch.Tensor:
        """Bring the draft cache up to the committed tokens; the root's next-token logits ``[1, V]``.

        Sets ``self._prefix``: the cache entries before the tree's first node (the root's entry is the last).
        """
        tail = ctx.input_ids[:, hf_cache.cache_length(self.cache):].to(self.device)  # committed, not yet seen
        self._prefix = ctx.input_ids.shape[1]
        return forward_tokens(self.model, self.cache, tail).logits[:, -1]

    def _grow(self, tokens: list[int], parents: list[int], ranks: list[int], root_logits: torch.Tensor,
              sampling, generator, probs: torch.Tensor | None) -> None:
        """Fill ``tokens`` level by level: node i takes candidate ``ranks[i]`` of its parent's candidates.

        A node whose parent has too few candidates (sampling from a distribution with fewer tokens left than
        asked for) becomes dead: ``parents[i] = -2``, and so does its subtree.
        """
        depths = tree_ops.depth_list(parents)
        cands = {0: self._candidates(root_logits[0], max(ranks[1:]) + 1, sampling, generator, probs, 0)}
        lo = 1
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
            need = [ranks[j] for j in range(hi, len(parents)) if lo <= parents[j] < hi]
            if need:  # some node of this level has children: run the level through the draft model
                logits = self._forward_level(tokens, torch.tensor([parents], device=root_logits.device), lo, hi)
                k = max(need) + 1
                for i in range(lo, hi):
                    if parents[i] >= 0:
                        cands[i] = self._candidates(logits[0, i - lo], k, sampling, generator, probs, i)
            lo = hi

    def _grow_dynamic(self, root: int, root_logits: torch.Tensor, max_nodes: int, max_depth: int,
                      device: torch.device | None = None) -> DraftTree:
        """EAGLE-2's dynamic tree (:func:`specdec.algorithms.tree.grow_dynamic`): each level's expanded nodes run through the
        draft model in one forward, which gives their children's distributions.

        Candidates are the draft's top-k tokens whether or not the request samples, and no ``draft_probs`` are
        reported: the rejection rule then treats them as deterministic candidates (point masses), which is lossless
        however they were chosen. ``device``: where the tree is made (the committed ids'; None: the draft model's).
        """
        # a tree of max_nodes nodes is at most max_nodes - 1 deep and never needs more expanded nodes per level
        k, depth_limit = min(self.top_k, max(max_nodes - 1, 1)), min(self.dynamic_depth, max_depth, max_nodes - 1)
        run_tokens, run_parents = [root], [-1]  # the nodes run through the draft model (its cache, in order)
        run = {0: 0}  # created node -> its index in the run

        def expand(level, tokens, parents, chosen):
            lo = len(run_tokens)
            for i in chosen:
                run_tokens.append(tokens[i])
                run_parents.append(run[parents[i]])
                run[i] = len(run_tokens) - 1
            logits = self._forward_level(run_tokens, torch.tensor([run_parents], device=root_logits.device), lo,
                                         len(run_tokens))
            return [torch.log_softmax(logits[0, j].float(), dim=-1) for j in range(len(chosen))]

        self._ran = 0
        root_logp = torch.log_softmax(root_logits[0].float(), dim=-1)
        tree, keep = tree_ops.grow_dynamic(root, root_logp, expand, top_k=k, depth=depth_limit, max_nodes=max_nodes,
                                           min_value=self.min_value, vocab=self.draft_ids, device=device)
        self._run_of = [run.get(i) for i in keep]
        return tree

    def _candidates(self, logits: torch.Tensor, k: int, sampling, generator, probs: torch.Tensor | None,
                    node: int) -> list[int]:
        """Top-k tokens (greedy) or k tokens drawn without replacement from the warped q (sampling).

        logits: over the draft model's vocabulary (``draft_ids``); greedy picks there and maps the ids back, sampling
        works on the target's vocabulary (-inf outside the draft one), where ``probs`` must report q."""
        if sampling is None:
            top = logits.topk(k).indices
            return (top if self.draft_ids is None else self.draft_ids[top]).tolist()
        if self.draft_ids is not None:
            logits = to_target_vocab(logits, self.draft_ids, self.vocab_size)
        q = warp_probs(logits, sampling)
        probs[0, node] = q
        k = min(k, int((q > 0).sum()))
        return torch.multinomial(q, k, replacement=False, generator=generator).tolist()

    def _forward_level(self, tokens: list[int], parents_t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        seg = torch.tensor([tokens[lo:hi]], device=parents_t.device)
        sub = parents_t[:, :hi]
        chain = tree_ops.is_chain(sub)
        mask = None if chain else tree_ops.segment_mask(sub, lo, hi, self._prefix, self.model.dtype)
        pos = (self._prefix - 1 + tree_ops.depths(sub)[:, lo:hi])
        out = forward_masked(self.model, self.cache, seg, mask, pos)
        self._ran = hi - 1
        return out.logits

    def observe(self, feedback: Feedback) -> None:
        """Keep the accepted nodes the draft model already ran; drop the rest of the tree from its cache."""
        path = feedback.acceptance.accepted_nodes(0)[1:]
        if getattr(self, "_run_of", None) is not None:  # a dynamic tree: nodes sit in the cache in run order
            path = [r for r in (self._run_of[n] for n in path) if r is not None]
        keep = [node - 1 for node in path if node - 1 < self._ran]
        hf_cache.keep_positions(self.cache, self._prefix, keep)
        self._ran = 0


def to_target_vocab(logits: torch.Tensor, draft_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Draft-vocabulary logits ``[..., V_draft]`` as target-vocabulary logits ``[..., vocab_size]``: entry ``i`` goes
    to token ``draft_ids[i]``, every other token gets -inf."""
    out = logits.new_full((*logits.shape[:-1], vocab_size), float("-inf"))
    out[..., draft_ids] = logits
    return out


def set_dynamic(drafter, dynamic: bool, top_k: int, depth: int | None, min_value: float = 0.0) -> None:
    """Configure EAGLE-2-style dynamic trees on a drafter (``depth``: levels grown at most, default 6; growth
    stops at a level whose best path value is below ``min_value``)."""
    if top_k < 1:
        raise ConfigError(f"top_k must be >= 1; got {top_k}.")
    if not 0.0 <= min_value < 1.0:
        raise ConfigError(f"min_value is a path probability threshold in [0, 1); got {min_value}.")
    drafter.dynamic, drafter.top_k, drafter.min_value = bool(dynamic), int(top_k), float(min_value)
    drafter.dynamic_depth = int(depth) if depth else 6


def check_contiguous_ranks(parents: list[int], ranks: list[int]) -> None:
    """Each node's children must use candidate ranks 0..k-1 with no gap.

    When sampling, siblings are drawn without replacement in rank order; a skipped rank would be drawn and then
    left out of the tree, and the rejection rule (which removes only the tried siblings from q) would be wrong.
    """
    seen: dict[int, list[int]] = {}
    for p, r in zip(parents[1:], ranks[1:]):
        seen.setdefault(p, []).append(r)
    for p, rs in seen.items():
        if sorted(rs) != list(range(len(rs))):
            raise ConfigError(
                f"draft tree choices give node {p} children of ranks {sorted(rs)}; use ranks 0..{len(rs) - 1} "
                "without gaps (add the missing choices)."
            )


# ---------------------------------------------------------------------------------------------- distilled draft models

KIND = "draft_model"


def decoder(model) -> nn.Module:
    """The causal LM's inner decoder with ``.layers`` and ``.norm`` (``model.model`` for Llama, Qwen2, Mistral...)."""
    inner = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if not isinstance(getattr(inner, "layers", None), nn.ModuleList) or not isinstance(getattr(inner, "norm", None),
                                                                                        nn.Module):
        raise ConfigError(f"this drafter needs a decoder with .layers and .norm (Llama-style); "
                          f"{type(model).__name__} has none under .{getattr(model, 'base_model_prefix', 'model')}.")
    return inner


def own_modules(model) -> nn.ModuleDict:
    """What a distilled draft model does not share with its target: its decoder layers and final norm.

    The checkpoint's tensors are this view's state dict (keys ``layers.<i>.*``, ``norm.*``).
    """
    base = decoder(model)
    return nn.ModuleDict({"layers": base.layers, "norm": base.norm})


def spread_layers(num_layers: int, target_layers: int) -> list[int]:
    """``num_layers`` target layer indices evenly spaced from the first to the last, e.g. 4 of 30 -> [0, 10, 19, 29].

    One layer: the first (the target's own token representation path starts there).
    """
    if not 1 <= num_layers <= target_layers:
        raise ConfigError(f"a draft model needs 1 to {target_layers} layers (the target's count); got {num_layers}.")
    if num_layers == 1:
        return [0]
    return [round(i * (target_layers - 1) / (num_layers - 1)) for i in range(num_layers)]


def resolve_init_layers(init_layers, num_layers: int | None, target_layers: int) -> list[int]:
    """Target layer indices to initialise the draft's layers from: ``"spread"`` or an explicit list
    (negative indices count from the end, e.g. ``[0, -1]``); the list must have ``num_layers`` entries."""
    if init_layers in (None, "spread"):
        return spread_layers(int(num_layers), target_layers)
    if isinstance(init_layers, str):
        raise ConfigError(f"init_layers must be 'spread' or a list of target layer indices; got {init_layers!r}.")
    layers = [int(i) for i in init_layers]
    bad = [i for i in layers if not -target_layers <= i < target_layers]
    if bad or not layers:
        raise ConfigError(f"init_layers {layers} must be indices of the target's {target_layers} layers.")
    if num_layers is not None and len(layers) != int(num_layers):
        raise ConfigError(f"init_layers lists {len(layers)} layers but num_layers is {num_layers}; make them agree.")
    return [i % target_layers for i in layers]


def draft_config(target, layers: list[int]):
    """The target's HF config cut to the chosen layers (per-layer settings such as ``layer_types`` follow them)."""
    cfg = copy.deepcopy(target.config)
    n = int(cfg.num_hidden_layers)
    for key in ("layer_types",):  # per-layer lists must keep the kept layers' entries
        value = getattr(cfg, key, None)
        if isinstance(value, list) and len(value) == n:
            setattr(cfg, key, [value[i] for i in layers])
    cfg.num_hidden_layers = len(layers)
    return cfg


def _new_model(target, config, dtype: torch.dtype) -> nn.Module:
    """An instance of the target's own model class for ``config`` in ``dtype`` on the target's device (random
    weights, no shared tensors)."""
    impl = getattr(target.config, "_attn_implementation", None)
    config._attn_implementation = impl if impl in ("eager", "sdpa") else "sdpa"  # not a verifier's paged kernel
    model = type(target)(config).to(device=target.device, dtype=dtype)
    model.generation_config = copy.deepcopy(target.generation_config)
    return model.eval()


class DraftVocabHead(nn.Linear):
    """The target's LM head cut to a draft vocabulary: rows ``d2t`` (the most frequent target tokens, ascending ids).

    ``[..., H] -> [..., V_draft]`` logits, equal to the target head's logits at those ids. On a small target the full
    head is a large part of a draft token's cost (49152 x 576 weights read per call for SmolLM2-135M); 4096 rows keep
    nearly every token a draft gets accepted with. ``vocab_size``: the target's (for the vocabulary check).
    ``source`` names where ``d2t`` came from in the error raised when an id is outside the target's vocabulary.
    """

    def __init__(self, target_head: nn.Module, d2t: torch.Tensor, source: str | Path = "<memory>") -> None:
        w = target_head.weight
        self.vocab_size = int(w.shape[0])
        bad = d2t[(d2t < 0) | (d2t >= self.vocab_size)]
        if len(bad):
            raise checkpoint.CheckpointError(f"{source}: draft vocabulary ids {bad[:4].tolist()} are outside the "
                                             f"target's {self.vocab_size} tokens; it was made for another target.")
        super().__init__(w.shape[1], len(d2t), bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.weight.copy_(w[d2t.to(w.device)])
        self.register_buffer("d2t", d2t.long().clone().to(w.device))


def _share_vocab(model, target) -> None:
    """Use the target's embedding and LM head modules (no copy; the draft model must already be in its dtype)."""
    model.set_input_embeddings(target.get_input_embeddings())
    model.set_output_embeddings(target.get_output_embeddings())


@torch.no_grad()
def init_from_target(target, layers: list[int], dtype: torch.dtype | None = None) -> nn.Module:
    """A draft model whose layer ``j`` is a copy of target layer ``layers[j]``, with copies of the target's final
    norm, embedding and LM head (tied as the target's): shares no tensor with the target, so training it leaves
    the target untouched. With every target layer it computes the target's logits."""
    model = _new_model(target, draft_config(target, layers), dtype or target.dtype)
    src = decoder(target)
    for j, i in enumerate(layers):
        decoder(model).layers[j].load_state_dict(src.layers[i].state_dict())
    decoder(model).norm.load_state_dict(src.norm.state_dict())
    model.get_input_embeddings().load_state_dict(target.get_input_embeddings().state_dict())
    model.get_output_embeddings().load_state_dict(target.get_output_embeddings().state_dict())
    return model


def from_state(target, hf_config: dict, state: dict[str, torch.Tensor], path: str | Path = "<memory>",
               dtype: torch.dtype | None = None, full_vocab: bool = False) -> nn.Module:
    """A draft model on the target's embedding and LM head (shared) with its own layers + norm from ``state``
    (the :func:`own_modules` state dict), in ``dtype`` (default the target's). A ``d2t`` entry in ``state`` (and
    ``full_vocab`` False) gives it a :class:`DraftVocabHead` over those target ids instead of the full LM head."""
    dtype = dtype or target.dtype
    state = dict(state)
    d2t = state.pop("d2t", None)
    model = _new_model(target, type(target.config).from_dict(hf_config), dtype)
    _share_vocab(model, target)
    checkpoint.load_into(own_modules(model), {k: v.to(dtype) for k, v in state.items()}, path)
    if d2t is not None and not full_vocab:
        model.set_output_embeddings(DraftVocabHead(target.get_output_embeddings(), d2t, path))
    return model


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
