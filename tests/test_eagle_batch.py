"""EAGLE heads drafting for a whole batch (drafters/eagle_batch.py): one head forward per level for every request,
the same per-request state as drafting alone, and lossless batches through the engine."""

from __future__ import annotations

import pytest
import torch

from drafters import eagle_batch
from drafters.eagle import EagleDrafter
from drafters.eagle3 import Eagle3Drafter
from specdec.generate import SpecDecoder
from specdec.models import hf_cache
from specdec.protocols import BatchDrafter
from specdec.types import DraftContext
from tests.equality import assert_all_greedy_equal, greedy_ref
from tests.test_eagle import tiny_head
from tests.test_eagle3 import tiny_head as tiny_head3
from tests.tiny import random_prompt, tiny_llama


def contexts(target, lengths, max_nodes=4):
    """Each prompt's first draft context: every prompt token but the root with its feature."""
    ctxs = []
    for seed, n in enumerate(lengths):
        ids = random_prompt(seed, n)
        with torch.no_grad():
            out = target(ids[:, :-1], output_hidden_states=True)
        ctxs.append(DraftContext(input_ids=ids, prompt_len=n, max_nodes=max_nodes, max_depth=16,
                                 hidden=out.hidden_states[-1]))
    return ctxs


def test_mask_golden():
    """Two requests: past 2 and 0, new pairs 1 and 2 (width 2, n 2); then chain level 1."""
    layout = eagle_batch.BatchLayout(torch.tensor([2, 0]), torch.tensor([1, 2]), 2, 2)
    allowed = (layout.mask(2, 0, torch.float32)[:, 0] == 0).int().tolist()
    assert allowed[0] == [[1, 1, 1, 0], [1, 1, 1, 1]]  # its second query is padding (sees the pad key: unused)
    assert allowed[1] == [[0, 0, 1, 0], [0, 0, 1, 1]]  # no past: its own new pairs only
    level = (layout.mask(1, 1, torch.float32)[:, 0, 0] == 0).int().tolist()
    assert level == [[1, 1, 1, 0, 1], [0, 0, 1, 1, 1]]  # past, its real new pairs, its chain so far


def test_batched_advance_leaves_each_request_as_drafting_alone_would():
    """After one batched advance, each request's head cache and root logits are those of its own advance."""
    target = tiny_llama(0)
    head = tiny_head(target, 96)
    ctxs = contexts(target, [5, 9, 2, 7])
    alone = [EagleDrafter(target, head=head) for _ in ctxs]
    roots = [d._advance(c) for d, c in zip(alone, ctxs)]
    first = EagleDrafter(target, head=head)
    together = [first] + [first.spawn() for _ in ctxs[1:]]
    g, _, _ = eagle_batch.advance(first, together, ctxs)
    with torch.inference_mode():
        torch.testing.assert_close(head.logits(g), torch.stack(roots))
    for a, b in zip(alone, together):
        assert a._pairs == b._pairs
        torch.testing.assert_close(hf_cache.layer_kv(b.cache)[0], hf_cache.layer_kv(a.cache)[0])


@pytest.mark.parametrize("kind", ["eagle", "eagle3"])
def test_chains_are_the_heads_greedy_continuations(kind):
    """A batched chain is what a one-request chain drafter (width 1) proposes for the same request: the head's
    top-1 path, one forward per level for the batch; its scores are the path probabilities."""
    target = tiny_llama(0)
    if kind == "eagle":
        head = tiny_head(target, 96)
        make = lambda **kw: EagleDrafter(target, head=head, **kw)  # noqa: E731
    else:
        head = tiny_head3(target, aux=(0, 1))
        make = lambda **kw: Eagle3Drafter(target, head=head, **kw)  # noqa: E731
    ctxs = contexts(target, [6, 3, 8], max_nodes=4)
    if kind == "eagle3":
        ctxs = [DraftContext(input_ids=c.input_ids, prompt_len=c.prompt_len, max_nodes=c.max_nodes, max_depth=16,
                             hidden=torch.cat([target(c.input_ids[:, :-1], output_hidden_states=True)
                                               .hidden_states[i] for i in (0, 1)], -1).detach()) for c in ctxs]
    first = make(depth=3, width=1)
    drafters = [first] + [first.spawn() for _ in ctxs[1:]]
    trees = first.propose_batch(drafters, ctxs)
    for ctx, tree in zip(ctxs, trees):
        want = make(depth=3, width=1).propose(ctx)
        assert tree.tokens.tolist() == want.tokens.tolist()
        assert tree.parents.tolist() == [[-1, 0, 1, 2]]
        s = tree.scores[0].tolist()
        assert s[0] == 1.0 and all(0 < b <= a for a, b in zip(s, s[1:]))


def test_budgets_and_one_token_prompts():
    """Each chain is cut to its request's own node budget; a one-token prompt (no feature yet) gets its root."""
    target = tiny_llama(0)
    first = EagleDrafter(target, head=tiny_head(target, 96), depth=4)
    ctxs = contexts(target, [6, 4], max_nodes=5)
    ctxs[1] = DraftContext(input_ids=ctxs[1].input_ids, prompt_len=4, max_nodes=2, max_depth=16,
                           hidden=ctxs[1].hidden)
    one = torch.tensor([[7]])
    ctxs.append(DraftContext(input_ids=one, prompt_len=1, max_nodes=5, max_depth=16,
                             hidden=torch.zeros(1, 0, target.config.hidden_size, dtype=target.dtype)))
    trees = first.propose_batch([first, first.spawn(), first.spawn()], ctxs)
    assert [t.num_nodes for t in trees] == [5, 2, 1]
    assert isinstance(first, BatchDrafter) and first.batched


def test_spawned_drafters_share_the_head_and_refuse_another():
    target = tiny_llama(0)
    first = EagleDrafter(target, head=tiny_head(target, 96))
    other = first.spawn()
    assert other.head is first.head and other.cache is not first.cache
    stranger = EagleDrafter(target, head=tiny_head(target, 96))
    with pytest.raises(Exception, match="share this drafter's head"):
        first.propose_batch([first, stranger], contexts(target, [4, 5]))


@pytest.mark.parametrize("batched", [True, False])
def test_batches_are_lossless_and_draft_once_per_level(batched, monkeypatch):
    """Greedy batches through the engine: every request's tokens are the target's own greedy continuation, drafting
    together or alone; drafting together runs the head once per level for the whole batch, not once per request."""
    target = tiny_llama(0, dtype=torch.float32)
    head = tiny_head(target, 96)
    prompts = [random_prompt(s, n) for s, n in enumerate([9, 4, 13, 1, 7])]
    refs = [greedy_ref(target, p, 12) for p in prompts]
    calls = []
    forward = type(head).forward
    monkeypatch.setattr(type(head), "forward", lambda self, feats, *a, **k: calls.append(feats.shape[0]) or
                        forward(self, feats, *a, **k))
    dec = SpecDecoder(target, drafter=EagleDrafter(target, head=head, depth=3, batched=batched), verifier="paged",
                      max_nodes=4, max_batch_size=3)
    outs = dec.generate_batch([p[0].tolist() for p in prompts], max_new_tokens=12)
    assert_all_greedy_equal(outs, refs)
    assert (max(calls) > 1) == batched  # together: batch rows in one head forward
