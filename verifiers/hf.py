"""The reference verifier: any transformers causal LM, a ``DynamicCache``, a 4D tree mask."""

from __future__ import annotations

import torch

from specdec.errors import SpecdecError
from specdec.models import hf_cache
from specdec.models.families import check_servable
from specdec.models.greedy_head import ScreenedArgmax, kind as screen_kind, screenable
from specdec.models.hf_forward import forward_tokens, hidden_width
from specdec.protocols import VerifierCapabilities
from specdec.types import Acceptance, DraftTree, HiddenSpec, VerifyOutput


class HFVerifier:
    """Scores draft trees with one target forward each, batch size 1.

    After ``commit`` the cache holds exactly the committed tokens except the newest (the next tree's root):
    the accepted path's K/V are kept in place of the whole tree's.

    screen_greedy: for greedy steps, take the argmax from a bfloat16 screen of the LM head checked in float32
    (:mod:`specdec.models.greedy_head`: exact, and half the head's weight traffic) where the target and CPU allow it;
    False always computes the float32 logits.
    """

    capabilities = VerifierCapabilities(hidden_states=True, greedy_scoring=True, batching=False)

    def __init__(self, model, screen_greedy: bool = True) -> None:
        check_servable(model)
        self.model = model
        self.cache = hf_cache.new_cache()
        self._scored: int | None = None  # cache length before the tree being verified
        self.greedy_head = ScreenedArgmax(model.get_output_embeddings()) \
            if screen_greedy and screenable(model) else None

    def prefill(self, input_ids: torch.Tensor, output_hidden: HiddenSpec = False) -> torch.Tensor | None:
        """Cache ``input_ids [1, T]`` (T may be 0: a one-token prompt has nothing to prefill); with
        ``output_hidden`` return their last hidden states ``[1, T, H]``."""
        if input_ids.shape[0] != 1:
            raise SpecdecError("the hf verifier decodes one request at a time; pass input_ids of shape [1, T].")
        self.cache = hf_cache.new_cache()
        self._scored = None
        if input_ids.shape[1] == 0:
            return input_ids.new_zeros(1, 0, hidden_width(self.model.config, output_hidden), dtype=self.model.dtype) \
                if output_hidden else None
        return forward_tokens(self.model, self.cache, input_ids, output_hidden=output_hidden, logits_to_keep=1).hidden

    def score(self, tree: DraftTree, output_hidden: HiddenSpec = False, greedy: bool = False) -> VerifyOutput:
        self._scored = hf_cache.cache_length(self.cache)
        return forward_tokens(self.model, self.cache, tree.tokens, tree.parents, output_hidden,
                              greedy_head=self.greedy_head if greedy else None)

    def commit(self, tree: DraftTree, acceptance: Acceptance) -> None:
        if self._scored is None:
            raise SpecdecError("commit() called without a score() before it.")
        hf_cache.keep_positions(self.cache, self._scored, acceptance.accepted_nodes(0))
        self._scored = None

    def finish(self) -> None:
        """Drop the request's cache (its memory goes back now, not at the next prefill)."""
        self.cache = hf_cache.new_cache()
        self._scored = None

    @property
    def cached_length(self) -> int:
        return hf_cache.cache_length(self.cache)

    def cost_key(self) -> dict:
        """The KV layout (growing in-place buffers) and whether greedy tokens come from the screened head."""
        return {"kv": hf_cache.LAYOUT, "lm_head": screen_kind() if self.greedy_head is not None else "logits"}
