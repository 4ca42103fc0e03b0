"""The one place that touches transformers' Cache internals (they change between versions).

Tested against plain decoding in ``tests/test_hf_cache.py``. Works with ``DynamicCache`` whose ``layers`` hold
``keys``/``values`` of shape ``[B, H_kv, T, D]`` (transformers >= 4.56 / 5.x).

Our caches are ``DynamicCache`` objects (transformers' code paths and checks all apply) whose layers are
:class:`GrowingLayer`: K/V live in a buffer with spare room, so appending a verify step's tree writes only the new
positions instead of copying the whole cache (``DynamicLayer`` concatenates: O(cached length) per layer per step),
and dropping rejected nodes is a view (docs/history/07-kv-copies.md has the saving on the default target).
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

LAYOUT = "growing"  # names this cache's K/V layout in a cost profile's key (see specdec.profiler)
MIN_CAPACITY = 256  # positions a layer's first buffer holds; it doubles when full


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys``/``values`` ``[B, H_kv, T, D]`` are prefix views of buffers
    ``[B, H_kv, capacity, D]``: ``update`` writes the new positions in place (the buffers double when full), crop
    is a shorter view. Anything that replaces ``keys``/``values`` with other tensors (transformers' batch helpers)
    is adopted into a new buffer on the next update."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def _owns_views(self) -> bool:
        """Whether ``keys``/``values`` are still prefix views of this layer's buffers."""
        b = self._buffers
        return (b is not None and self.keys.data_ptr() == b[0].data_ptr() and self.values.data_ptr() == b[1].data_ptr()
                and self.keys.stride() == b[0].stride() and self.values.stride() == b[1].stride())

    def _reserve(self, length: int, like_k: torch.Tensor, like_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers with room for ``length`` positions holding the current keys/values."""
        held = self.get_seq_length()
        if self._owns_views() and self._buffers[0].shape[-2] >= length:
            return self._buffers
        cap = max(MIN_CAPACITY, 2 * length)
        k = like_k.new_empty((*like_k.shape[:-2], cap, like_k.shape[-1]))
        v = like_v.new_empty((*like_v.shape[:-2], cap, like_v.shape[-1]))
        if held:
            k[..., :held, :].copy_(self.keys)
            v[..., :held, :].copy_(self.values)
        self._buffers = (k, v)
        return self._buffers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self.get_seq_length()
        if held and (self.keys.shape[:-2] != key_states.shape[:-2] or self.keys.dtype != key_states.dtype):
            return super().update(key_states, value_states)  # not ours to optimise: plain concatenation
        end = held + key_states.shape[-2]
        k, v = self._reserve(end, key_states, value_states)
        k[..., held:end, :].copy_(key_states)
        v[..., held:end, :].copy_(value_states)
        self.keys, self.values = k[..., :end, :], v[..., :end, :]
        return self.keys, self.values

    def keep(self, start: int, index: torch.Tensor) -> None:
        """Keep positions ``[0, start)`` then those at ``index`` (absolute, ascending), written in place (under
        inference mode when the buffers were made in it, as a verify forward's are)."""
        with torch.inference_mode(self.keys.is_inference()):
            kept_k, kept_v = self.keys.index_select(-2, index), self.values.index_select(-2, index)
            self.keys, self.values = self.keys[..., :start, :], self.values[..., :start, :]
            self.update(kept_k, kept_v)

    def crop(self, *args, **kwargs) -> None:
        if not self.is_initialized:  # a layer a layer-skip view never wrote: nothing to cut (transformers < 5.18
            return                   # indexes its missing keys and raises)
        super().crop(*args, **kwargs)

    def reset(self) -> None:
        self._buffers = None
        super().reset()


def new_cache() -> DynamicCache:
    """An empty ``DynamicCache`` of :class:`GrowingLayer` layers."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = GrowingLayer
    return cache


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
    positions = [start + k for k in keep]
    idx = None  # made on the layers' device (once; again only if a layer lives elsewhere)
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", True) or layer.keys is None or layer.keys.numel() == 0:
            continue
        if idx is None or idx.device != layer.keys.device:
            idx = torch.tensor(positions, dtype=torch.long, device=layer.keys.device)
        if isinstance(layer, GrowingLayer):
            layer.keep(start, idx)
            continue
        layer.keys = torch.cat([layer.keys[..., :start, :], layer.keys.index_select(-2, idx)], dim=-2)
        layer.values = torch.cat([layer.values[..., :start, :], layer.values.index_select(-2, idx)], dim=-2)


def layer_kv(cache: DynamicCache, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Layer ``layer``'s keys and values ``[B, H_kv, T, D]`` (None while it holds nothing)."""
    if len(cache.layers) <= layer:
        return None
    entry = cache.layers[layer]
    if not getattr(entry, "is_initialized", True) or entry.keys is None or entry.keys.numel() == 0:
        return None
    return entry.keys, entry.values


def append(cache: DynamicCache, keys: torch.Tensor, values: torch.Tensor, layer: int = 0) -> None:
    """Append ``keys``/``values`` ``[B, H_kv, n, D]`` to layer ``layer`` (as a forward's update would)."""
    cache.update(keys, values, layer)


def padded(caches: list[DynamicCache], width: int) -> DynamicCache:
    """One cache holding the one-layer caches of several requests side by side: keys/values ``[B, H_kv, width, D]``,
    request ``i``'s ``T_i <= width`` positions first and zeros after (a mask must hide them); empty when ``width``
    is 0. For a batched forward of a one-layer head whose requests each keep a cache of their own: the forward's
    new positions go after ``width``."""
    out = new_cache()
    held = [layer_kv(c) for c in caches]
    if width == 0:
        return out
    k0, v0 = next(kv for kv in held if kv is not None)
    k = k0.new_zeros(len(caches), k0.shape[1], width, k0.shape[-1])
    v = v0.new_zeros(len(caches), v0.shape[1], width, v0.shape[-1])
    for i, kv in enumerate(held):
        if kv is not None:
            t = kv[0].shape[-2]
            k[i, :, :t].copy_(kv[0][0])
            v[i, :, :t].copy_(kv[1][0])
    out.update(k, v, 0)
    return out
