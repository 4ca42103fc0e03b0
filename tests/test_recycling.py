"""Token recycling: the successor table (updates, files, threads), the drafter's trees, the driver's top-k feedback;
its losslessness runs in the drafter suites (tests/conftest.py's ``recycling`` factories, the sampling tests)."""

from __future__ import annotations


import numpy as np
import pytest
import torch

import specdec
from drafters.hybrid import HybridDrafter
from drafters.recycling import RecyclingDrafter
from drafters.successor_table import SuccessorTable, shared_table
from drafters.suffix_cache import tokenizer_fingerprint
from specdec.errors import ConfigError
from specdec.protocols import Feedback, SuccessorDrafter, Successors, successors_wanted
from specdec.types import Acceptance, DraftContext
from tests.conftest import get_tiny
from tests.equality import assert_greedy_equal
from tests.threads import check_threads_keep_their_outputs
from tests.tiny import tiny_tokenizer


def ctx(tokens: list[int], max_nodes: int = 16, max_depth: int = 16) -> DraftContext:
    return DraftContext(input_ids=torch.tensor([tokens]), prompt_len=len(tokens), max_nodes=max_nodes,
                        max_depth=max_depth)


def paths(tree) -> list[tuple[int, ...]]:
    toks, parents = tree.tokens[0].tolist(), tree.parents[0].tolist()
    out, seq = [], [()]
    for i in range(1, len(toks)):
        seq.append(seq[parents[i]] + (toks[i],))
        out.append(seq[i])
    return out


def test_the_table_keeps_each_tokens_latest_top_k():
    t = SuccessorTable(k=3, vocab_size=8)
    assert t.successors(5) == [] and len(t) == 0
    t.update(np.array([5, 2]), np.array([[1, 2, 3, 4], [7, 6, 5, 4]]))  # wider than k: cut
    assert t.successors(5) == [1, 2, 3] and t.successors(2) == [7, 6, 5]
    t.update(np.array([5, 5]), np.array([[0], [4]]))  # narrower: the rest unknown; twice: the last wins
    assert t.successors(5) == [4] and len(t) == 2
    t.update(np.array([40]), np.array([[9, 8, 7]]))  # past the vocabulary it was made for: it grows
    assert t.successors(40) == [9, 8, 7] and t.successors(10_000) == []


def test_trees_grow_best_first_through_the_table_within_the_budget_and_depth():
    t = SuccessorTable(k=2)
    t.update(np.array([1, 2, 3, 4, 5]), np.array([[2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]))
    d = RecyclingDrafter(successor_table=t, k=2, min_score=0.0)
    d.counts = [[9.0, 10.0], [1.0, 10.0]]  # first candidates accepted 90%, second 10%
    tree = d.propose(ctx([9, 1], max_nodes=5))
    # scores: 2 .9, 4 .81, 8 .729, 3 .1 ...: the chain of first candidates, then the best second one
    assert paths(tree) == [(2,), (2, 4), (2, 4, 8), (3,)]
    assert torch.allclose(tree.scores[0], torch.tensor([1.0, 0.9, 0.81, 0.729, 0.1]))
    assert max(len(p) for p in paths(d.propose(ctx([9, 1], max_nodes=16, max_depth=2)))) == 2
    d.min_score = 0.5  # paths below it are not drafted
    assert paths(d.propose(ctx([9, 1], max_nodes=16))) == [(2,), (2, 4), (2, 4, 8)]
    assert paths(d.propose(ctx([9, 77]))) == []  # a root never scored: nothing to draft


def test_observe_fills_the_table_from_every_verified_node_and_counts_ranks_on_the_accepted_path():
    t = SuccessorTable(k=2)
    t.update(np.array([1]), np.array([[2, 3]]))
    d = RecyclingDrafter(successor_table=t, k=2, min_score=0.0)
    tree = d.propose(ctx([1], max_nodes=3))
    assert paths(tree) == [(2,), (3,)]
    before = [list(c) for c in d.counts]
    acc = Acceptance.from_paths([[0, 2]], [5])  # the second candidate accepted, then 5
    succ = Successors(tokens=torch.tensor([1, 2, 3]), topk=torch.tensor([[3, 2], [6, 5], [5, 4]]))
    d.observe(Feedback(tree=tree, acceptance=acc, new_tokens=torch.tensor([[3, 5]]), successors=succ))
    assert t.successors(1) == [3, 2] and t.successors(2) == [6, 5] and t.successors(3) == [5, 4]
    assert d.counts[0] == [before[0][0], before[0][1] + 1]  # rank 0 tried, not accepted
    assert d.counts[1] == [before[1][0] + 1, before[1][1] + 1]  # rank 1 tried and accepted


def test_the_driver_hands_a_successor_drafter_the_top_k_of_every_verified_node():
    target, tok = get_tiny(0), tiny_tokenizer()
    seen: list[Successors] = []

    class Spy(RecyclingDrafter):
        def observe(self, feedback):
            seen.append(feedback.successors)
            super().observe(feedback)

    d = Spy(target, tok, k=4, successor_table=SuccessorTable(k=4))
    assert isinstance(d, SuccessorDrafter) and successors_wanted(d) == 4
    prompt = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    specdec.generate(target, prompt, tokenizer=tok, drafter=d, max_new_tokens=12, eos_token_id=None)
    assert seen and all(s is not None and s.topk.shape == (s.tokens.shape[0], 4) for s in seen)
    s = seen[0]  # the first step's root: the prompt's last token, and the target's own ranking after the prompt
    logits = target(prompt).logits[0, -1]
    assert int(s.tokens[0]) == 6 and s.topk[0].tolist() == logits.topk(4).indices.tolist()
    assert successors_wanted(specdec.registry.build_drafter("ngram", target, tok)) == 0


def test_hybrid_parts_get_the_merged_trees_successors_and_stay_lossless():
    target, tok = get_tiny(1), tiny_tokenizer()
    table = SuccessorTable(k=4)
    hybrid = HybridDrafter(target, tok, drafters=[{"name": "ngram"},
                                                  RecyclingDrafter(target, tok, k=4, successor_table=table)])
    assert successors_wanted(hybrid) == 4
    prompt = torch.tensor([[3, 4, 5, 6, 3, 4, 5, 6, 3, 4, 9, 10]])
    ref = specdec.generate(target, prompt, tokenizer=tok, drafter="none", max_new_tokens=30, eos_token_id=None)
    for verifier in ("hf", "paged"):
        out = specdec.generate(target, prompt, tokenizer=tok, drafter=hybrid, max_new_tokens=30, eos_token_id=None,
                               verifier=verifier)
        assert_greedy_equal(out, ref)
    assert len(table) > 5
    assert successors_wanted(HybridDrafter(target, tok, drafters=["ngram", "none"])) == 0


def test_the_table_survives_a_restart_and_refuses_foreign_or_corrupt_files(tmp_path):
    fp = tokenizer_fingerprint(tiny_tokenizer())
    t = SuccessorTable(k=3, fingerprint=fp)
    t.update(np.array([4, 9]), np.array([[1, 2, 3], [5, 6, 7]]))
    path = t.save(tmp_path / "table.npz")
    again = SuccessorTable(k=3, fingerprint=fp)
    assert again.load(path) == 2 and again.successors(9) == [5, 6, 7]
    with pytest.raises(ConfigError, match="another tokenizer"):
        SuccessorTable(k=3, fingerprint="vocab:96").load(path)
    with pytest.raises(ConfigError, match="corrupt.*k=4"):
        SuccessorTable(k=4, fingerprint=fp).load(path)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ConfigError, match="not readable.*delete"):
        SuccessorTable(k=3, fingerprint=fp).load(bad)
    data = dict(np.load(path))
    np.savez(tmp_path / "obj.npz", header=data["header"], rows=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ConfigError, match="not readable"):  # no pickle is ever loaded
        SuccessorTable(k=3, fingerprint=fp).load(tmp_path / "obj.npz")
    with pytest.raises(ConfigError, match="not a specdec recycling table"):  # a suffix cache's file, say
        np.savez(tmp_path / "other.npz", header=np.frombuffer(b'{"format": "x"}', dtype=np.uint8), rows=data["rows"])
        SuccessorTable(k=3, fingerprint=fp).load(tmp_path / "other.npz")
    assert again.successors(4) == [1, 2, 3]  # a refused file changes nothing


def test_a_drafter_with_a_table_file_writes_it_when_a_request_ends_and_a_new_process_reads_it(tmp_path):
    target, tok = get_tiny(0), tiny_tokenizer()
    path = tmp_path / "recycling.npz"
    d = RecyclingDrafter(target, tok, k=4, table="file-test", table_file=str(path))
    specdec.generate(target, torch.tensor([[5, 6, 7, 8, 9]]), tokenizer=tok, drafter=d, max_new_tokens=8,
                     eos_token_id=None)
    assert path.exists()
    fresh = SuccessorTable(k=4, fingerprint=tokenizer_fingerprint(tok))  # what a restarted process builds
    assert fresh.load(path) == len(d.table) > 0 and np.array_equal(fresh.rows[:96], d.table.rows[:96])
    with pytest.raises(ConfigError, match="another tokenizer"):
        shared_table("file-test-2", "vocab:7", 4, None, str(path))


def test_threads_sharing_one_table_keep_their_outputs_and_the_table_whole():
    table = SuccessorTable(k=4)
    check_threads_keep_their_outputs(lambda target, tok: RecyclingDrafter(target, tok, k=4, successor_table=table))
    rows = table.rows[table.rows[:, 0] >= 0]
    # every row is one whole top-k: distinct tokens, the target's vocabulary
    assert len(rows) > 10 and all(len(set(r.tolist())) == 4 for r in rows) and rows.max() < 96


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="branch >= 1"):
        RecyclingDrafter(k=2, branch=0)
    assert RecyclingDrafter(k=2, successor_table=SuccessorTable(k=2)).branch == 2  # never more children than k
    with pytest.raises(ConfigError, match="k >= 1"):
        SuccessorTable(k=0)


def test_a_seeded_sample_does_not_depend_on_what_other_requests_taught_the_shared_table():
    target, tok = get_tiny(0), tiny_tokenizer()
    prompt = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    samples = []
    for filled in (False, True):
        table = SuccessorTable(k=4)
        if filled:  # another request's predictions, here nonsense
            table.update(np.arange(96), np.tile(np.array([[1, 2, 3, 4]]), (96, 1)))
        d = RecyclingDrafter(target, tok, k=4, min_score=0.0, successor_table=table)
        samples.append(specdec.generate(target, prompt, tokenizer=tok, drafter=d, max_new_tokens=16,
                                        do_sample=True, seed=7, eos_token_id=None).new_tokens)
    assert samples[0] == samples[1]
