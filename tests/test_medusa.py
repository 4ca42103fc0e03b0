"""Medusa heads: the training loss (golden values, head k aimed at position i + k), the tiny end-to-end job,
lossless greedy decoding with the trained heads, sampled trees (valid q rows, budget and depth respected, the
target's distribution) and refusal of a checkpoint made for another target."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import specdec
import train.job
import train.medusa
from drafters.medusa import MedusaDrafter, MedusaHeads
from specdec import SpecDecoder
from specdec.algorithms import tree as tree_ops
from specdec.algorithms.sampling import SamplingParams
from specdec.errors import ConfigError
from specdec.models import checkpoint
from specdec.types import DraftContext
from tests.conftest import get_tiny
from tests.equality import assert_greedy_equal, greedy_ref
from tests.test_rejection import assert_matches
from tests.test_sampling_e2e import exact_joint, first_two_counts
from tests.tiny import random_prompt, tiny_llama, tiny_tokenizer
from tests.train_fixtures import job_config
from train.features import Batch

# ---------------------------------------------------------------- the loss, golden values


class _LinearTarget:
    """Just what the training module reads of a target: its LM head (here the identity on 3 dims)."""

    def __init__(self, v: int) -> None:
        self.head = nn.Linear(v, v, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(v))

    def get_output_embeddings(self) -> nn.Linear:
        return self.head


def golden_module(shifts: list[int]) -> train.medusa.MedusaTrainModule:
    """H = V = 3, no residual blocks; head k maps ``h = c e_j`` to logits ``log(2) e_{(j + shift_k) mod 3}``."""
    heads = MedusaHeads(3, len(shifts), 0, torch.arange(3))
    with torch.no_grad():
        for lm, s in zip(heads.lm_heads, shifts):
            lm.weight.copy_(torch.roll(torch.eye(3), s, dims=0) * math.log(2) / 40.0)
    return train.medusa.MedusaTrainModule(heads, _LinearTarget(3), {"head_decay": 0.8})


def golden_batch(length: int = 5) -> Batch:
    """One sequence whose hidden state at position j is ``40 e_{j mod 3}``: the target's next token there is
    ``j mod 3`` with probability ~1 (the LM head is the identity)."""
    j = torch.arange(length)
    hidden = 40.0 * torch.eye(3)[j % 3][None]
    ones = torch.ones(1, length, dtype=torch.bool)
    return Batch(tokens=j[None], hidden=hidden, loss_mask=ones, valid=ones.clone(), target_top1=(j % 3)[None])


def test_loss_golden_head_k_predicts_position_i_plus_k():
    # head k guessing shift k is right at every position: p(right) = 2 / (2 + 1 + 1), CE = log 2 for both heads
    loss, metrics = train.medusa.loss_fn(golden_module([1, 2]), golden_batch())
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["head1_top1"] == 1.0 and metrics["head2_top1"] == 1.0
    # head 2 aimed one position short (shift 1): the right token gets 1/4, CE = log 4, weighted 0.8
    loss, metrics = train.medusa.loss_fn(golden_module([1, 1]), golden_batch())
    assert float(loss.detach()) == pytest.approx((math.log(2) + 0.8 * math.log(4)) / 1.8, abs=1e-6)
    assert metrics["head2_ce"] == pytest.approx(math.log(4), abs=1e-6) and metrics["head2_top1"] == 0.0


def test_loss_mask_is_taken_at_position_i_plus_k():
    batch = golden_batch(4)
    batch.loss_mask[0, 3] = False  # position 3 is the target of head 1 at i = 2 and of head 2 at i = 1
    batch.valid[0, 2] = False  # padding: position 2 (head 1 at i = 1, head 2 at i = 0) counts for nothing
    module = golden_module([1, 1])
    logits, mask, top1 = train.medusa.head_terms(module, batch, 2)
    assert logits.shape == (1, 2, 3) and mask.tolist() == [[False, False]] and top1.tolist() == [[2, 0]]
    _, metrics = train.medusa.loss_fn(module, batch)
    assert metrics["head1_ce"] == pytest.approx(math.log(2), abs=1e-6)  # only i = 0 (target position 1) is left
    assert metrics["head2_ce"] == 0.0  # no position left for head 2


def test_fresh_heads_are_the_targets_lm_head():
    target = get_tiny(0)
    heads = MedusaHeads.for_target(target, 3, 2, torch.arange(96))
    heads.init_from_target(target)
    h = torch.randn(5, 32, dtype=torch.float64)
    want = target.lm_head(h.float().to(target.dtype))
    got = heads.double().full_logits(h, 96)
    assert got.shape == (3, 5, 96)
    for k in range(3):
        torch.testing.assert_close(got[k], want)


# ---------------------------------------------------------------- the tiny end-to-end job


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The medusa job run with train=smoke on a tiny target; its final checkpoint directory."""
    cfg = job_config(tmp_path_factory.mktemp("medusa"), "medusa", ["drafter.draft_vocab_size=64"])
    return train.job.run(train.medusa.SPEC, cfg, progress=False)


def test_job_writes_a_loadable_checkpoint(trained):
    state, meta = checkpoint.load(trained, kind="medusa", target=get_tiny(0))
    cfg = meta["config"]
    assert cfg["draft_vocab_size"] == 64 and cfg["num_heads"] == 4 and len(state["d2t"]) == 64
    assert len(cfg["choices"]) <= cfg["tree_nodes"] - 1
    assert all(len(c) <= cfg["num_heads"] for c in cfg["choices"])
    assert "head1_top1" in meta["training"]["val"] and "tau" in meta["training"]["val"]


@pytest.mark.parametrize("choices", [None, [[0], [1], [2], [3], [0, 0], [1, 0], [0, 0, 0], [0, 0, 0, 0]]],
                         ids=["trained-tree", "wide-tree"])
def test_greedy_decoding_is_lossless(trained, choices):
    target = get_tiny(0)  # the job's target (seed 0), in float64
    drafter = MedusaDrafter(target, path=str(trained), choices=choices)
    tok = tiny_tokenizer()
    for seed, length in [(1, 12), (2, 30), (3, 5), (4, 1)]:
        ids = random_prompt(seed, length, repeat=seed % 2 == 0)
        out = specdec.generate(target, ids, tokenizer=tok, drafter=drafter, max_new_tokens=24)
        assert_greedy_equal(out, greedy_ref(target, ids, 24, eos_token_id=2), f"seed {seed}, prompt length {length}")


def test_checkpoint_for_another_target_is_refused(trained):
    with pytest.raises(checkpoint.CheckpointError, match="different target"):
        MedusaDrafter(tiny_llama(7), path=str(trained))
    with pytest.raises(checkpoint.CheckpointError, match="hidden_size"):
        MedusaDrafter(tiny_llama(0, hidden=48), path=str(trained))


# ---------------------------------------------------------------- drafting


def random_heads(target, num_heads: int, seed: int = 0, vocab: int | None = None) -> MedusaHeads:
    """Heads started from the target's LM head, with random residual blocks so that the heads differ."""
    v = vocab or target.config.vocab_size
    heads = MedusaHeads.for_target(target, num_heads, 1, torch.arange(v))
    heads.init_from_target(target)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in heads.blocks:
            block[0].linear.weight.copy_(torch.randn(block[0].linear.weight.shape, generator=g))
    return heads


def test_sampled_tree_has_valid_q_rows_and_respects_the_budget():
    target = get_tiny(0)
    choices = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 0, 0]]
    drafter = MedusaDrafter(target, heads=random_heads(target, 4), choices=choices)
    g = torch.Generator().manual_seed(0)
    for max_nodes, max_depth in [(16, 8), (5, 8), (16, 2), (1, 8), (16, 0)]:
        ctx = DraftContext(input_ids=random_prompt(0, 6), prompt_len=6, max_nodes=max_nodes, max_depth=max_depth,
                           hidden=torch.randn(1, 3, 32, dtype=torch.float64), generator=g,
                           sampling=SamplingParams(do_sample=True, temperature=0.8, top_k=20))
        tree = drafter.propose(ctx)
        n = tree.num_nodes
        assert n <= max_nodes and int(tree_ops.depths(tree.parents).max()) <= max_depth
        probs = tree.draft_probs
        assert probs.shape == (1, n, 96)
        parents = tree.parents[0].tolist()
        for p in set(parents[1:]) - {-2}:
            q = probs[0, p]
            assert float(q.min()) >= 0 and float(q.sum()) == pytest.approx(1.0, abs=1e-5)
            assert int((q > 0).sum()) <= 20  # warped like the target: top-k 20
            kids = [int(tree.tokens[0, i]) for i in range(n) if parents[i] == p]
            assert len(set(kids)) == len(kids) and all(float(q[t]) > 0 for t in kids)  # without replacement


def test_greedy_tree_takes_each_heads_ranking():
    target = get_tiny(0)
    heads = random_heads(target, 2)
    drafter = MedusaDrafter(target, heads=heads, choices=[[0], [1], [0, 0], [0, 1], [1, 0]])
    hidden = torch.randn(1, 4, 32, dtype=torch.float64)
    tree = drafter.propose(DraftContext(input_ids=random_prompt(0, 5), prompt_len=5, max_nodes=16, max_depth=8,
                                        hidden=hidden, sampling=SamplingParams()))
    top = heads.full_logits(hidden[0, -1], 96).topk(2).indices  # [K, 2]
    assert tree.parents.tolist() == [[-1, 0, 0, 1, 1, 2]] and tree.draft_probs is None
    assert tree.tokens[0, 1:].tolist() == [top[0, 0], top[0, 1], top[1, 0], top[1, 1], top[1, 0]]


def test_choices_deeper_than_the_heads_are_refused():
    target = get_tiny(0)
    with pytest.raises(ConfigError, match="depth 3"):
        MedusaDrafter(target, heads=random_heads(target, 2), choices=[[0], [0, 0], [0, 0, 0]])


def test_sampled_output_has_the_target_distribution():
    """Chi-square test of the first two sampled tokens against the exact joint (V = 8, as test_sampling_e2e)."""
    v, n = 8, 2000
    target = tiny_llama(0, vocab_size=v, init=0.1)
    prompt = random_prompt(10, 12, vocab_size=v)
    drafter = MedusaDrafter(target, heads=random_heads(target, 2, seed=3),
                            choices=[[0], [1], [2], [0, 0], [0, 1], [1, 0]])
    decoder = SpecDecoder(target, None, drafter=drafter)
    counts, _, accepted = first_two_counts(decoder, prompt, v, n, seed0=50_000)
    assert_matches(counts, exact_joint(target, prompt, SamplingParams(do_sample=True)), "medusa")
    assert sum(accepted) > n // 10  # drafts were accepted now and then: the rule was exercised
