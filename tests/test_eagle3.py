"""EAGLE-3 head: cache consistency, losslessness with and without feature layers, the public layouts (EAGLE-3
config.json, speculators) both ways, refusals, and the tiny end-to-end training job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import specdec
from drafters.eagle3 import Eagle3Arch, Eagle3Drafter, Eagle3Head, default_aux_layers
from specdec import interop
from specdec.interop.files import write_dir
from specdec.models import checkpoint, hf_cache
from specdec.errors import ConfigError
from specdec.models.checkpoint import CheckpointError
from specdec.types import DraftContext
from tests.equality import assert_greedy_equal, greedy_ref
from tests.tiny import random_prompt, tiny_llama
from tests.test_eagle import check_cache_matches_full
from tests.train_fixtures import job_config
from train import eagle3, job

GOLDEN = Path(__file__).parent / "golden"


def tiny_head(target, aux=None, draft_ids=None, seed: int = 1, **arch) -> Eagle3Head:
    d2t = torch.arange(target.config.vocab_size) if draft_ids is None else draft_ids
    spec = Eagle3Arch.for_target(target.config, len(d2t), aux)
    if arch:
        spec = Eagle3Arch.from_dict({**spec.to_dict(), **arch})
    torch.manual_seed(seed)
    head = Eagle3Head(spec, d2t)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.2)
    return head.to(target.dtype).eval()


def greedy_equal(target, drafter, seeds=range(3), verifier: str = "hf", n: int = 20) -> int:
    steps = 0
    for seed in seeds:
        ids = random_prompt(seed, 9 + seed)
        out = specdec.generate(target, ids, drafter=drafter, max_new_tokens=n, verifier=verifier)
        assert_greedy_equal(out, greedy_ref(target, ids, n), f"seed {seed}")
        steps += out.stats.verify_steps
    return steps


def test_feature_layers_are_transformers_hidden_states_indices():
    """Layer i's feature is the input of decoder layer i (0: the embeddings), as vLLM counts them."""
    from specdec.models.hf_forward import forward_tokens

    target = tiny_llama(0, layers=4)
    ids = random_prompt(0, 6)
    out = forward_tokens(target, hf_cache.new_cache(), ids, output_hidden=(0, 2))
    h = target.config.hidden_size
    torch.testing.assert_close(out.hidden[..., :h], target.get_input_embeddings()(ids))
    hs = target(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(out.hidden[..., h:], hs[2])
    assert default_aux_layers(30) == (2, 15, 27)


def test_head_cache_matches_full_forward():
    target = tiny_llama(0, layers=4)
    h = target.config.hidden_size
    check_cache_matches_full(tiny_head(target, aux=(1, 2, 3)), 3 * h, h, target.dtype)


@pytest.mark.parametrize("aux", [None, (), (0, 3)])
@pytest.mark.parametrize("verifier", ["hf", "paged"])
def test_random_head_is_lossless(aux, verifier):
    target = tiny_llama(0, layers=4)
    drafter = Eagle3Drafter(target, head=tiny_head(target, aux=aux, draft_ids=torch.arange(3, 60)),
                            choices=[[0], [1], [0, 0], [0, 0, 0]])
    assert drafter.needs_hidden_states == {None: (2, 2, 1), (): True}.get(aux, aux)
    greedy_equal(target, drafter, verifier=verifier)
    sampled = specdec.generate(target, random_prompt(0, 12), drafter=drafter, max_new_tokens=12, do_sample=True,
                               seed=3, verifier=verifier)
    assert len(sampled.new_tokens) > 0


def proposals(drafter, target, seed: int = 0) -> torch.Tensor:
    """The drafter's first tree on a random prompt with random features (tokens and draft probabilities)."""
    g = torch.Generator().manual_seed(seed)
    ids = random_prompt(seed, 10)
    spec = drafter.needs_hidden_states
    width = target.config.hidden_size * (1 if spec is True else len(spec))
    hidden = torch.randn(1, ids.shape[1] - 1, width, generator=g, dtype=target.dtype)
    drafter.reset()
    tree = drafter.propose(DraftContext(input_ids=ids, prompt_len=ids.shape[1], max_nodes=8, max_depth=4, hidden=hidden))
    return torch.cat([tree.tokens.double(), tree.parents.double()], -1)


@pytest.mark.parametrize("layout", ["eagle3", "speculators"])
@pytest.mark.parametrize("aux", [(0, 2, 3), ()])
def test_export_then_import_gives_the_same_proposals(tmp_path, layout, aux):
    target = tiny_llama(0, layers=4)
    head = tiny_head(target, aux=aux, draft_ids=torch.tensor([2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41]))
    ours = checkpoint.save(tmp_path / "ours", "eagle3", dict(head.state_dict()), {"arch": head.arch.to_dict()},
                           target=target)
    out = interop.export(ours, layout, tmp_path / layout, **({"verifier": "org/tiny"} if layout == "speculators" else {}))
    assert interop.detect(out)[0] == "eagle3" and not checkpoint.is_checkpoint(out)
    a = Eagle3Drafter(target, path=str(ours), choices=[[0], [1], [0, 0], [0, 1], [0, 0, 0]])
    b = Eagle3Drafter(target, path=str(out), choices=[[0], [1], [0, 0], [0, 1], [0, 0, 0]])
    for seed in range(3):
        assert torch.equal(proposals(a, target, seed), proposals(b, target, seed))
    greedy_equal(target, b, seeds=[0])


def test_exported_configs_match_the_golden_layouts(tmp_path):
    """The engine configs field by field (golden files written from vLLM's loaders' conventions; regenerate with
    SPECDEC_UPDATE_GOLDEN=1 only after checking the change against vLLM)."""
    import os

    target = tiny_llama(0, layers=4)
    head = tiny_head(target, aux=(0, 2, 3), draft_ids=torch.arange(3, 40)).float()
    ours = checkpoint.save(tmp_path / "ours", "eagle3", dict(head.state_dict()), {"arch": head.arch.to_dict()},
                           target=target)
    for layout, opts in [("eagle3", {}), ("speculators", {"verifier": "org/tiny-target", "speculative_tokens": 4})]:
        out = interop.export(ours, layout, tmp_path / layout, **opts)
        got = json.loads((out / "config.json").read_text())
        golden = GOLDEN / f"{layout}_config.json"
        if os.environ.get("SPECDEC_UPDATE_GOLDEN"):
            golden.write_text(json.dumps(got, indent=2) + "\n")
        want = json.loads(golden.read_text())
        assert sorted(got) == sorted(want)
        for key in want:
            assert got[key] == want[key], key
        from safetensors.torch import load_file

        w = load_file(str(out / "model.safetensors"))
        prefix = "midlayer." if layout == "eagle3" else "layers.0."
        assert {k for k in w if not k.startswith(prefix)} == {"fc.weight", "norm.weight", "lm_head.weight", "d2t",
                                                              "t2d"}
        assert torch.equal(w["d2t"] + torch.arange(37), torch.arange(3, 40))  # offsets: target = draft + d2t
        assert w["t2d"].dtype == torch.bool and int(w["t2d"].sum()) == 37 and not bool(w["t2d"][:3].any())
        assert w[prefix + "self_attn.q_proj.weight"].shape[1] == 2 * target.config.hidden_size


def public_eagle3(path: Path, head: Eagle3Head, *, ids=True, use_aux=True, speculators=False,
                  extra: dict | None = None) -> Path:
    """A public checkpoint written the way SpecForge / speculators write one (by hand, not through export)."""
    arch = head.arch.to_dict()
    state = {k: v.float() for k, v in head.state_dict().items() if k != "d2t"}
    prefix = "layers.0." if speculators else "midlayer."
    state = {(prefix + k[len("midlayer."):] if k.startswith("midlayer.") else k): v for k, v in state.items()}
    d2t = head.d2t
    state["d2t"] = d2t - torch.arange(len(d2t))
    layer = {"model_type": "llama", "hidden_size": arch["hidden_size"], "intermediate_size": arch["intermediate_size"],
             "num_attention_heads": arch["num_attention_heads"], "num_key_value_heads": arch["num_key_value_heads"],
             "num_hidden_layers": 1, "rms_norm_eps": arch["rms_norm_eps"], "vocab_size": arch["vocab_size"],
             "rope_theta": arch["rope_parameters"]["rope_theta"], "max_position_embeddings": 512}
    if speculators:
        cfg = {"speculators_model_type": "eagle3", "transformer_layer_config": layer,
               "draft_vocab_size": len(d2t), "norm_before_residual": arch["norm_before_residual"],
               "speculators_config": {"algorithm": "eagle3", "proposal_methods": [{"speculative_tokens": 3}],
                                      "verifier": {"name_or_path": "x"}}}
        if ids:
            cfg["eagle_aux_hidden_state_layer_ids"] = list(arch["aux_layers"])
    else:
        cfg = {"architectures": ["LlamaForCausalLMEagle3"], **layer, "draft_vocab_size": len(d2t)}
        eagle = {"use_aux_hidden_state": use_aux}
        if ids and use_aux:
            eagle["eagle_aux_hidden_state_layer_ids"] = list(arch["aux_layers"])
        cfg["eagle_config"] = eagle
    return write_dir(path, {**cfg, **(extra or {})}, state)


@pytest.mark.parametrize("case", ["aux_ids", "default_ids", "no_aux", "full_vocab", "speculators",
                                  "speculators_norm_before_residual"])
def test_public_eagle3_checkpoints_load_and_are_lossless(tmp_path, case):
    target = tiny_llama(0, layers=4)
    draft_ids = None if case == "full_vocab" else torch.arange(5, 70)
    aux = {"no_aux": ()}.get(case, default_aux_layers(4) if case == "default_ids" else (1, 3))
    head = tiny_head(target, aux=aux, draft_ids=draft_ids,
                     **({"norm_before_residual": True} if case == "speculators_norm_before_residual" else {}))
    path = public_eagle3(tmp_path / case, head, ids=case != "default_ids", use_aux=case != "no_aux",
                         speculators=case.startswith("speculators"))
    direct = Eagle3Drafter(target, head=head, choices=[[0], [1], [0, 0]])
    loaded = Eagle3Drafter(target, path=str(path), choices=[[0], [1], [0, 0]])
    assert loaded.head.arch.aux_layers == tuple(aux)
    assert torch.equal(proposals(direct, target), proposals(loaded, target))
    greedy_equal(target, str(path), seeds=[0, 1])  # by path: generate() recognises the public layout


def test_public_checkpoints_for_another_target_or_unsupported_are_refused(tmp_path):
    target = tiny_llama(0, layers=4)
    head = tiny_head(target, aux=(1, 3), draft_ids=torch.arange(5, 70))
    wide = tiny_llama(0, layers=4, hidden=48)
    path = public_eagle3(tmp_path / "ok", head)
    with pytest.raises(CheckpointError, match="hidden size"):
        Eagle3Drafter(wide, path=str(path))
    other_vocab = tiny_llama(0, layers=4, vocab_size=128)
    with pytest.raises(CheckpointError, match="vocabulary"):
        Eagle3Drafter(other_vocab, path=str(path))
    shallow = tiny_llama(0, layers=2)
    with pytest.raises(CheckpointError, match="feature layers"):
        Eagle3Drafter(shallow, path=str(path))
    fancy = public_eagle3(tmp_path / "fancy", head, extra={"norm_before_fc": True})
    with pytest.raises(CheckpointError, match="norm_before_fc"):
        Eagle3Drafter(target, path=str(fancy))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((path / "config.json").read_text())
    from safetensors.torch import load_file

    torch.save(load_file(str(path / "model.safetensors")), pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle"):
        Eagle3Drafter(target, path=str(pickled))
    ok = Eagle3Drafter(target, path=str(pickled), allow_pickle=True, choices=[[0], [1], [0, 0]])
    assert torch.equal(proposals(ok, target), proposals(Eagle3Drafter(target, path=str(path), choices=[[0], [1], [0, 0]]), target))
    with pytest.raises(CheckpointError, match="only an eagle3 drafter"):
        interop.export(checkpoint.save(tmp_path / "m", "medusa", {"x": torch.zeros(1)}, {}), "eagle3", tmp_path / "x")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eagle3")
    cfg = job_config(tmp, "eagle3", ["drafter.draft_vocab_size=64", "drafter.aux_layers=[0,1]",
                                      "export.to=[eagle3,speculators]"])
    return job.run(eagle3.SPEC, cfg, progress=False), tmp


def test_job_writes_checkpoint_exports_and_is_lossless(trained):
    final, tmp = trained
    meta = checkpoint.read_meta(final)
    assert meta["kind"] == "eagle3" and meta["config"]["arch"]["aux_layers"] == [0, 1]
    assert "## How it was made" in (final / "README.md").read_text()
    assert (final.parent / "final-eagle3" / "config.json").exists()
    spec_cfg = json.loads((final.parent / "final-speculators" / "config.json").read_text())["speculators_config"]
    assert spec_cfg["verifier"] == {"name_or_path": str(tmp / "target"), "architectures": ["LlamaForCausalLM"]}
    target, tok = specdec.models.load_target(str(tmp / "target"))
    for path in (final, final.parent / "final-eagle3"):
        for seed in range(2):
            ids = random_prompt(seed, 12)
            out = specdec.generate(target, ids, tokenizer=tok, drafter=str(path), max_new_tokens=16)
            assert_greedy_equal(out, greedy_ref(target, ids, 16), f"{path.name} seed {seed}")


def test_cli_export(trained, tmp_path):
    from specdec.cli import main

    final, _ = trained
    assert main(["export", str(final), str(tmp_path / "s"), "--to", "speculators", "--verifier", "org/t",
                 "--speculative-tokens", "5"]) == 0
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 5
    assert cfg["speculators_config"]["verifier"]["name_or_path"] == "org/t"
    assert main(["export", str(final), str(tmp_path / "m"), "--to", "medusa"]) == 2  # an eagle3 head is no Medusa


def test_speculators_export_names_the_heads_own_target(tmp_path):
    """The verifier a speculators config names: the one given, else the target the training job recorded, else
    specdec's default target only for a head made for its shape; another target's head without a name is refused."""
    target = tiny_llama(0, layers=4)
    head = tiny_head(target, aux=(0, 2, 3), draft_ids=torch.arange(3, 40))
    state, arch = dict(head.state_dict()), {"arch": head.arch.to_dict()}
    ours = checkpoint.save(tmp_path / "ours", "eagle3", state, arch, target=target)
    with pytest.raises(CheckpointError, match="--verifier <target>"):
        interop.export(ours, "speculators", tmp_path / "a")
    named = checkpoint.save(tmp_path / "named", "eagle3", state, arch, target=target,
                            extra={"target_name": "org/tiny", "target_architectures": ["LlamaForCausalLM"]})

    def verifier(out):
        return json.loads((out / "config.json").read_text())["speculators_config"]["verifier"]["name_or_path"]

    assert verifier(interop.export(named, "speculators", tmp_path / "b")) == "org/tiny"
    assert verifier(interop.export(named, "speculators", tmp_path / "c", verifier="org/other")) == "org/other"
    shipped = checkpoint.shipped("eagle3")  # made for the default target's shape
    assert verifier(interop.export(shipped, "speculators", tmp_path / "d")) == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_export_settings_go_to_the_layouts_that_take_them():
    given = {"verifier": "org/t", "speculative_tokens": 5, "pad_vocab": True}
    assert interop.layout_options("speculators", **given) == {"verifier": "org/t", "speculative_tokens": 5}
    assert interop.layout_options("medusa", **given) == {"pad_vocab": True}
    assert interop.layout_options("eagle3", **given) == {}
    assert interop.layout_options("speculators", verifier=None) == {}  # unset: the layout's default
    with pytest.raises(ConfigError, match="unknown export settings"):
        interop.layout_options("speculators", verfier="org/t")
