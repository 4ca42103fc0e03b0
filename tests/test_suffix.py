"""Suffix decoding: the shared cache (matching, bounds, eviction, files, threads) and the drafter's trees; its
losslessness runs in the drafter suites (tests/conftest.py's ``suffix`` factories, the sampling tests)."""

from __future__ import annotations


import numpy as np
import pytest
import torch

import specdec
from drafters.suffix import SuffixDrafter
from drafters.suffix_cache import SuffixCache, shared_cache, tokenizer_fingerprint
from specdec.errors import ConfigError
from specdec.types import DraftContext
from tests.conftest import get_tiny
from tests.threads import check_threads_keep_their_outputs
from tests.tiny import tiny_tokenizer


def ctx(tokens: list[int], max_nodes: int = 16, max_depth: int = 16) -> DraftContext:
    return DraftContext(input_ids=torch.tensor([tokens]), prompt_len=len(tokens), max_nodes=max_nodes,
                        max_depth=max_depth)


def paths(tree) -> set[tuple[int, ...]]:
    toks, parents = tree.tokens[0].tolist(), tree.parents[0].tolist()
    out, seq = set(), [()]
    for i in range(1, len(toks)):
        seq.append(seq[parents[i]] + (toks[i],))
        out.add(seq[i])
    return out


def test_matches_are_longest_agreement_first_with_what_followed():
    c = SuffixCache()
    a = c.open_segment()
    c.extend(a, [9, 1, 2, 3, 4, 5, 7, 2, 3, 6])  # "2 3" twice: after "1 2 3" came 4, after "7 2 3" came 6
    c.close_segment(a)
    b = c.open_segment()
    c.extend(b, [8, 1, 2, 3])
    m = c.matches([8, 1, 2, 3], b, max_match=32, depth=3, limit=8)
    assert [(x.length, x.continuation) for x in m] == [(3, [4, 5, 7]), (2, [6])]
    assert c.matches([8, 1, 2, 3], b, max_match=32, depth=3, limit=1)[0].continuation == [4, 5, 7]
    assert c.matches([5, 5], b, 32, 3, 8) == []  # a pair never seen


def test_a_request_drafts_from_its_own_text_and_from_earlier_requests():
    c = SuffixCache()
    d = SuffixDrafter(suffix_cache=c, min_share=0.0)
    first = [5, 6, 7, 8, 9, 10, 11, 12]
    d.propose(ctx(first))
    d.reset()  # request over: its tokens stay
    tree = d.propose(ctx([40, 41, 6, 7]))  # a new request ending like the earlier one's "6 7" (a 2-token match)
    assert paths(tree) == {(8,), (8, 9)}
    d.reset()
    own = d.propose(ctx([20, 21, 22, 30, 20, 21]))  # its own prompt repeats "20 21"
    assert (22, 30) in paths(own)


def test_deeper_drafts_follow_longer_matches():
    c = SuffixCache()
    d = SuffixDrafter(suffix_cache=c, min_share=0.0, spec_factor=1.0, max_depth=16)
    text = list(range(10, 40))
    d.propose(ctx(text))
    d.reset()
    short = d.propose(ctx([99, 98, 20, 21]))  # agrees 2 tokens back: drafts 2
    assert max(map(len, paths(short))) == 2
    d.reset()
    long = d.propose(ctx([15, 16, 17, 18, 19, 20, 21]))  # agrees 7 back: drafts 7
    assert max(map(len, paths(long))) == 7


def test_frequent_continuations_score_higher_and_rare_ones_are_cut():
    c = SuffixCache()
    for cont in ([4, 5], [4, 5], [4, 5], [4, 9], [7, 7]):
        s = c.open_segment()
        c.extend(s, [1, 2, 3] + cont)
        c.close_segment(s)
    tree = SuffixDrafter(suffix_cache=c, min_share=0.3).propose(ctx([0, 2, 3]))
    toks, scores = tree.tokens[0].tolist(), tree.scores[0].tolist()
    assert toks[1] == 4 and scores[1] == pytest.approx(0.8)  # 4 of 5 occurrences
    assert (4, 5) in paths(tree) and (7,) not in paths(tree) and (4, 9) not in paths(tree)  # 0.2 < min_share


def test_the_cache_is_bounded_and_drops_the_oldest_requests_first():
    c = SuffixCache(max_tokens=100, max_positions=4)
    live = c.open_segment()
    c.extend(live, [1, 2, 3])
    for i in range(30):
        s = c.open_segment()
        c.extend(s, [50 + i % 7, 60, 61, 62, 63, 64, 65, 66, 67, 68])
        c.close_segment(s)
    st = c.stats()
    assert st["tokens"] <= 100 and st["segments"] <= 11
    assert c.matches([1, 2, 3], live, 32, 4, 8) == []  # the live request's own end is no match ...
    c.extend(live, [2, 3])  # ... but it was kept: what it writes now is found
    assert [m.continuation for m in c.matches([0, 2, 3], live, 32, 2, 8)] == [[2, 3]]
    assert len(c.matches([9, 60, 61], live, 32, 2, 99)) <= 4  # occurrences per pair are bounded too


def test_the_cache_survives_a_restart_and_refuses_foreign_or_corrupt_files(tmp_path):
    fp = tokenizer_fingerprint(tiny_tokenizer())
    c = SuffixCache(fingerprint=fp)
    s = c.open_segment()
    c.extend(s, [3, 4, 5, 6, 7])
    path = c.save(tmp_path / "cache.npz")
    again = SuffixCache(fingerprint=fp)
    assert again.load(path) == 5
    t = again.open_segment()
    again.extend(t, [1, 4, 5])
    assert again.matches([1, 4, 5], t, 32, 2, 4)[0].continuation == [6, 7]
    with pytest.raises(ConfigError, match="another tokenizer"):
        SuffixCache(fingerprint="vocab:96").load(path)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ConfigError, match="not readable.*delete"):
        SuffixCache(fingerprint=fp).load(bad)
    data = dict(np.load(path))
    np.savez(tmp_path / "short.npz", header=data["header"], tokens=data["tokens"][:3], lengths=data["lengths"])
    with pytest.raises(ConfigError, match="corrupt"):
        SuffixCache(fingerprint=fp).load(tmp_path / "short.npz")
    np.savez(tmp_path / "obj.npz", header=np.array([{"x": 1}], dtype=object), tokens=data["tokens"],
             lengths=data["lengths"])
    with pytest.raises(ConfigError, match="not readable"):  # no pickle is ever loaded
        SuffixCache(fingerprint=fp).load(tmp_path / "obj.npz")


def test_a_drafter_with_a_cache_file_writes_it_when_a_request_ends_and_a_new_process_reads_it(tmp_path):
    target, tok = get_tiny(0), tiny_tokenizer()
    path = tmp_path / "suffix.npz"
    d = SuffixDrafter(target, tok, cache="file-test", cache_file=str(path))
    d.propose(ctx([5, 6, 7, 8, 9]))
    d.reset()
    assert path.exists()
    fresh = SuffixCache(fingerprint=tokenizer_fingerprint(tok))  # what a restarted process builds
    assert fresh.load(path) == 5
    with pytest.raises(ConfigError, match="another tokenizer"):
        shared_cache("file-test-2", "vocab:7", 1000, 8, str(path))


def test_threads_sharing_one_cache_keep_their_outputs_and_the_cache_consistent():
    cache = SuffixCache(max_tokens=10_000)
    check_threads_keep_their_outputs(lambda target, tok: SuffixDrafter(target, tok, suffix_cache=cache, min_share=0.0))
    st = cache.stats()
    assert st["segments"] == 12 and st["tokens"] == 12 * (24 + 24)


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="max_match >= 2"):
        SuffixDrafter(max_match=1)
    with pytest.raises(ConfigError, match="max_tokens >= 1"):
        SuffixCache(max_tokens=0)


def test_a_seeded_sampled_request_drafts_from_itself_only_so_its_sample_repeats():
    target, tok = get_tiny(0), tiny_tokenizer()
    cache = SuffixCache()
    prompt = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])

    def sample(seed):
        d = SuffixDrafter(target, tok, suffix_cache=cache, min_share=0.0)
        return specdec.generate(target, prompt, tokenizer=tok, drafter=d, max_new_tokens=20, do_sample=True,
                                seed=seed, eos_token_id=None).new_tokens

    first = sample(1)
    for s in (2, 3, 4):  # other requests fill the shared cache with continuations of the same prompt
        sample(s)
    assert sample(1) == first
    assert cache.matches([0, 5, 6], 999, 32, 4, 8)  # ... which other (unseeded or greedy) requests do draft from
