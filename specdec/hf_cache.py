"""The one place that touches transformers' Cache internals (they change between versions).

Tested against plain decoding in ``tests/test_hf_cache.py``. Works with ``DynamicCache`` whose ``layers`` hold
``keys``/``values`` of shape ``[B, H_kv, T, D]`` (transformers >= 4.56 / 5.x).
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import DynamicCache


def new_cache() -> DynamicCache:
    return DynamicCache()


@functools.cache
def _cache_keyword(forward) -> str:
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def cache_kwargs(module: torch.nn.Module, cache) -> dict:
    """``{keyword: cache}`` for ``module``'s forward: transformers 5.x renamed ``past_key_values`` to ``cache``
    (the old name warns from 5.23 and goes in 5.40), so ask the module's own signature which one it takes. A
    wrapper without ``forward`` (any callable) is asked through its ``__call__``."""
    cls = type(module)
    return {_cache_keyword(getattr(cls, "forward", None) or cls.__call__): cache}


def cache_length(cache: DynamicCache) -> int:
    """Tokens held by the cache."""
    return cache.get_seq_length()


def crop(cache: DynamicCache, length: int) -> None:
    """Keep the first ``length`` positions."""
    extra = cache_length(cache) - length
    if extra > 0:
        cache.crop(-extra)


def keep_positions(cache: DynamicCache, start: int, keep: list[int]) -> None:
    """Keep positions ``[0, start)`` and then ``start + keep[i]`` in that order; drop the rest.

    ``keep`` are tree-node offsets (ascending, root 0). A contiguous run ``0..k-1`` is a plain crop; otherwise the
    kept nodes' K/V are gathered into consecutive slots — the accepted path becomes the next cached positions.
    """
    if keep == list(range(len(keep))):
        crop(cache, start + len(keep))
        return
    index = torch.tensor([start + k for k in keep], dtype=torch.long)
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", True) or layer.keys is None or layer.keys.numel() == 0:
            continue
        idx = index.to(layer.keys.device)
        layer.keys = torch.cat([layer.keys[..., :start, :], layer.keys.index_select(-2, idx)], dim=-2)
        layer.values = torch.cat([layer.values[..., :start, :], layer.values.index_select(-2, idx)], dim=-2)
