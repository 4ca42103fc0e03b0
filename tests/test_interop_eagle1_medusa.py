"""Public EAGLE-1 and Medusa checkpoints (specdec.interop.eagle1 / .medusa): directories written by hand in the
engines' and research repos' layouts load through ``generate(drafter=<dir>)`` losslessly, propose exactly what the
same weights built directly propose, Medusa export -> import round-trips bitwise, the exported config.json is what
vLLM reads, pickles need an opt-in, and heads made for another target are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import specdec
from drafters.eagle import EagleDrafter, EagleHead
from drafters.medusa import MedusaDrafter, MedusaHeads
from specdec import interop
from specdec.algorithms.sampling import SamplingParams
from specdec.interop import eagle1, medusa
from specdec.models import checkpoint
from specdec.models.checkpoint import CheckpointError
from specdec.types import DraftContext
from tests.equality import assert_greedy_equal, greedy_ref
from tests.tiny import random_prompt, tiny_llama

V, H = 96, 32
CHOICES = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]


@pytest.fixture(scope="module")
def target():
    return tiny_llama(0)


def assert_lossless(target, drafter, n: int = 16, **kwargs) -> None:
    for seed in range(2):
        ids = random_prompt(seed, 8 + seed)
        out = specdec.generate(target, ids, drafter=drafter, max_new_tokens=n, **kwargs)
        assert_greedy_equal(out, greedy_ref(target, ids, n), f"seed {seed}")


def contexts(hidden_size: int = H, sample: bool = False) -> list[DraftContext]:
    """Two first proposals on random features: greedy, and sampled with a seeded generator."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 6, hidden_size, dtype=torch.float64, generator=g)
    sampling = SamplingParams(do_sample=True, temperature=0.8, top_k=20) if sample else None
    return [DraftContext(input_ids=random_prompt(3, 7), prompt_len=7, max_nodes=8, max_depth=4, hidden=hidden,
                         sampling=sampling, generator=torch.Generator().manual_seed(1) if sample else None)]


def assert_same_proposals(make_a, make_b, hidden_size: int = H) -> None:
    """Fresh drafters from both makers propose bitwise-equal trees (tokens, parents, draft probabilities)."""
    for sample in (False, True):
        for ctx_a, ctx_b in zip(contexts(hidden_size, sample), contexts(hidden_size, sample)):
            a, b = make_a().propose(ctx_a), make_b().propose(ctx_b)
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.parents, b.parents)
            assert (a.draft_probs is None) == (b.draft_probs is None)
            if a.draft_probs is not None:
                assert torch.equal(a.draft_probs, b.draft_probs)


# ---------------------------------------------------------------- EAGLE-1
def eagle1_head(target, bias: bool, seed: int = 1) -> EagleHead:
    """An EAGLE-1 head built directly: no input norm on the layer, the target's LM head, random weights."""
    torch.manual_seed(seed)
    head = EagleHead.for_target(target, torch.arange(V), input_norm=False).to(torch.float64)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name != "lm_head.weight":
                p.normal_(0, 0.2)
        if not bias:
            head.fc.bias.zero_()
        head.lm_head.weight.copy_(target.lm_head.weight)
    return head.eval()


def eagle1_config(target, **extra) -> dict:
    """The EAGLE repo's config.json: a one-layer Llama (as transformers 4.x wrote it)."""
    c = target.config
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "num_hidden_layers": 1, "hidden_act": "silu",
            "rms_norm_eps": c.rms_norm_eps, "max_position_embeddings": 2048, "rope_theta": 10000.0,
            "vocab_size": c.vocab_size, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
            "torch_dtype": "float16", "transformers_version": "4.28.1", **extra}


def write_eagle1(path: Path, target, head: EagleHead, bias: bool, pickle: bool = False, prefix: str = "",
                 config: dict | None = None) -> Path:
    path.mkdir(parents=True)
    weights = {"fc.weight": head.fc.weight, "embed_tokens.weight": target.model.embed_tokens.weight}
    if bias:
        weights["fc.bias"] = head.fc.bias
    weights |= {f"layers.0.{k}": v for k, v in head.layer.state_dict().items()}
    weights = {prefix + k: v.detach().clone().contiguous() for k, v in weights.items()}
    assert not any("input_layernorm" in k for k in weights)  # EAGLE-1's layer 0 has none
    if pickle:
        torch.save(weights, path / "pytorch_model.bin")
    else:
        save_file(weights, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config or eagle1_config(target, bias=bias)))
    return path


@pytest.mark.parametrize("bias", [True, False])
def test_eagle1_is_lossless_and_proposes_as_built_directly(tmp_path, target, bias):
    head = eagle1_head(target, bias)
    d = write_eagle1(tmp_path / "eagle1", target, head, bias)
    assert interop.detect(d) == ("eagle", "specdec.interop.eagle1")
    assert_lossless(target, str(d))
    imported = EagleDrafter(target, path=str(d), choices=CHOICES)
    assert isinstance(imported.head.layer.input_layernorm, torch.nn.Identity)
    assert torch.equal(imported.head.lm_head.weight, target.lm_head.weight)
    assert_same_proposals(lambda: EagleDrafter(target, path=str(d), choices=CHOICES),
                          lambda: EagleDrafter(target, head=head, choices=CHOICES))


def test_eagle1_vllm_layout_with_model_prefix(tmp_path, target):
    """vLLM's converted layout: architectures EAGLEModel, the Llama config nested under "model", keys under model."""
    head = eagle1_head(target, bias=False, seed=2)
    cfg = {"architectures": ["EAGLEModel"], "model_type": "eagle", "model": eagle1_config(target)}
    d = write_eagle1(tmp_path / "eagle1", target, head, bias=False, prefix="model.", config=cfg)
    assert_same_proposals(lambda: EagleDrafter(target, path=str(d), choices=CHOICES),
                          lambda: EagleDrafter(target, head=head, choices=CHOICES))


def test_eagle1_pickle_needs_opt_in(tmp_path, target):
    d = write_eagle1(tmp_path / "eagle1", target, eagle1_head(target, True), True, pickle=True)
    ids = random_prompt(0, 8)
    with pytest.raises(CheckpointError, match="allow_pickle"):
        specdec.generate(target, ids, drafter=str(d), max_new_tokens=4)
    assert_lossless(target, str(d), drafter_kwargs={"allow_pickle": True})


@pytest.mark.parametrize("other, named", [({"hidden": 64}, "hidden_size"), ({"vocab_size": 128}, "vocab_size")])
def test_eagle1_for_another_target_is_refused(tmp_path, target, other, named):
    d = write_eagle1(tmp_path / "eagle1", target, eagle1_head(target, True), True)
    with pytest.raises(CheckpointError, match=f"another target.*{named}"):
        specdec.generate(tiny_llama(0, **other), random_prompt(0, 8), drafter=str(d), max_new_tokens=4)


def test_eagle1_with_another_embedding_or_layer_setting_is_refused(tmp_path, target):
    other = tiny_llama(5)  # same shapes, other weights
    d = write_eagle1(tmp_path / "a", other, eagle1_head(target, True), True)
    with pytest.raises(CheckpointError, match="embedding"):
        EagleDrafter(target, path=str(d))
    d = write_eagle1(tmp_path / "b", target, eagle1_head(target, True), True,
                     config=eagle1_config(target, rms_norm_eps=1e-5))
    with pytest.raises(CheckpointError, match="rms_norm_eps"):
        EagleDrafter(target, path=str(d))


def test_eagle1_detection_is_strict():
    assert eagle1.detect({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1})
    assert eagle1.detect({"architectures": ["LlamaForCausalLMEagle"]})
    assert not eagle1.detect({"architectures": ["LlamaForCausalLMEagle3"]})
    assert not eagle1.detect({"architectures": ["EagleLlamaForCausalLM"], "speculators_model_type": "eagle3"})
    assert not eagle1.detect({"model_type": "eagle", "method": "eagle3", "model": {}})
    assert not eagle1.detect({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 30})
    assert not medusa.detect({"architectures": ["LlamaForCausalLMEagle3"]})
    assert medusa.detect({"medusa_num_heads": 5, "medusa_num_layers": 1})


# ---------------------------------------------------------------- Medusa
def medusa_heads(num_heads: int = 3, num_layers: int = 1, d2t: torch.Tensor | None = None, seed: int = 0,
                 shared: bool = False) -> MedusaHeads:
    heads = MedusaHeads(H, num_heads, num_layers, torch.arange(V) if d2t is None else d2t).to(torch.float64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
        if shared:
            for lm in heads.lm_heads[1:]:
                lm.weight.copy_(heads.lm_heads[0].weight)
    return heads.eval()


REDUCED = torch.tensor(sorted(torch.randperm(V, generator=torch.Generator().manual_seed(7))[:40].tolist()) + [2])
REDUCED = torch.unique(REDUCED)  # the draft vocabulary, EOS included, ascending


def write_medusa(path: Path, heads: MedusaHeads, style: str, truncated: str = "none") -> Path:
    """``style``: vllm or faster (FasterDecoding's bare keys under medusa_head.); ``truncated``: none, draft rows in a
    shuffled token_map order, or full rows the token map selects."""
    path.mkdir(parents=True)
    k, n = heads.num_heads, len(heads.blocks[0])
    d2t = heads.d2t
    perm = torch.randperm(len(d2t), generator=torch.Generator().manual_seed(3))
    weights, config = {}, {"hidden_size": H, "vocab_size": V}
    for h in range(k):
        rows = heads.lm_heads[h].weight.detach()
        if truncated == "rows":
            rows = rows[perm]
        elif truncated == "full":
            rows = torch.zeros(V, H, dtype=rows.dtype).index_copy(0, d2t, rows)
        for layer in range(n):
            lin = heads.blocks[h][layer].linear
            for p in ("weight", "bias"):
                key = f"blocks.{h}.layers.{layer}.{p}" if style == "vllm" else f"medusa_head.{h}.{layer}.linear.{p}"
                weights[key] = getattr(lin, p).detach().clone()
        weights[f"lm_heads.{h}.weight" if style == "vllm" else f"medusa_head.{h}.{n}.weight"] = rows.clone()
    if truncated != "none":
        weights["token_map"] = d2t[perm] if truncated == "rows" else d2t.clone()
        config["truncated_vocab_size"] = len(d2t)
    if style == "vllm":
        config |= {"architectures": ["MedusaModel"], "model_type": "medusa", "num_heads": k,
                   "num_hidden_layers": n, "medusa_fc_bias": True}
        save_file(weights, str(path / "model.safetensors"))
    else:
        config |= {"medusa_num_heads": k, "medusa_num_layers": n, "base_model_name_or_path": "tiny"}
        save_file(weights, str(path / "medusa_lm_head.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("style, truncated, layers", [("vllm", "none", 1), ("faster", "none", 2),
                                                      ("vllm", "rows", 1), ("faster", "full", 1)])
def test_medusa_is_lossless_and_proposes_as_built_directly(tmp_path, target, style, truncated, layers):
    heads = medusa_heads(num_layers=layers, d2t=None if truncated == "none" else REDUCED)
    d = write_medusa(tmp_path / "medusa", heads, style, truncated)
    assert interop.detect(d) == ("medusa", "specdec.interop.medusa")
    assert_lossless(target, str(d))
    assert_same_proposals(lambda: MedusaDrafter(target, path=str(d), choices=CHOICES),
                          lambda: MedusaDrafter(target, heads=heads, choices=CHOICES))


def our_checkpoint(path: Path, heads: MedusaHeads, target) -> Path:
    cfg = {"num_heads": heads.num_heads, "num_layers": len(heads.blocks[0]), "choices": CHOICES}
    return checkpoint.save(path, "medusa", heads.state_dict(), cfg, target=target)


@pytest.mark.parametrize("d2t, shared", [(None, False), (REDUCED, True)])
def test_medusa_export_round_trip_is_bitwise(tmp_path, target, d2t, shared):
    heads = medusa_heads(d2t=d2t, shared=shared, seed=4)
    out = interop.export(our_checkpoint(tmp_path / "ours", heads, target), "medusa", tmp_path / "vllm")
    assert_same_proposals(lambda: MedusaDrafter(target, path=str(out), choices=CHOICES),
                          lambda: MedusaDrafter(target, heads=heads, choices=CHOICES))


def test_medusa_exported_config_golden(tmp_path, target):
    src = our_checkpoint(tmp_path / "full", medusa_heads(num_heads=4, num_layers=2), target)
    out = interop.export(src, "medusa", tmp_path / "full_out")
    assert json.loads((out / "config.json").read_text()) == {
        "architectures": ["MedusaModel"], "model_type": "medusa", "hidden_size": 32, "vocab_size": 96,
        "num_heads": 4, "num_hidden_layers": 2, "medusa_fc_bias": True, "truncated_vocab_size": 96,
        "torch_dtype": "float64"}
    from safetensors.torch import load_file

    keys = set(load_file(str(out / "model.safetensors")))
    assert keys == {f"blocks.{h}.layers.{l}.{p}" for h in range(4) for l in range(2) for p in ("weight", "bias")} \
        | {f"lm_heads.{h}.weight" for h in range(4)}
    src = our_checkpoint(tmp_path / "reduced", medusa_heads(d2t=REDUCED, shared=True), target)
    out = interop.export(src, "medusa", tmp_path / "reduced_out")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["truncated_vocab_size"] == len(REDUCED) and cfg["original_lm_head"] is True and cfg["vocab_size"] == 96
    weights = load_file(str(out / "model.safetensors"))
    assert torch.equal(weights["token_map"], REDUCED) and weights["lm_head.weight"].shape == (len(REDUCED), H)
    assert not any(k.startswith("lm_heads.") for k in weights)


def test_medusa_reduced_vocab_with_distinct_heads_needs_pad_vocab(tmp_path, target):
    heads = medusa_heads(d2t=REDUCED)
    src = our_checkpoint(tmp_path / "ours", heads, target)
    with pytest.raises(CheckpointError, match="pad_vocab"):
        interop.export(src, "medusa", tmp_path / "out")
    out = interop.export(src, "medusa", tmp_path / "out", pad_vocab=True)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["truncated_vocab_size"] == 96 and "original_lm_head" not in cfg
    state, _ = medusa.load(out, cfg, False)
    assert torch.equal(state["d2t"], torch.arange(V))
    full = state["lm_heads.1.weight"]
    assert torch.equal(full[REDUCED], heads.lm_heads[1].weight) and int(full.abs().sum(1).gt(0).sum()) == len(REDUCED)
    from specdec.cli import main  # the same from the shell: refused without the flag, written with it

    assert main(["export", str(src), str(tmp_path / "cli"), "--to", "medusa"]) == 2
    assert main(["export", str(src), str(tmp_path / "cli"), "--to", "medusa", "--pad-vocab"]) == 0
    assert json.loads((tmp_path / "cli" / "config.json").read_text()) == cfg


def test_medusa_pickle_needs_opt_in(tmp_path, target):
    d = write_medusa(tmp_path / "medusa", medusa_heads(), "faster")
    weights = __import__("safetensors.torch").torch.load_file(str(d / "medusa_lm_head.safetensors"))
    (d / "medusa_lm_head.safetensors").unlink()
    torch.save(weights, d / "medusa_lm_head.pt")
    with pytest.raises(CheckpointError, match="allow_pickle"):
        specdec.generate(target, random_prompt(0, 8), drafter=str(d), max_new_tokens=4)
    assert_lossless(target, str(d), drafter_kwargs={"allow_pickle": True})


@pytest.mark.parametrize("other, named", [({"hidden": 64}, "hidden_size"), ({"vocab_size": 128}, "vocab_size")])
def test_medusa_for_another_target_is_refused(tmp_path, target, other, named):
    d = write_medusa(tmp_path / "medusa", medusa_heads(), "vllm")
    with pytest.raises(CheckpointError, match=f"another target.*{named}"):
        specdec.generate(tiny_llama(0, **other), random_prompt(0, 8), drafter=str(d), max_new_tokens=4)


def test_medusa_bad_token_map_and_logit_scale_are_refused(tmp_path):
    d = write_medusa(tmp_path / "medusa", medusa_heads(d2t=REDUCED), "vllm", "rows")
    cfg = json.loads((d / "config.json").read_text())
    with pytest.raises(CheckpointError, match="logit_scale"):
        medusa.load(d, cfg | {"logit_scale": 2.0}, False)
    with pytest.raises(CheckpointError, match="token_map must hold"):
        medusa.load(d, cfg | {"truncated_vocab_size": len(REDUCED) - 1}, False)
