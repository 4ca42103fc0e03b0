"""The paged verifier: draft trees of many requests through the target in one forward, over a paged KV cache.

It plugs into any transformers model whose attention layers call ``ALL_ATTENTION_FUNCTIONS`` (Llama, Qwen2, Mistral,
...): :data:`verifiers.paged.attention.ATTENTION_NAME` is registered with transformers' ``AttentionInterface``, and
only while one of our forwards runs is the model's ``config._attn_implementation`` switched to it — no copied modeling
code, and the model behaves as before outside. Each forward makes a :class:`PagedForward` the active step for every
attention layer, which writes the new tokens' K/V into their slots and attends over the paged
prefix plus the tree (:mod:`verifiers.paged.attention`; :func:`verifiers.paged.kernels.paged_tree_attention_sdpa` on a
CPU, the Triton kernel on a GPU, or the plain-torch reference), one call per attention group of similar requests
(:mod:`verifiers.paged.groups`).

It implements the :class:`~specdec.protocols.Verifier` protocol's request operations (``start`` / ``score`` /
``commit`` / ``release``, keyed by request id) for any number of live requests, which the batching engine
(:mod:`specdec.serving.engine`) drives for one request as for many.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from specdec.algorithms import tree as tree_ops
from specdec.errors import SpecdecError
from specdec.kernels.greedy_head import ScreenedArgmax, screenable
from specdec.kernels.greedy_head import kind as screen_kind
from specdec.models.families import check_paged
from specdec.models.hf_forward import hidden_width, select_hidden
from specdec.protocols import VerifierCapabilities
from specdec.types import DEAD, DraftTree, HiddenSpec, VerifyOutput
from verifiers.paged import cpu_kernel, layer_kernel, whole_forward
from verifiers.paged.attention import AttentionGroup, PackedRows, PagedForward, paged_attention_on, pick_kernel
from verifiers.paged.cache import PagedKVCache
from verifiers.paged.cpu_kernel import paged_tree_attention_cpp
from verifiers.paged.groups import plan_groups
from verifiers.paged.kernels import in_place_mask, paged_tree_attention_sdpa


def causal_mask(n: int, device=None) -> torch.Tensor:
    """``[1, n, n]`` bool lower-triangular: a chain's ancestor mask."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()[None]


def packed(x: torch.Tensor, pack: torch.Tensor | None) -> torch.Tensor:
    """``[B, N]`` -> the live entries as one row ``[1, T]`` (all of them when ``pack`` is None)."""
    return x.reshape(1, -1) if pack is None else x.reshape(-1)[pack][None]


def unpacked(x: torch.Tensor, pack: torch.Tensor | None, b: int, n: int) -> torch.Tensor:
    """Packed rows ``[T, F]`` back into the padded layout ``[B, N, F]`` (zeros at dead nodes)."""
    if pack is None:
        return x.view(b, n, -1)
    out = x.new_zeros(b * n, x.shape[-1])
    out[pack] = x
    return out.view(b, n, -1)


class PagedVerifier:
    """Tree verification over a :class:`~verifiers.paged.cache.PagedKVCache` shared by all requests.

    num_blocks x block_size positions are available in all (per layer, K and V); share_prefixes lets requests with
    a common prompt prefix share its blocks; kernel: ``auto`` | ``cpp`` | ``sdpa`` | ``torch`` | ``triton``; group_attention: in
    a batch, attend in groups of similar requests (tree size, prefix length; :mod:`verifiers.paged.groups`) rather
    than padding all of them to the largest (same outputs); screen_greedy: greedy steps take each node's argmax from
    a bfloat16 screen of the LM head checked in float32 (:mod:`specdec.kernels.greedy_head`: exact, half the head's
    weight traffic) where the target and CPU allow it.
    """

    capabilities = VerifierCapabilities(hidden_states=True, greedy_scoring=True, batching=True)

    def __init__(self, model, num_blocks: int = 1024, block_size: int = 16, kernel: str = "auto",
                 share_prefixes: bool = True, group_attention: bool = True, screen_greedy: bool = True) -> None:
        cfg = model.config
        self.spec = check_paged(model)  # refuses a family the paged kernels cannot serve; its windows and softcap
        self.model = model
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.cache = PagedKVCache(cfg.num_hidden_layers, kv_heads, head_dim, num_blocks, block_size,
                                  dtype=model.dtype, device=model.device, share_prefixes=share_prefixes)
        self.kernel = pick_kernel(kernel, model.device, model.dtype)
        self.heads_per_kv = cfg.num_attention_heads // kv_heads
        self.group_attention = group_attention
        self._pending: dict[Hashable, DraftTree] = {}
        self.greedy_head = ScreenedArgmax(model.get_output_embeddings()) \
            if screen_greedy and screenable(model) else None

    # --- the request operations ----------------------------------------------------------------------------

    def start(self, request_id: Hashable, input_ids: torch.Tensor, output_hidden: HiddenSpec = False) -> torch.Tensor | None:
        """Cache ``input_ids [1, T]`` for a new request (the prompt minus its last token, the first tree's root).

        Leading blocks another live request already holds are shared, not recomputed (not when ``output_hidden``:
        the caller needs every position's hidden state). Returns hidden ``[1, T, H]`` if asked.
        """
        tokens = input_ids[0].tolist()
        cached = self.cache.add(request_id, [] if output_hidden else tokens)
        try:
            new = input_ids[:, cached:]
            hidden = None
            if new.shape[1] > 0:
                slots = self.cache.reserve(request_id, new.shape[1])
                out = self._forward([request_id], new, causal_mask(new.shape[1], new.device),
                                    torch.arange(cached, cached + new.shape[1], device=new.device)[None],
                                    slots, torch.tensor([cached], device=new.device), output_hidden, logits_to_keep=1)
                self.cache.commit(request_id, range(new.shape[1]))
                hidden = out.hidden
            self.cache.register_prefix(request_id, tokens)
        except BaseException:
            self.cache.free(request_id)
            raise
        if output_hidden and hidden is None:
            hidden = input_ids.new_zeros(1, 0, hidden_width(self.model.config, output_hidden), dtype=self.model.dtype)
        return hidden

    def score(self, request_ids: Sequence[Hashable], trees: Sequence[DraftTree], output_hidden: HiddenSpec = False,
              greedy: bool = False) -> VerifyOutput:
        """One forward over every request's tree (each ``[1, n_i]``), padded to one node budget with dead nodes
        (which the dense layers never see: only live nodes are packed into the model's input). ``greedy``: only
        each node's argmax is needed; with the screened head it comes back as ``greedy [B, N]`` (no logits).

        Reserves KV for every request first: on :class:`~specdec.serving.block_allocator.KVBlocksExhausted` nothing
        was reserved (the requests reserved before the failing one are rolled back) and the error names the request in
        ``.request_id``. Returns logits ``[B, N, V]`` (hidden ``[B, N, H]``); rows past a tree's size are padding.
        """
        batch = tree_ops.pad_trees(trees)
        done, slots = [], []
        try:
            for rid in request_ids:
                slots.append(self.cache.reserve(rid, batch.num_nodes))
                done.append(rid)
        except SpecdecError as e:
            for rid in done:
                self.cache.seqs[rid].reserved = 0  # blocks stay with the request; the next reserve reuses them
            e.request_id = request_ids[len(done)]
            raise
        prefix = torch.tensor([self.cache.length(r) for r in request_ids], device=batch.tokens.device)
        out = self._forward(request_ids, batch.tokens, tree_ops.ancestor_mask(batch.parents),
                            tree_ops.position_ids(batch.parents, prefix), torch.cat(slots), prefix, output_hidden,
                            live=batch.parents != DEAD, greedy=greedy)
        for rid, t in zip(request_ids, trees):
            self._pending[rid] = t
        return out

    def commit(self, request_id: Hashable, keep: Sequence[int]) -> None:
        """Keep the accepted nodes ``keep`` (root first) of the request's last scored tree."""
        if self._pending.pop(request_id, None) is None:
            raise SpecdecError(f"commit for request {request_id!r} without a score before it.")
        self.cache.commit(request_id, list(keep))

    def release(self, request_id: Hashable) -> None:
        """The request is finished (or preempted): its blocks go back to the pool."""
        self._pending.pop(request_id, None)
        if request_id in self.cache.seqs:
            self.cache.free(request_id)

    @property
    def num_blocks(self) -> int:
        return self.cache.allocator.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.cache.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return self.cache.allocator.blocks_for(num_tokens)

    def cached_length(self, request_id: Hashable) -> int:
        return self.cache.length(request_id) if request_id in self.cache.seqs else 0

    def cost_key(self) -> dict:
        """The paged KV layout, its attention kernel, and whether greedy tokens come from the screened head."""
        return {"kv": "paged", "lm_head": screen_kind() if self.greedy_head is not None else "logits",
                "attention_kernel": self.kernel.__name__ + (f"/v{cpu_kernel.VERSION}" if self.kernel is
                                                            paged_tree_attention_cpp else "")}

    # --- the forward -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _forward(self, request_ids: Sequence[Hashable], tokens: torch.Tensor, tree_mask: torch.Tensor,
                 position_ids: torch.Tensor, slots: torch.Tensor, prefix_lens: torch.Tensor, output_hidden: HiddenSpec,
                 logits_to_keep: int = 0, live: torch.Tensor | None = None, greedy: bool = False) -> VerifyOutput:
        """``tokens [B, N]`` at ``position_ids [B, N]`` after each request's ``prefix_lens [B]`` cached positions,
        into the slots ``[B * N]`` that :meth:`PagedKVCache.reserve` returned.

        Only ``live [B, N]`` nodes (default: all) run through the model, packed into one row; logits ``[B, N, V]``
        (hidden ``[B, N, H]``) come back in the padded layout, zeros at dead nodes. ``logits_to_keep=1`` (a
        one-sequence prefill) returns the last node's logits only. ``greedy`` (with the screened head): the decoder
        alone runs, and ``greedy [B, N]`` (0 at dead nodes) comes back instead of the logits.
        """
        b, n = tokens.shape
        dev = tokens.device
        if live is not None and bool(live.all()):
            live = None
        pack = None if live is None else live.reshape(-1).nonzero().flatten()  # [T]
        slots = slots.to(dev) if pack is None else slots.to(dev)[pack]
        if self.kernel is paged_tree_attention_cpp:  # every live node in one call: no groups, no padding
            grid = torch.arange(b * n, device=dev) if pack is None else pack
            rows = PackedRows(grid // n, grid % n, self.cache.block_tables(request_ids).to(dev).long().contiguous(),
                              prefix_lens.to(dev).long().contiguous(), tree_mask.expand(b, n, n).bool().contiguous())
            step = PagedForward(self.cache, slots, (), self.kernel, self.spec, rows)
        else:
            step = PagedForward(cache=self.cache, slots=slots, kernel=self.kernel, spec=self.spec,
                                groups=self._groups(request_ids, tree_mask.expand(b, n, n), prefix_lens.to(dev), live))
        if step.rows is not None and output_hidden in (False, True) and not logits_to_keep \
                and layer_kernel.available():  # every layer whole in one call: no model loop around them
            with paged_attention_on(self.model, step):
                h = whole_forward.decoder_hidden(self.model, layer_kernel.PagedWholeLayer(step),
                                                 packed(tokens, pack), packed(position_ids, pack))  # [T, H]
            if h is not None:
                hidden = unpacked(h, pack, b, n) if output_hidden else None
                if greedy and self.greedy_head is not None:
                    return VerifyOutput(logits=None, hidden=hidden,
                                        greedy=unpacked(self.greedy_head(h)[:, None], pack, b, n)[..., 0])
                logits = self.model.get_output_embeddings()(h[None])[0]  # as the model's own forward calls its head
                return VerifyOutput(logits=unpacked(logits, pack, b, n), hidden=hidden)
        if greedy and self.greedy_head is not None and not logits_to_keep:
            with paged_attention_on(self.model, step):
                dec = self.model.get_decoder()(input_ids=packed(tokens, pack), position_ids=packed(position_ids, pack),
                                               use_cache=False, output_hidden_states=isinstance(output_hidden, tuple))
            h = dec.last_hidden_state[0]  # [T, H]
            tokens_ = self.greedy_head(h)[:, None]  # [T, 1]
            hidden = select_hidden(output_hidden, dec.last_hidden_state, dec.hidden_states)
            return VerifyOutput(logits=None, hidden=None if hidden is None else unpacked(hidden[0], pack, b, n),
                                greedy=unpacked(tokens_, pack, b, n)[..., 0])
        with paged_attention_on(self.model, step):
            out = self.model(input_ids=packed(tokens, pack), position_ids=packed(position_ids, pack), use_cache=False,
                             output_hidden_states=bool(output_hidden), logits_to_keep=logits_to_keep)
        hidden = select_hidden(output_hidden, out.hidden_states[-1], out.hidden_states) if output_hidden else None
        if logits_to_keep:
            return VerifyOutput(logits=out.logits, hidden=hidden)
        return VerifyOutput(logits=unpacked(out.logits[0], pack, b, n),
                            hidden=None if hidden is None else unpacked(hidden[0], pack, b, n))

    def _groups(self, request_ids: Sequence[Hashable], tree_mask: torch.Tensor, prefix_lens: torch.Tensor,
                live: torch.Tensor | None) -> tuple[AttentionGroup, ...]:
        """The forward's attention groups (:func:`verifiers.paged.groups.plan_groups`): ``tree_mask [B, N, N]``,
        ``prefix_lens [B]``, ``live [B, N]`` (None: every node live)."""
        b, n = tree_mask.shape[:2]
        dev = tree_mask.device
        tables = self.cache.block_tables(request_ids).to(dev)
        bs = self.cache.block_size
        prefixes = prefix_lens.tolist()
        in_place = self.kernel is paged_tree_attention_sdpa

        def group(idx, longest: int, m: int, unpack, pack, rows) -> AttentionGroup:
            """Requests ``idx`` (longest prefix ``longest``, largest tree ``m``) as one attention call."""
            pl, tm = prefix_lens[idx], tree_mask[idx, :m, :m]
            # the blocks the prefixes use; in place, also those of the trees written after them
            width = -(-(longest + (m if in_place else 0)) // bs) * bs
            return AttentionGroup(unpack, pack, rows, tables[idx, :width // bs], pl, tm,
                                  in_place_mask(pl, tm, width, self.heads_per_kv) if in_place else None,
                                  in_place_mask(pl, tm, width, self.heads_per_kv, self.spec.window)
                                  if in_place and self.spec.sliding else None)

        if live is None:
            sizes = [n] * b
            if not self.group_attention or b == 1:
                return (group(slice(None), max(prefixes), n, None, None, None),)
        else:
            sizes = (live * torch.arange(1, n + 1, device=dev)).amax(1).tolist()  # last live node + 1
        plan = plan_groups(sizes, prefixes, bs) if self.group_attention else [list(range(b))]
        live = torch.ones(b, n, dtype=torch.bool, device=dev) if live is None else live
        pos = (live.reshape(-1).cumsum(0) - 1).view(b, n)  # place of each live node in the packed row
        out = []
        for members in plan:
            m = max(sizes[i] for i in members)
            idx = torch.tensor(members, device=dev)
            pack = live[idx, :m].reshape(-1).nonzero().flatten()
            unpack = pos[idx, :m].clamp(min=0)
            out.append(group(idx, max(prefixes[i] for i in members), m, unpack, pack,
                             None if len(plan) == 1 else unpack.reshape(-1)[pack]))
        return tuple(out)
