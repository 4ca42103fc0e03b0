"""EAGLE-style head: masks, vocabulary reduction, cache consistency, the tiny end-to-end job and losslessness."""

from __future__ import annotations

import pytest
import torch

import specdec
from drafters.eagle import EagleDrafter, EagleHead, causal_mask, reduced_vocab
from specdec.models import checkpoint, hf_cache
from specdec.models.checkpoint import CheckpointError
from tests.equality import assert_greedy_equal, greedy_ref
from tests.tiny import random_prompt, tiny_llama
from tests.train_fixtures import job_config
from train import eagle, job
from train.eagle import unrolled_mask


def allowed(mask: torch.Tensor) -> list[list[int]]:
    return (mask[0, 0] == 0).int().tolist()


def test_unrolled_mask_golden():
    assert allowed(unrolled_mask(3, 0, torch.float32)) == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    # block 1, query i: true pairs j <= i-1, and its own predicted pair at i
    assert allowed(unrolled_mask(3, 1, torch.float32)) == [[0, 0, 0, 1, 0, 0],
                                                           [1, 0, 0, 0, 1, 0],
                                                           [1, 1, 0, 0, 0, 1]]
    # block 2, query i: true j <= i-2, block-1 pair at i-1, block-2 pair at i
    assert allowed(unrolled_mask(3, 2, torch.float32))[2] == [1, 0, 0, 0, 1, 0, 0, 0, 1]


def test_causal_mask_with_past():
    assert allowed(causal_mask(2, 2, torch.float32)) == [[1, 1, 1, 0], [1, 1, 1, 1]]


def test_reduced_vocab_keeps_most_frequent_and_required():
    counts = torch.tensor([5, 0, 9, 1, 7, 0])
    assert reduced_vocab(counts, 3).tolist() == [0, 2, 4]
    assert reduced_vocab(counts, 3, always=[5]).tolist() == [2, 4, 5]
    assert reduced_vocab(counts, 0).tolist() == list(range(6))


def tiny_head(target, vocab: int = 40) -> EagleHead:
    torch.manual_seed(1)
    head = EagleHead.for_target(target, torch.arange(vocab)).to(target.dtype)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.2)
    return head.eval()


def check_cache_matches_full(head, feat_width: int, width: int, dtype: torch.dtype) -> None:
    """A head run in two cached chunks (4 + 3 positions) equals one full causal forward."""
    feats = torch.randn(1, 7, feat_width, dtype=dtype)
    emb = torch.randn(1, 7, width, dtype=dtype)
    pos = torch.arange(7)[None]
    full = head(feats, emb, pos, causal_mask(0, 7, dtype))
    cache = hf_cache.new_cache()
    first = head(feats[:, :4], emb[:, :4], pos[:, :4], causal_mask(0, 4, dtype), cache)
    rest = head(feats[:, 4:], emb[:, 4:], pos[:, 4:], causal_mask(4, 3, dtype), cache)
    torch.testing.assert_close(torch.cat([first, rest], 1), full)


def test_head_cache_matches_full_forward():
    target = tiny_llama(0)
    h = target.config.hidden_size
    check_cache_matches_full(tiny_head(target), h, h, target.dtype)


@pytest.mark.parametrize("choices", [None, [[0]], [[0], [1], [0, 0], [0, 0, 0], [1, 0]]])
def test_random_head_is_lossless(choices):
    target = tiny_llama(0)
    drafter = EagleDrafter(target, head=tiny_head(target, 96), choices=choices)
    for seed in range(4):
        ids = random_prompt(seed, 9 + seed)
        out = specdec.generate(target, ids, drafter=drafter, max_new_tokens=20)
        assert_greedy_equal(out, greedy_ref(target, ids, 20), f"seed {seed}")


def test_head_in_another_dtype_than_the_target():
    """``dtype``: the head may run in bfloat16 beside a float32 target (the target's embeddings and features are
    cast to it; the fast float32 linear kernel leaves its layers alone); still lossless."""
    target = tiny_llama(0, dtype=torch.float32)
    drafter = EagleDrafter(target, head=tiny_head(target, 96), dtype="bfloat16", dynamic=True, top_k=2)
    assert drafter.dtype == torch.bfloat16
    ids = random_prompt(1, 11)
    out = specdec.generate(target, ids, drafter=drafter, max_new_tokens=16, fast_linears=True)
    assert_greedy_equal(out, greedy_ref(target, ids, 16))
    assert out.stats.verify_steps <= len(out.new_tokens)


def test_one_token_prompt():
    target = tiny_llama(0)
    drafter = EagleDrafter(target, head=tiny_head(target, 96))
    ids = torch.tensor([[5]])
    assert_greedy_equal(specdec.generate(target, ids, drafter=drafter, max_new_tokens=8), greedy_ref(target, ids, 8))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eagle")
    cfg = job_config(tmp, "eagle", ["drafter.draft_vocab_size=64"])
    return job.run(eagle.SPEC, cfg, progress=False), tmp


def test_job_writes_checkpoint_with_card(trained):
    final, _ = trained
    meta = checkpoint.read_meta(final)
    assert meta["kind"] == "eagle" and meta["config"]["choices"]
    assert meta["training"]["train_steps"] == 4
    assert "tau" in meta["training"]["val"]
    assert "## How it was made" in (final / "README.md").read_text()


def test_trained_drafter_loads_and_is_lossless(trained):
    final, tmp = trained
    target, tok = specdec.models.load_target(str(tmp / "target"))
    for seed in range(3):
        ids = random_prompt(seed, 12)
        out = specdec.generate(target, ids, tokenizer=tok, drafter=str(final), max_new_tokens=16)  # by path
        assert_greedy_equal(out, greedy_ref(target, ids, 16), f"seed {seed}")
    sampled = specdec.generate(target, random_prompt(0, 12), drafter=str(final), max_new_tokens=16,
                               do_sample=True, seed=3)
    assert len(sampled.new_tokens) > 0


def test_checkpoint_for_another_target_is_refused(trained):
    final, _ = trained
    other = tiny_llama(5, dtype=torch.float32)  # same shapes, other weights
    with pytest.raises(CheckpointError, match="different target"):
        EagleDrafter(other, path=str(final))
    with pytest.raises(CheckpointError, match="different target"):
        EagleDrafter(tiny_llama(0, hidden=48), path=str(final))


def test_wrong_kind_and_corrupt_checkpoint_are_refused(trained, tmp_path):
    final, tmp = trained
    target, _ = specdec.models.load_target(str(tmp / "target"))
    state, meta = checkpoint.load(final)
    bad_kind = checkpoint.save(tmp_path / "m", "medusa", state, meta["config"], target=target)
    with pytest.raises(CheckpointError, match="not 'eagle'"):
        EagleDrafter(target, path=str(bad_kind))
    corrupt = checkpoint.save(tmp_path / "c", "eagle", state, meta["config"], target=target)
    (corrupt / checkpoint.WEIGHTS).write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        EagleDrafter(target, path=str(corrupt))
    with pytest.raises(CheckpointError, match="not a drafter checkpoint"):
        EagleDrafter(target, path=str(tmp_path))


def test_job_resume_at_the_end_reproduces_the_checkpoint(trained):
    """``resume=true`` after a finished run loads the final training state and exports the same drafter."""
    final, tmp = trained
    cfg = job_config(tmp, "eagle", ["drafter.draft_vocab_size=64", "resume=true"])
    before, _ = checkpoint.load(final)
    after, _ = checkpoint.load(job.run(eagle.SPEC, cfg, progress=False))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_loss_aligns_pairs_with_the_next_feature_and_the_token_after():
    """Pair i = (f_i, x_{i+1}) is scored against f_{i+1} and the target's distribution at i+1 (token x_{i+2}),
    only where x_{i+2} is a training token; a hand computation of the same terms gives the same loss."""
    from train.features import Batch

    target = tiny_llama(0, dtype=torch.float32)

    class Data:
        class train:
            @staticmethod
            def token_counts(v):
                return torch.ones(v)

    cfg = {"drafter": {"draft_vocab_size": 0, "unroll": 1, "unroll_decay": 0.8, "feature_weight": 0.5,
                       "token_weight": 2.0, "init_layer": None, "tree_nodes": 4, "max_depth": 2, "ranks": 2}}
    module = eagle.make_module(target, Data, cfg)
    torch.manual_seed(0)
    L, H = 6, target.config.hidden_size
    tokens = torch.randint(3, 96, (1, L))
    hidden = torch.randn(1, L, H)
    loss_mask = torch.tensor([[False, False, True, True, False, True]])
    batch = Batch(tokens, hidden, loss_mask, torch.ones(1, L, dtype=torch.bool), torch.randint(0, 96, (1, L)))
    loss, metrics = eagle.loss_fn(module, batch)

    g = module.head(hidden[:, :-1], target.get_input_embeddings()(tokens[:, 1:]), torch.arange(L - 1)[None],
                    unrolled_mask(L - 1, 0, torch.float32))
    keep = [i for i in range(L - 2) if loss_mask[0, i + 2]]  # pairs whose drafted token x_{i+2} is trained
    assert keep == [0, 1, 3]
    teacher = torch.softmax(hidden[0, 1:] @ target.lm_head.weight.T, -1)
    ce = -(teacher * torch.log_softmax(module.head.logits(g[0]), -1)).sum(-1)
    reg = torch.nn.functional.smooth_l1_loss(g[0], hidden[0, 1:], reduction="none").mean(-1)
    expected = 0.5 * reg[keep].mean() + 2.0 * ce[keep].mean()
    torch.testing.assert_close(loss, expected)
    top1 = (module.head.logits(g[0]).argmax(-1) == batch.target_top1[0, 1:]).float()[keep].mean()
    assert abs(metrics["depth1_top1"] - float(top1)) < 1e-6


def test_fine_tune_from_a_trained_head(trained, tmp_path):
    """``drafter.init_from=<checkpoint>`` starts from that head (same draft vocabulary) instead of a fresh one."""
    final, tmp = trained
    cfg = job_config(tmp, "eagle", [f"drafter.init_from={final}", f"output_dir={tmp_path / 'ft'}"])
    target, _ = specdec.models.load_target(str(tmp / "target"))

    class Data:
        train = None

    module = eagle.make_module(target, Data, cfg)
    state, _ = checkpoint.load(final)
    assert all(torch.equal(module.head.state_dict()[k].to(state[k].dtype), state[k]) for k in state)
    out = job.run(eagle.SPEC, cfg, progress=False)
    assert torch.equal(checkpoint.load(out)[0]["d2t"], state["d2t"])


@pytest.mark.parametrize("dynamic", [False, True])
def test_reduced_vocab_proposals_are_the_heads_top_tokens_mapped_to_target_ids(dynamic):
    """Top-k runs over the draft vocabulary; the tree holds the target ids ``d2t`` maps those entries to."""
    target = tiny_llama(0)
    d2t = torch.randperm(96, generator=torch.Generator().manual_seed(1))[:40]
    head = EagleHead.for_target(target, d2t).to(target.dtype)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.2)
    drafter = EagleDrafter(target, head=head.eval(), choices=[[0], [1], [2]], dynamic=dynamic, top_k=3, depth=1)
    ids = random_prompt(0, 12)
    with torch.inference_mode():
        hidden = target(ids[:, :-1], output_hidden_states=True).hidden_states[-1]
        tree = drafter.propose(specdec.DraftContext(input_ids=ids, prompt_len=12, max_nodes=4, max_depth=4,
                                                    hidden=hidden))
        g = head(hidden, target.get_input_embeddings()(ids[:, 1:]), torch.arange(11)[None],
                 causal_mask(0, 11, target.dtype))
        want = d2t[head.logits(g[0, -1]).topk(3).indices].tolist()
    assert tree.tokens[0, 1:].tolist() == want
    assert set(want) <= set(d2t.tolist())
