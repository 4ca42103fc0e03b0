"""The reference verifier: any transformers causal LM, a ``DynamicCache``, a 4D tree mask."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from specdec.errors import SpecdecError
from specdec.kernels.greedy_head import ScreenedArgmax, screenable
from specdec.kernels.greedy_head import kind as screen_kind
from specdec.models import hf_cache
from specdec.models.families import check_servable
from specdec.models.hf_forward import forward_tokens, hidden_width
from specdec.protocols import VerifierCapabilities
from specdec.types import DraftTree, HiddenSpec, VerifyOutput


class HFVerifier:
    """Scores draft trees with one target forward each, one live request at a time.

    After ``commit`` the cache holds exactly the committed tokens except the newest (the next tree's root):
    the accepted path's K/V are kept in place of the whole tree's. The cache grows with the request (no block
    pool), so it counts no KV blocks: every request fits.

    screen_greedy: for greedy steps, take the argmax from a bfloat16 screen of the LM head checked in float32
    (:mod:`specdec.kernels.greedy_head`: exact, and half the head's weight traffic) where the target and CPU allow it;
    False always computes the float32 logits.
    """

    capabilities = VerifierCapabilities(hidden_states=True, greedy_scoring=True, batching=False)

    def __init__(self, model, screen_greedy: bool = True) -> None:
        check_servable(model)
        self.model = model
        self.cache = hf_cache.new_cache()
        self.request_id: Hashable | None = None  # the live request
        self._scored: int | None = None  # cache length before the tree being verified
        self.greedy_head = ScreenedArgmax(model.get_output_embeddings()) \
            if screen_greedy and screenable(model) else None

    def start(self, request_id: Hashable, input_ids: torch.Tensor,
              output_hidden: HiddenSpec = False) -> torch.Tensor | None:
        """Cache ``input_ids [1, T]`` (T may be 0: a one-token prompt has nothing to prefill); with
        ``output_hidden`` return their last hidden states ``[1, T, H]``."""
        if input_ids.shape[0] != 1:
            raise SpecdecError("the hf verifier decodes one request at a time; pass input_ids of shape [1, T].")
        if self.request_id is not None and self.request_id != request_id:
            raise SpecdecError(f"the hf verifier holds request {self.request_id!r} and serves one request at a "
                               f"time; release it before starting {request_id!r}, or use verifier='paged'.")
        self.cache = hf_cache.new_cache()
        self.request_id, self._scored = request_id, None
        if input_ids.shape[1] == 0:
            return input_ids.new_zeros(1, 0, hidden_width(self.model.config, output_hidden), dtype=self.model.dtype) \
                if output_hidden else None
        return forward_tokens(self.model, self.cache, input_ids, output_hidden=output_hidden, logits_to_keep=1).hidden

    def score(self, request_ids: Sequence[Hashable], trees: Sequence[DraftTree], output_hidden: HiddenSpec = False,
              greedy: bool = False) -> VerifyOutput:
        """The live request's tree (``request_ids`` and ``trees`` of length 1)."""
        if len(request_ids) != 1 or request_ids[0] != self.request_id:
            raise SpecdecError(f"the hf verifier scores its one live request ({self.request_id!r}); got "
                               f"{list(request_ids)!r}.")
        self._scored = hf_cache.cache_length(self.cache)
        tree = trees[0]
        return forward_tokens(self.model, self.cache, tree.tokens, tree.parents, output_hidden,
                              greedy_head=self.greedy_head if greedy else None)

    def commit(self, request_id: Hashable, keep: Sequence[int]) -> None:
        if self._scored is None or request_id != self.request_id:
            raise SpecdecError(f"commit for request {request_id!r} without a score before it.")
        hf_cache.keep_positions(self.cache, self._scored, list(keep))
        self._scored = None

    def release(self, request_id: Hashable) -> None:
        """Drop the request's cache (its memory goes back now, not at the next start)."""
        if request_id == self.request_id:
            self.cache = hf_cache.new_cache()
            self.request_id, self._scored = None, None

    def cached_length(self, request_id: Hashable) -> int:
        return hf_cache.cache_length(self.cache) if request_id == self.request_id else 0

    num_blocks = 0  # no block pool: the cache grows with the request
    num_free_blocks = 0

    def blocks_for(self, num_tokens: int) -> int:
        return 0

    def cost_key(self) -> dict:
        """The KV layout (growing in-place buffers) and whether greedy tokens come from the screened head."""
        return {"kv": hf_cache.LAYOUT, "lm_head": screen_kind() if self.greedy_head is not None else "logits"}
