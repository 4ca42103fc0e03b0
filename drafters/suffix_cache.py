"""The token store behind suffix decoding: every request's tokens (prompt and output), shared, bounded, and
optionally kept in a file across restarts.

Each request writes its committed tokens into a *segment* of its own as they arrive, so the requests that run at once
(a batch, several threads) never interleave their tokens, and every request can draft from every other one's text,
finished or still running. An index maps each pair of consecutive tokens to where it ends (the most recent
``max_positions`` places per pair): a lookup finds where the context's last two tokens occurred before, then
:meth:`SuffixCache.matches` measures how far back each occurrence agrees with the context (the suffix match length)
and returns what followed it.

Memory is bounded by ``max_tokens``: past it, the oldest segments (finished requests first) are dropped; index
entries of dropped segments are skipped on lookup and removed when the index is rebuilt (when they outnumber the live
entries). The file format (``save``/``load``) is numpy's ``.npz`` read without pickle: the tokens of every segment
concatenated (int32), their lengths, and a JSON header with the format version and the tokenizer's fingerprint; a
file of another version or tokenizer, or one that does not parse, is refused with a :class:`ConfigError` naming it.
"""

from __future__ import annotations

import hashlib
import json
import threading
import weakref
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from drafters import traffic_file
from specdec.errors import ConfigError

FORMAT, FORMAT_VERSION = "specdec-suffix-cache", 1
_SHIFT = 32  # an index entry is segment id << 32 | offset; a pair key is first token << 32 | second


def tokenizer_fingerprint(tokenizer=None, vocab_size: int | None = None) -> str:
    """What a cache file must have been built with: a hash of the tokenizer's vocabulary (token -> id), or, without a
    tokenizer, the vocabulary size alone (e.g. ``"vocab:49152"``). Computed once per tokenizer: hashing the default
    model's 49,152 entries takes a quarter of a second, and a batching engine builds a drafter per running request."""
    if tokenizer is None:
        return f"vocab:{vocab_size}"
    fingerprint = _FINGERPRINTS.get(tokenizer)
    if fingerprint is None:
        vocab = sorted(tokenizer.get_vocab().items())
        fingerprint = _FINGERPRINTS[tokenizer] = "sha256:" + hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:24]
    return fingerprint


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its fingerprint


@dataclass(frozen=True)
class Match:
    """One earlier occurrence of the context's end: how many tokens back it agrees (``length`` >= 2) and the tokens
    that followed it (``continuation``, at most the depth asked for)."""

    length: int
    continuation: list[int]


class SuffixCache:
    """Requests' tokens by segment, with a pair index. Thread-safe (one lock around every read and write).

    max_tokens: tokens kept over all segments (oldest dropped past it). max_positions: most recent occurrences kept
    per token pair. fingerprint: the tokenizer's (:func:`tokenizer_fingerprint`), checked against a loaded file.
    """

    def __init__(self, max_tokens: int = 1_000_000, max_positions: int = 64, fingerprint: str = "") -> None:
        if max_tokens < 1 or max_positions < 1:
            raise ConfigError(f"the suffix cache needs max_tokens >= 1 and max_positions >= 1; got {max_tokens}, "
                              f"{max_positions}.")
        self.max_tokens, self.max_positions, self.fingerprint = max_tokens, max_positions, fingerprint
        self._lock = threading.Lock()
        self._segments: dict[int, array] = {}  # id -> tokens (insertion order = age)
        self._live: set[int] = set()  # segments a request still writes to
        self._index: dict[int, array] = {}  # pair key -> entries (segment << 32 | offset of the pair's 2nd token)
        self._next_id = 0
        self._tokens = 0  # in live + finished segments
        self._stale = 0  # index entries of dropped segments
        self._entries = 0

    # -- writing ---------------------------------------------------------------------------------------------------
    def open_segment(self) -> int:
        """A new segment for a request's tokens; its id."""
        with self._lock:
            sid = self._next_id
            self._next_id += 1
            self._segments[sid] = array("i")
            self._live.add(sid)
            return sid

    def close_segment(self, sid: int) -> None:
        """The request is over: its tokens stay (until evicted), nothing more is written to them."""
        with self._lock:
            self._live.discard(sid)

    def extend(self, sid: int, tokens: list[int]) -> None:
        """Append ``tokens`` to segment ``sid`` and index them (ignored for a segment already evicted)."""
        with self._lock:
            seg = self._segments.get(sid)
            if seg is None:
                return
            for t in tokens:
                seg.append(t)
                n = len(seg)
                if n >= 2:
                    self._add(seg[n - 2] << _SHIFT | t, sid << _SHIFT | (n - 1))
            self._tokens += len(tokens)
            if self._tokens > self.max_tokens:
                self._evict()

    def _add(self, key: int, entry: int) -> None:
        lst = self._index.get(key)
        if lst is None:
            lst = self._index[key] = array("q")
        lst.append(entry)
        self._entries += 1
        if len(lst) >= 2 * self.max_positions:  # keep the most recent ones (amortized trim)
            cut = len(lst) - self.max_positions
            del lst[:cut]
            self._entries -= cut

    def _evict(self) -> None:
        """Drop the oldest finished segments until the tokens fit, then (only if they still do not) the oldest live
        ones. Each pass stops at the first segments that suffice: a full cache evicts at every step, and walking all
        its segments there would cost a step a millisecond."""
        for live in (False, True):
            over, victims = self._tokens - self.max_tokens, []
            for sid, seg in self._segments.items():
                if over <= 0:
                    break
                if (sid in self._live) == live:
                    victims.append(sid)
                    over -= len(seg)
            for sid in victims:
                n = len(self._segments.pop(sid))
                self._live.discard(sid)
                self._tokens -= n
                self._stale += max(n - 1, 0)
        if self._stale > self._entries - self._stale:
            self._rebuild()

    def _rebuild(self) -> None:
        self._index, self._entries, self._stale = {}, 0, 0
        for sid, seg in self._segments.items():
            for i in range(1, len(seg)):
                self._add(seg[i - 1] << _SHIFT | seg[i], sid << _SHIFT | i)

    # -- reading ---------------------------------------------------------------------------------------------------
    def matches(self, context: list[int], sid: int, max_match: int, depth: int, limit: int,
                own_only: bool = False) -> list[Match]:
        """Earlier occurrences of the end of ``context`` (the request writing segment ``sid``; its own current end is
        not a match), longest agreement first, then most recent, at most ``limit``; each with up to ``depth``
        following tokens (none are returned without a following token). ``own_only``: in segment ``sid`` only."""
        if len(context) < 2 or depth < 1:
            return []
        with self._lock:
            entries = self._index.get(context[-2] << _SHIFT | context[-1])
            if not entries:
                return []
            found: list[tuple[int, int, int, int]] = []  # (length, recency, segment, offset)
            mask = (1 << _SHIFT) - 1
            for rank, e in enumerate(reversed(entries[-self.max_positions:])):
                s, off = e >> _SHIFT, e & mask
                if own_only and s != sid:
                    continue
                seg = self._segments.get(s)
                if seg is None or off + 1 >= len(seg):  # evicted, or nothing followed yet (our own end)
                    continue
                length, top = 2, min(max_match, off + 1, len(context))
                while length < top and seg[off - length] == context[-1 - length]:
                    length += 1
                found.append((length, -rank, s, off))
            found.sort(reverse=True)
            return [Match(length, self._segments[s][off + 1:off + 1 + depth].tolist())
                    for length, _, s, off in found[:limit]]

    def stats(self) -> dict:
        """Sizes: segments, tokens, index entries and distinct pairs, and an estimate of the bytes held."""
        with self._lock:
            per_key = 184  # array object with its spare room, dict slot, key int: measured (suffix_cache_memory.py)
            nbytes = 4 * self._tokens + 8 * self._entries + per_key * len(self._index)
            return {"segments": len(self._segments), "tokens": self._tokens, "entries": self._entries,
                    "pairs": len(self._index), "approx_bytes": nbytes}

    # -- files -----------------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write every segment to ``path`` (``.npz``, no pickle), atomically (:mod:`drafters.traffic_file`)."""
        with self._lock:
            segs = list(self._segments.values())
            lengths = np.array([len(s) for s in segs], dtype=np.int64)
            tokens = np.concatenate([np.frombuffer(s, dtype=np.int32) for s in segs]) if segs else np.zeros(0, np.int32)
        return traffic_file.write(path, FORMAT, FORMAT_VERSION, self.fingerprint, {"tokens": tokens, "lengths": lengths})

    def load(self, path: str | Path) -> int:
        """Add the segments of a file written by :meth:`save` (as finished requests); returns the tokens read.
        Raises :class:`ConfigError` for a file that does not parse, is of another format version, or was built for
        another tokenizer; the cache is unchanged then."""
        _, arrays = traffic_file.read(path, FORMAT, "suffix cache", FORMAT_VERSION, self.fingerprint,
                                      ("tokens", "lengths"))
        tokens, lengths = arrays["tokens"], arrays["lengths"]
        if tokens.dtype != np.int32 or lengths.ndim != 1 or int(lengths.sum()) != tokens.size or (lengths < 0).any():
            raise traffic_file.corrupt(path, "suffix cache", "its lengths do not add up to its tokens")
        start = 0
        for n in lengths.tolist():
            sid = self.open_segment()
            self.extend(sid, tokens[start:start + n].tolist())
            self.close_segment(sid)
            start += n
        return int(tokens.size)


_SHARED: dict[tuple, SuffixCache] = {}
_SHARED_LOCK = threading.Lock()


def shared_cache(name: str, fingerprint: str, max_tokens: int, max_positions: int,
                 cache_file: str | None = None) -> SuffixCache:
    """The process's cache called ``name`` for this tokenizer (made, and filled from ``cache_file`` if it exists,
    on first use): every drafter built with the same name shares it, as the requests of one decoder or server do."""
    key = (name, fingerprint, str(Path(cache_file).resolve()) if cache_file else None)
    with _SHARED_LOCK:
        cache = _SHARED.get(key)
        if cache is None:
            cache = SuffixCache(max_tokens=max_tokens, max_positions=max_positions, fingerprint=fingerprint)
            if cache_file and Path(cache_file).exists():
                cache.load(cache_file)
            _SHARED[key] = cache
        return cache
