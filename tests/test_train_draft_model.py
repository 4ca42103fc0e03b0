"""Distilled draft model: losses (golden values), building from the target, training leaves the target alone, the
tiny end-to-end job, and loading its checkpoint in DraftModelDrafter (lossless, refused for another target)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaForCausalLM

import specdec
import train.draft_model as dm
from drafters.draft_model import DraftModelDrafter
from specdec import models
from specdec.errors import ConfigError
from specdec.models import checkpoint
from specdec.models.checkpoint import CheckpointError
from specdec.models.surgery import (
    DraftVocabHead,
    from_state,
    init_from_target,
    own_modules,
    resolve_init_layers,
    spread_layers,
)
from specdec.types import DraftContext
from tests.equality import assert_greedy_equal, greedy_ref
from tests.tiny import random_prompt, save_tiny, tiny_config, tiny_llama, tiny_tokenizer
from tests.train_fixtures import job_config
from train.features import Batch
from train.job import run

# ---------------------------------------------------------------------------------------------- losses


def probs(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_total_variation_golden_values():
    p = probs([0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [0.5, 0.5, 0.0])
    q = probs([0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [0.2, 0.3, 0.5], [1.0, 0.0, 0.0])
    assert dm.total_variation(p, q).tolist() == pytest.approx([0.0, 1.0, 0.0, 0.5])


def test_forward_kl_golden_values():
    p = probs([0.5, 0.5], [1.0, 0.0], [0.3, 0.7])
    q = probs([0.25, 0.75], [0.5, 0.5], [0.3, 0.7])
    assert dm.forward_kl(p.log(), q.log()).tolist() == pytest.approx([0.5 * math.log(4 / 3), math.log(2), 0.0])


def test_acceptance_is_one_minus_total_variation():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(5, 7, generator=g, dtype=torch.float64).softmax(-1)
    q = torch.rand(5, 7, generator=g, dtype=torch.float64).softmax(-1)
    accept = torch.minimum(p, q).sum(-1)  # speculative sampling accepts x ~ q with prob min(1, p(x)/q(x))
    assert torch.allclose(accept, 1 - dm.total_variation(p, q))


def test_distill_loss_from_logits():
    teacher = torch.tensor([[0.0, 0.0], [2.0, -1.0]])
    draft = torch.tensor([[math.log(1.0), math.log(3.0)], [2.0, -1.0]])  # q = [0.25, 0.75]; identical row
    assert dm.distill_loss(draft, teacher, "forward_kl").tolist() == pytest.approx([0.5 * math.log(4 / 3), 0.0],
                                                                                   abs=1e-6)
    assert dm.distill_loss(draft, teacher, "tv").tolist() == pytest.approx([0.25, 0.0], abs=1e-6)
    with pytest.raises(ConfigError, match="forward_kl"):
        dm.distill_loss(draft, teacher, "reverse_kl")


# ---------------------------------------------------------------------------------------------- layers and building


def test_spread_layers_include_first_and_last():
    assert spread_layers(4, 30) == [0, 10, 19, 29]
    assert spread_layers(2, 2) == [0, 1]
    assert spread_layers(3, 3) == [0, 1, 2]
    assert spread_layers(1, 30) == [0]
    with pytest.raises(ConfigError, match="1 to 2 layers"):
        spread_layers(3, 2)


def test_init_layers_lists():
    assert resolve_init_layers("spread", 2, 8) == [0, 7]
    assert resolve_init_layers([0, -1], 2, 8) == [0, 7]
    assert resolve_init_layers([3], None, 8) == [3]
    with pytest.raises(ConfigError, match="num_layers is 3"):
        resolve_init_layers([0, 1], 3, 8)
    with pytest.raises(ConfigError, match="indices"):
        resolve_init_layers([8], 1, 8)


def tied_target(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = tiny_config()
    cfg.tie_word_embeddings = True
    return LlamaForCausalLM(cfg).double().eval()


@pytest.mark.parametrize("make_target", [lambda: tiny_llama(0), tied_target], ids=["untied", "tied"])
def test_every_target_layer_gives_the_targets_logits(make_target):
    target = make_target()
    ids = random_prompt(0, 20, repeat=False)
    want = target(ids).logits
    copy = init_from_target(target, [0, 1])
    assert torch.equal(copy(ids).logits, want)
    own = {n: p.data_ptr() for n, p in copy.named_parameters()}
    assert not set(own.values()) & {p.data_ptr() for p in target.parameters()}  # a copy, nothing shared
    tied = target.config.tie_word_embeddings
    assert (copy.get_output_embeddings().weight is copy.get_input_embeddings().weight) == tied
    shipped = from_state(target, copy.config.to_dict(), own_modules(copy).state_dict())
    assert torch.equal(shipped(ids).logits, want)
    assert shipped.get_input_embeddings() is target.get_input_embeddings()  # the target's own, not a copy
    assert shipped.get_output_embeddings() is target.get_output_embeddings()


def test_a_cut_down_draft_model_has_the_chosen_layers():
    target = tiny_llama(0, layers=4)
    draft = init_from_target(target, [0, 3])
    assert draft.config.num_hidden_layers == 2 and target.config.num_hidden_layers == 4
    for j, i in enumerate([0, 3]):
        for (n, a), (_, b) in zip(draft.model.layers[j].named_parameters(), target.model.layers[i].named_parameters()):
            assert torch.equal(a, b), n
    assert [layer.self_attn.layer_idx for layer in draft.model.layers] == [0, 1]  # own cache slots


# ---------------------------------------------------------------------------------------------- training steps


def feature_batch(target, seed: int = 0) -> Batch:
    """A batch as the feature shards give it: the target's post-norm last hidden state at every position."""
    ids = torch.cat([random_prompt(seed, 16, repeat=False), random_prompt(seed + 1, 16, repeat=False)])
    with torch.no_grad():
        out = target(ids, output_hidden_states=True)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, 12:] = False  # right padding
    mask = torch.arange(16)[None].expand(2, 16) >= 4
    return Batch(ids, out.hidden_states[-1].float(), mask & valid, valid, out.logits.argmax(-1))


def module_for(target, **opts):
    drafter = {"num_layers": None, "init_layers": "spread", "loss": "tv", "lora_rank": 0, "save_dtype": "float32",
               "depth": 3, "width": 1, **opts}
    return dm.make_module(target, None, {"drafter": drafter})


@pytest.mark.parametrize("loss", ["tv", "forward_kl"])
def test_a_draft_with_every_layer_has_zero_loss(loss):
    target = tiny_llama(0, dtype=torch.float32)
    module = module_for(target, num_layers=2, loss=loss)
    value, metrics = dm.loss_fn(module, feature_batch(target))
    assert float(value.detach()) == pytest.approx(0.0, abs=1e-5) and metrics["top1"] == 1.0


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_training_changes_the_draft_and_never_the_target(lora_rank):
    target = tiny_llama(0, dtype=torch.float32)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    module = module_for(target, num_layers=1, lora_rank=lora_rank)
    frozen = [module.causal_lm.get_input_embeddings().weight, module.causal_lm.get_output_embeddings().weight]
    frozen_before = [w.clone() for w in frozen]
    init = dm.own_state(module)
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert trainable and not {p.data_ptr() for p in module.parameters()} & {p.data_ptr() for p in target.parameters()}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    batch = feature_batch(target)
    for _ in range(3):
        loss, _ = dm.loss_fn(module, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    assert all(torch.equal(w, b) for w, b in zip(frozen, frozen_before))  # embedding and LM head frozen
    assert torch.equal(frozen[0], target.get_input_embeddings().weight)
    after = dm.own_state(module)  # LoRA merged into the layer weights
    assert set(after) == set(init) and all(k.startswith(("layers.0.", "norm.")) for k in after)
    assert any(not torch.equal(after[k], init[k]) for k in after)


# ---------------------------------------------------------------------------------------------- the job end to end


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """The tiny job run twice (full fine-tune and LoRA) on one tiny target and one shared data step."""
    tmp = tmp_path_factory.mktemp("draft_model_job")
    out = {}
    for name, overrides in {"full": ["drafter.num_layers=1", "drafter.draft_vocab_size=40"],
                            "lora": ["drafter.num_layers=2", "drafter.lora_rank=4", "drafter.loss=forward_kl",
                                     "drafter.depth=3", "drafter.width=2"]}.items():
        cfg = job_config(tmp, "draft_model", overrides)
        cfg["output_dir"] = str(tmp / f"run-{name}")
        out[name] = run(dm.SPEC, cfg, progress=False)
    out["target"] = tmp / "target"
    return out


def test_job_never_changes_the_target(jobs):
    fresh = LlamaForCausalLM.from_pretrained(jobs["target"], dtype=torch.float32)
    used, _ = models.load_target(str(jobs["target"]), dtype="float32")  # the job's own (cached) target object
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in used.state_dict().items())


def test_checkpoint_ships_only_layers_and_norm(jobs):
    state, meta = checkpoint.load(jobs["full"], kind="draft_model")
    d2t = state.pop("d2t")  # the draft vocabulary: 40 most frequent answer tokens, ascending ids
    assert len(d2t) == 40 and torch.equal(d2t, d2t.sort().values) and len(set(d2t.tolist())) == 40
    assert set(state) == {k for k in state if k.startswith(("layers.0.", "norm."))} and "norm.weight" in state
    assert all(v.dtype == torch.float16 for v in state.values())
    cfg = meta["config"]
    assert cfg["num_layers"] == 1 and cfg["init_layers"] == [0] and cfg["loss"] == "tv" and cfg["lora_rank"] == 0
    assert cfg["hf_config"]["num_hidden_layers"] == 1 and (cfg["depth"], cfg["width"]) == (4, 1)
    target, _ = models.load_target(str(jobs["target"]), dtype="float32")
    start = target.model.layers[0].self_attn.q_proj.weight.half()
    assert not torch.equal(state["layers.0.self_attn.q_proj.weight"], start)  # trained away from its init layer
    assert "tau" in meta["training"]["val"] and "acceptance" in meta["training"]["val"]
    lora_state, lora_meta = checkpoint.load(jobs["lora"], kind="draft_model")
    assert lora_meta["config"]["init_layers"] == [0, 1] and lora_meta["config"]["lora_rank"] == 4
    assert not any("lora" in k for k in lora_state)  # merged into the layer weights
    assert "d2t" not in lora_state and lora_meta["config"]["draft_vocab_size"] == 4096  # >= the tiny vocab: all


def test_draft_vocabulary_head_scores_the_targets_rows(jobs):
    """A checkpoint with a draft vocabulary: the drafter's head is the target's LM head at those rows (ids mapped
    back through d2t), the vocabulary check still sees the target's size; full_vocab=True keeps the whole head."""
    target, _ = models.load_target(str(jobs["target"]), dtype="float32")
    drafter = DraftModelDrafter(target=target, path=str(jobs["full"]))
    head = drafter.model.get_output_embeddings()
    d2t = checkpoint.load(jobs["full"], kind="draft_model")[0]["d2t"]
    assert isinstance(head, DraftVocabHead) and torch.equal(drafter.vocab.ids, d2t)
    assert torch.equal(head.weight, target.get_output_embeddings().weight[d2t])
    assert drafter.vocab_size == models.vocab_size(target) and head.weight.data_ptr() != target.lm_head.weight.data_ptr()
    full = DraftModelDrafter(target=target, path=str(jobs["full"]), full_vocab=True)
    assert full.vocab.ids is None and full.model.get_output_embeddings() is target.get_output_embeddings()
    ids = random_prompt(5, 9)
    tree = drafter.propose(DraftContext(input_ids=ids, prompt_len=9, max_nodes=8, max_depth=4))
    assert set(tree.tokens[0, 1:].tolist()) <= set(d2t.tolist())  # every draft token is a draft-vocabulary id


@pytest.mark.parametrize("run_name", ["full", "lora"])
def test_trained_draft_model_decodes_losslessly(jobs, run_name):
    target, _ = models.load_target(str(jobs["target"]), dtype="float64")  # float64: no argmax ties flip
    tok = tiny_tokenizer()
    steps = accepted = 0
    for seed, length, new in [(0, 12, 24), (1, 1, 16), (2, 30, 24), (3, 5, 20)]:
        ids = random_prompt(seed, length, repeat=seed % 2 == 0)
        drafter = DraftModelDrafter(target=target, path=str(jobs[run_name]))
        assert drafter.model.dtype == torch.float64
        out = specdec.generate(target, ids, tokenizer=tok, drafter=drafter, max_new_tokens=new)
        assert_greedy_equal(out, greedy_ref(target, ids, new), f"{run_name} seed {seed}")
        steps, accepted = steps + out.stats.verify_steps, accepted + sum(out.stats.accepted)
    if run_name == "lora":  # both target layers, barely trained: nearly the target, most paths fully accepted
        assert accepted > 2 * steps, (accepted, steps)  # tree depth 3


def test_recommended_tree_shape_and_overrides(jobs):
    target, _ = models.load_target(str(jobs["target"]), dtype="float32")
    assert DraftModelDrafter(target=target, path=str(jobs["full"])).grower.shape.depths == [0, 1, 2, 3, 4]
    lora = DraftModelDrafter(target=target, path=str(jobs["lora"]))  # depth 3, width 2 from the checkpoint
    assert lora.grower.shape.parents == [-1, 0, 0, 1, 2, 3, 4]
    assert DraftModelDrafter(target=target, path=str(jobs["lora"]), depth=2, width=1).grower.shape.parents == [-1, 0, 1]


def test_checkpoint_for_another_target_is_refused(jobs, tmp_path):
    for seed, cfg in [(1, {}), (0, {"hidden": 64})]:
        other, _ = models.load_target(str(save_tiny(tmp_path / f"other-{seed}-{len(cfg)}", seed=seed, **cfg)))
        with pytest.raises(CheckpointError, match="different target"):
            DraftModelDrafter(target=other, path=str(jobs["full"]))


def test_loader_errors_name_the_fix(jobs, tmp_path):
    target, _ = models.load_target(str(jobs["target"]), dtype="float32")
    with pytest.raises(ConfigError, match="target="):
        DraftModelDrafter(path=str(jobs["full"]))
    with pytest.raises(ConfigError, match="target's dtype"):
        DraftModelDrafter(target=target, path=str(jobs["full"]), dtype="bfloat16")
    other = checkpoint.save(tmp_path / "eagle", "eagle", {"x": torch.zeros(1)}, {}, target=target)
    with pytest.raises(CheckpointError, match="not 'draft_model'"):
        DraftModelDrafter(target=target, path=str(other))
