"""Layer-skip self-draft: the view equals the target minus the skipped layers, leaves the target untouched, keeps
its KV cache consistent, decodes losslessly, and its training job writes a checkpoint that loads."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

import specdec
from drafters.layerskip import ExitAdapter, LayerSkipDrafter, check_skips, skip_view
from specdec.errors import ConfigError
from specdec.models import checkpoint, hf_cache
from specdec.models.checkpoint import CheckpointError
from specdec.models.hf_forward import forward_masked, forward_tokens
from specdec.models.surgery import DraftVocabHead
from tests.equality import assert_greedy_equal, greedy_ref
from tests.tiny import random_prompt, save_tiny, tiny_llama
from tests.train_fixtures import job_config
from train import job, layerskip

LAYERS = 4


def target4(seed: int = 0, dtype=torch.float64):
    return tiny_llama(seed, dtype=dtype, layers=LAYERS)


def snapshot(model) -> dict:
    """Everything a view could disturb: parameter values, module types and hooks, the layer list."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": [(n, type(m), len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()],
        "layers": list(model.model.layers),
        "norm": model.model.norm,
        "inner": model.model,
    }


def assert_untouched(model, snap: dict) -> None:
    now = snapshot(model)
    assert now["modules"] == snap["modules"]
    assert now["layers"] == snap["layers"] and now["norm"] is snap["norm"] and now["inner"] is snap["inner"]
    assert all(type(layer) is LlamaDecoderLayer for layer in model.model.layers)
    assert type(model.model.norm) is LlamaRMSNorm
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), k


def random_adapter(h: int, rank: int = 4, seed: int = 3) -> ExitAdapter:
    torch.manual_seed(seed)
    adapter = ExitAdapter(h, rank)
    with torch.no_grad():
        adapter.up.weight.normal_(0, 0.5)  # a trained-looking adapter: far from the identity
    return adapter


# ------------------------------------------------------------------ the view


def test_view_with_nothing_skipped_is_the_target():
    target = target4()
    ids = random_prompt(0, 11)
    view = skip_view(target)
    assert torch.equal(view(ids).logits, target(ids).logits)
    assert view is not target and view.model is not target.model and view.model.layers is not target.model.layers


def smaller_model(target, keep: list[int]) -> LlamaForCausalLM:
    """A genuinely smaller Llama holding only the target's layers ``keep`` (the reference for skipping)."""
    cfg = copy.deepcopy(target.config)
    cfg.num_hidden_layers = len(keep)
    small = LlamaForCausalLM(cfg).to(target.dtype).eval()
    state = {}
    for k, v in target.state_dict().items():
        if k.startswith("model.layers."):
            i = int(k.split(".")[2])
            if i not in keep:
                continue
            k = k.replace(f"model.layers.{i}.", f"model.layers.{keep.index(i)}.", 1)
        state[k] = v
    small.load_state_dict(state)
    return small


@pytest.mark.parametrize("skip", [[2], [1, 3], [1, 2, 3]])
def test_skipping_layers_equals_a_smaller_model(skip):
    target = target4()
    ids = random_prompt(1, 13, repeat=False)
    ref = smaller_model(target, [i for i in range(LAYERS) if i not in skip])(ids).logits
    torch.testing.assert_close(skip_view(target, skip)(ids).logits, ref, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(ref, target(ids).logits)


def test_skipping_attention_equals_zeroed_attention_output():
    target = target4()
    ids = random_prompt(2, 9, repeat=False)
    ref_model = copy.deepcopy(target)
    with torch.no_grad():
        for i in (2, 3):
            ref_model.model.layers[i].self_attn.o_proj.weight.zero_()  # attention adds nothing to the residual
    torch.testing.assert_close(skip_view(target, [], [2, 3])(ids).logits, ref_model(ids).logits,
                               rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # and both kinds together: layer 1 adds nothing at all
        ref_model.model.layers[1].self_attn.o_proj.weight.zero_()
        ref_model.model.layers[1].mlp.down_proj.weight.zero_()
    torch.testing.assert_close(skip_view(target, [1], [2, 3])(ids).logits, ref_model(ids).logits,
                               rtol=1e-10, atol=1e-10)


def test_adapter_starts_as_identity_and_sits_before_the_final_norm():
    target = target4()
    ids = random_prompt(3, 8)
    h = target.config.hidden_size
    fresh = ExitAdapter(h, 4).double()
    torch.testing.assert_close(skip_view(target, [2], adapter=fresh)(ids).logits, skip_view(target, [2])(ids).logits)
    adapter = random_adapter(h).double()
    pre = skip_view(target, [2], final_norm=False).model(input_ids=ids).last_hidden_state
    manual = target.lm_head(target.model.norm(adapter(pre)))
    torch.testing.assert_close(skip_view(target, [2], adapter=adapter)(ids).logits, manual)


def test_building_and_running_views_leaves_the_target_untouched():
    target = target4()
    ids = random_prompt(4, 10)
    before = target(ids).logits
    snap = snapshot(target)
    view = skip_view(target, [1, 3], [2], adapter=random_adapter(target.config.hidden_size).double())
    view(ids)
    skip_view(target, [2], final_norm=False).model(input_ids=ids)
    LayerSkipDrafter(target, skip_layers=[2], adapter=random_adapter(target.config.hidden_size))
    assert_untouched(target, snap)
    assert torch.equal(target(ids).logits, before)
    # the view shares the target's parameters (no copy)
    assert view.model.embed_tokens.weight is target.model.embed_tokens.weight
    assert view.model.layers[0].self_attn.q_proj.weight is target.model.layers[0].self_attn.q_proj.weight


def test_skipped_layers_leave_cache_holes_and_incremental_equals_full():
    target = target4()
    view = skip_view(target, [1], [3])
    ids = random_prompt(5, 12, repeat=False)
    full = view(ids).logits
    cache = hf_cache.new_cache()
    first = forward_tokens(view, cache, ids[:, :7]).logits
    rest = forward_tokens(view, cache, ids[:, 7:]).logits
    torch.testing.assert_close(torch.cat([first, rest], 1), full)
    assert hf_cache.cache_length(cache) == 12
    written = [i for i, layer in enumerate(cache.layers) if getattr(layer, "is_initialized", False)]
    assert written == [0, 2]  # layer 1 skipped, layer 3's attention skipped
    hf_cache.crop(cache, 9)
    assert hf_cache.cache_length(cache) == 9 and cache.layers[2].keys.shape[-2] == 9
    torch.testing.assert_close(forward_tokens(view, cache, ids[:, 9:]).logits, full[:, 9:])


def test_keep_positions_with_cache_holes():
    """Two siblings a, b after a 5-token prefix; keep only b, then c after it equals a plain run of prefix+b+c."""
    target = target4()
    view = skip_view(target, [2])
    prefix, a, b, c = random_prompt(6, 5, repeat=False), 7, 9, 11
    cache = hf_cache.new_cache()
    forward_tokens(view, cache, prefix)
    mask = torch.full((1, 1, 2, 7), torch.finfo(view.dtype).min, dtype=view.dtype)
    mask[..., :5] = 0
    mask[0, 0, 0, 5] = mask[0, 0, 1, 6] = 0  # each sibling sees the prefix and itself
    forward_masked(view, cache, torch.tensor([[a, b]]), mask, torch.tensor([[5, 5]]))
    hf_cache.keep_positions(cache, 5, [1])
    assert hf_cache.cache_length(cache) == 6 and not getattr(cache.layers[2], "is_initialized", False)
    got = forward_tokens(view, cache, torch.tensor([[c]])).logits[:, -1]
    ref = view(torch.cat([prefix, torch.tensor([[b, c]])], 1)).logits[:, -1]
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("skip, attention", [([0], []), ([], [0]), ([4], []), ([1], [9]), ([-1], []),
                                             ([1, 2], [2])])
def test_bad_skip_lists_are_refused(skip, attention):
    target = target4()
    with pytest.raises(ConfigError, match="layer 0|out of range|both"):
        LayerSkipDrafter(target, skip_layers=skip, skip_attention=attention)


def test_check_skips_golden():
    assert check_skips(4, [3, 2, 3], [1]) == ([2, 3], [1])
    assert check_skips(4) == ([], [])
    with pytest.raises(ConfigError, match="list of layer indices"):
        check_skips(4, "auto")


def test_path_and_skip_lists_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="either path"):
        LayerSkipDrafter(target4(), path=str(tmp_path), skip_layers=[1])
    with pytest.raises(ConfigError, match="pass target"):
        LayerSkipDrafter(skip_layers=[1])


# ------------------------------------------------------------------ decoding


def assert_lossless(target, drafter, seeds=range(4), n: int = 20, **kwargs):
    for seed in seeds:
        ids = random_prompt(seed, 7 + 2 * seed, repeat=seed % 2 == 0)
        out = specdec.generate(target, ids, drafter=drafter, max_new_tokens=n, **kwargs)
        assert_greedy_equal(out, greedy_ref(target, ids, n), f"seed {seed}")


@pytest.mark.parametrize("skip, attention, adapter, width", [
    ([2], [], False, 1), ([1, 3], [], False, 2), ([3], [1, 2], True, 1), ([1, 2, 3], [], True, 3)])
def test_lossless_greedy(skip, attention, adapter, width):
    target = target4()
    snap = snapshot(target)
    ad = random_adapter(target.config.hidden_size) if adapter else None
    drafter = LayerSkipDrafter(target, skip_layers=skip, skip_attention=attention, adapter=ad, depth=3, width=width)
    assert drafter.vocab_size == target.config.vocab_size
    assert_lossless(target, drafter)
    out = specdec.generate(target, random_prompt(0, 9), drafter=drafter, max_new_tokens=12, do_sample=True, seed=1)
    assert len(out.new_tokens) > 0
    assert_untouched(target, snap)


def test_nothing_skipped_is_a_perfect_self_draft():
    target = target4()
    drafter = LayerSkipDrafter(target, skip_layers=[], depth=4)
    out = specdec.generate(target, random_prompt(1, 9), drafter=drafter, max_new_tokens=20, eos_token_id=None)
    assert sum(out.stats.drafted) > 0 and out.stats.accepted == out.stats.drafted


def test_no_shipped_checkpoint_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(checkpoint, "SHIPPED", tmp_path)
    with pytest.raises(CheckpointError, match="drafter.path"):
        LayerSkipDrafter(target4())


# ------------------------------------------------------------------ the training job


def layerskip_config(tmp, overrides: list[str]) -> dict:
    save_tiny(tmp / "target", seed=0, layers=LAYERS)  # job_config keeps an existing target directory
    return job_config(tmp, "layerskip", overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layerskip")
    cfg = layerskip_config(tmp, ["drafter.skip_layers=[2]", "drafter.skip_attention=[3]", "drafter.adapter_rank=8",
                                 "train.lr=0.01", "drafter.draft_vocab_size=48", "drafter.depth=3"])
    return job.run(layerskip.SPEC, cfg, progress=False), tmp


def test_job_writes_checkpoint_with_card(trained):
    final, _ = trained
    meta = checkpoint.read_meta(final)
    assert meta["kind"] == "layerskip"
    assert meta["config"] == {"skip_layers": [2], "skip_attention": [3], "adapter_rank": 8, "depth": 3,
                              "num_layers": LAYERS, "draft_vocab_size": 48}
    val = meta["training"]["val"]
    assert {"top1", "top1_skip", "tau"} <= set(val) and 0 <= val["top1"] <= 1
    state, _ = checkpoint.load(final)
    assert set(state) == {"norm.weight", "down.weight", "up.weight", "d2t"}
    assert len(state["d2t"]) == 48 and torch.equal(state["d2t"], state["d2t"].sort().values)
    assert state["up.weight"].abs().sum() > 0  # trained away from the identity
    assert "## How it was made" in (final / "README.md").read_text()


def test_trained_drafter_loads_is_lossless_and_target_unchanged(trained):
    final, tmp = trained
    target, tok = specdec.models.load_target(str(tmp / "target"))  # the very object the job trained with
    fresh = tiny_llama(0, dtype=torch.float32, layers=LAYERS)
    ids = random_prompt(3, 10)
    assert torch.equal(target(ids).logits, fresh(ids).logits)
    assert all(type(layer) is LlamaDecoderLayer for layer in target.model.layers)
    assert type(target.model.norm) is LlamaRMSNorm
    drafter = LayerSkipDrafter(target, path=str(final))
    assert drafter.skip_layers == [2] and drafter.skip_attention == [3] and drafter.adapter is not None
    assert len(drafter.grower.shape.parents) == 4  # depth 3 from the checkpoint: root + 3
    head = drafter.model.get_output_embeddings()  # the view's own head over the draft vocabulary
    d2t = checkpoint.load(final)[0]["d2t"]
    assert isinstance(head, DraftVocabHead) and torch.equal(drafter.vocab.ids, d2t)
    assert torch.equal(head.weight, target.get_output_embeddings().weight[d2t])
    assert target.get_output_embeddings().weight.shape[0] == drafter.vocab_size  # the target's head untouched
    assert LayerSkipDrafter(target, path=str(final), full_vocab=True).vocab.ids is None
    assert_lossless(target, drafter, seeds=range(3), n=16)
    out = specdec.generate(target, random_prompt(0, 12), tokenizer=tok, drafter=str(final), max_new_tokens=16)
    assert_greedy_equal(out, greedy_ref(target, random_prompt(0, 12), 16))
    assert torch.equal(target(ids).logits, fresh(ids).logits)


def test_checkpoint_for_another_target_is_refused(trained):
    final, _ = trained
    with pytest.raises(CheckpointError, match="different target"):
        LayerSkipDrafter(tiny_llama(5, dtype=torch.float32, layers=LAYERS), path=str(final))


def test_auto_skip_without_adapter(tmp_path):
    cfg = layerskip_config(tmp_path, ["drafter.skip_layers=auto", "drafter.num_skip=2", "drafter.adapter_rank=0",
                                      "train.steps=1"])
    final = job.run(layerskip.SPEC, cfg, progress=False)
    state, meta = checkpoint.load(final)
    assert state == {}
    chosen = meta["config"]["skip_layers"]
    assert len(chosen) == 2 and all(1 <= i < LAYERS for i in chosen) and meta["config"]["adapter_rank"] == 0
    target, _ = specdec.models.load_target(str(tmp_path / "target"))
    drafter = LayerSkipDrafter(target, path=str(final), depth=2)
    assert drafter.adapter is None and drafter.skip_layers == chosen
    assert_lossless(target, drafter, seeds=range(2), n=12)


def test_auto_skip_needs_a_valid_count(tmp_path):
    cfg = layerskip_config(tmp_path, ["drafter.skip_layers=auto", "drafter.num_skip=9"])
    with pytest.raises(ConfigError, match="num_skip"):
        job.run(layerskip.SPEC, cfg, progress=False)


def test_loss_is_zero_for_the_unskipped_target(trained):
    """Nothing skipped, fresh adapter: the view's distribution is the target's, so KL ~ 0 and top-1 agreement 1."""
    _, tmp = trained
    from train import dataset

    target, tok = specdec.models.load_target(str(tmp / "target"))
    cfg = job_config(tmp, "layerskip", ["drafter.skip_layers=[]", "drafter.adapter_rank=4"])
    data = dataset.build(cfg["data"], target, tok, progress=False)  # the fixture's cached features
    module = layerskip.make_module(target, data, cfg)
    loss, metrics = layerskip.loss_fn(module, data.train.batch(list(range(min(4, len(data.train))))))
    assert float(loss.detach()) < 1e-3 and metrics["top1"] == 1.0
    assert layerskip.metrics(module, data.val) == {"top1": 1.0, "top1_skip": 1.0}
