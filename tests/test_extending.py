"""Adding a drafter or a verifier takes a module, a YAML file and a registration, nothing else.

The drafter and the verifier below are defined in this file (the "module"), registered from it, configured by YAML
files in a config directory of the test's own (added to Hydra's search path), and then held to the same
lossless-equality cases as the shipped ones, composed with Hydra's ``compose()`` and run through the bench.
"""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

import specdec
from specdec import registry
from specdec.algorithms import tree as tree_ops
from specdec.bench import app as bench
from specdec.bench import config
from specdec.bench.config import CONF_DIR
from specdec.protocols import Drafter, Verifier, VerifierCapabilities
from tests.conftest import DrafterFactory, get_tiny
from tests.equality import assert_greedy_equal
from tests.test_lossless import CASES, NATURAL_EOS, NO_EOS, prompt_of, reference, spec
from tests.tiny import save_tiny, tiny_tokenizer
from verifiers.hf import HFVerifier


class EchoDrafter:
    """Proposes what followed the previous occurrence of the root token (a one-token prompt lookup, as a chain)."""

    needs_hidden_states = False
    returns_probs = False
    vocab_size = None

    def __init__(self, target=None, tokenizer=None, depth: int = 3) -> None:
        self.depth = depth
        self.proposals = 0

    def reset(self) -> None:
        pass

    def propose(self, ctx):
        tokens = ctx.input_ids[0].tolist()
        root = tokens[-1]
        self.proposals += 1
        before = [i for i in range(len(tokens) - 1) if tokens[i] == root]
        depth = min(self.depth, ctx.max_depth, ctx.max_nodes - 1)
        cont = tokens[before[-1] + 1:before[-1] + 1 + depth] if before and depth > 0 else []
        return tree_ops.chain(root, cont, device=ctx.input_ids.device)

    def observe(self, feedback) -> None:
        pass

    def modules(self) -> list:
        return []


class CountingVerifier:
    """The reference verifier, wrapped: counts the verify steps it runs."""

    capabilities = VerifierCapabilities(hidden_states=True, greedy_scoring=False, batching=False)

    def __init__(self, model, label: str = "counting") -> None:
        self.inner = HFVerifier(model, screen_greedy=False)
        self.label = label
        self.steps = 0

    def start(self, request_id, input_ids, output_hidden=False):
        return self.inner.start(request_id, input_ids, output_hidden)

    def score(self, request_ids, trees, output_hidden=False, greedy=False):
        self.steps += 1
        return self.inner.score(request_ids, trees, output_hidden)

    def commit(self, request_id, keep):
        self.inner.commit(request_id, keep)

    def release(self, request_id):
        self.inner.release(request_id)

    def cached_length(self, request_id) -> int:
        return self.inner.cached_length(request_id)

    num_blocks = num_free_blocks = 0  # its cache grows with the request: no KV blocks to count

    def blocks_for(self, num_tokens: int) -> int:
        return 0

    def cost_key(self) -> dict:
        return {"kv": self.label, "lm_head": "logits"}


@pytest.fixture
def registered():
    """The registration (what a user's own code does once), undone after the test."""
    registry.register_drafter("echo", EchoDrafter)
    registry.register_verifier("counting", CountingVerifier)
    yield
    registry.DRAFTERS.pop("echo")
    registry.VERIFIERS.pop("counting")


@pytest.fixture
def conf_dir(tmp_path):
    """The YAML files, in a config directory of the user's own (Hydra's search path takes it)."""
    (tmp_path / "drafter").mkdir()
    (tmp_path / "verifier").mkdir()
    (tmp_path / "drafter" / "echo.yaml").write_text("name: echo\ndepth: 4\n")
    (tmp_path / "verifier" / "counting.yaml").write_text("name: counting\nlabel: test\n")
    return tmp_path


ECHO = DrafterFactory("echo", lambda target, tok: registry.build_drafter("echo", target, tok, depth=4))


def test_the_test_parts_implement_the_protocols(registered):
    d, v = ECHO.build(get_tiny(0), None), CountingVerifier(get_tiny(0))
    assert isinstance(d, Drafter) and isinstance(v, Verifier) and not v.capabilities.batching


@pytest.mark.parametrize("verifier", ["hf", "counting"])
@pytest.mark.parametrize("seed, pseed, plen, repeat, max_new", CASES)
def test_registered_drafter_and_verifier_are_lossless(registered, verifier, seed, pseed, plen, repeat, max_new):
    prompt = prompt_of(pseed, plen, repeat)
    out = spec(ECHO, seed, prompt, max_new, eos=NO_EOS, verifier=verifier)
    assert_greedy_equal(out, reference(seed, prompt, max_new, eos=NO_EOS))


@pytest.mark.parametrize("seed, pseed, repeat", NATURAL_EOS)
def test_registered_drafter_stops_at_eos(registered, seed, pseed, repeat):
    prompt = prompt_of(pseed, 10, repeat)
    out = spec(ECHO, seed, prompt, 48, verifier="counting")
    ref = reference(seed, prompt, 48)
    assert ref.finish_reason == "eos"  # the case really ends in EOS
    assert_greedy_equal(out, ref)


def test_registered_drafter_gets_drafts_accepted_by_name(registered):
    """Not vacuous: by name, through the registered verifier, the echo drafts are accepted on repetitive text."""
    target = get_tiny(0)
    prompt = prompt_of(0, 12, True)
    dec = specdec.SpecDecoder(target, tiny_tokenizer(), drafter="echo", drafter_kwargs={"depth": 4},
                              verifier="counting", verifier_kwargs={"label": "x"})
    out = dec.generate(torch.tensor([prompt]), max_new_tokens=40, eos_token_id=None)
    assert_greedy_equal(out, reference(0, prompt, 40, eos=NO_EOS))
    assert sum(out.stats.accepted) > 0 and dec.verifier.steps == out.stats.verify_steps < 40


def test_compose_validate_and_build_from_the_yaml(registered, conf_dir):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=[f"hydra.searchpath=[file://{conf_dir}]", "drafter=echo",
                                           "verifier=counting", "verifier.label=composed"])
    cfg = config.validate(cfg)
    assert cfg.drafter.depth == 4 and cfg.verifier.label == "composed"
    target = get_tiny(3)
    dec = specdec.SpecDecoder(target, tiny_tokenizer(), drafter=cfg.drafter.name,
                              drafter_kwargs=config.drafter_kwargs(cfg.drafter), verifier=cfg.verifier.name,
                              verifier_kwargs=config.verifier_kwargs(cfg.verifier))
    prompt = prompt_of(3, 2, False)
    assert_greedy_equal(dec.generate(torch.tensor([prompt]), max_new_tokens=32, eos_token_id=None),
                        reference(3, prompt, 32, eos=NO_EOS))
    assert dec.verifier.label == "composed"


def test_registered_verifier_schema_comes_from_its_constructor(registered, conf_dir):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=[f"hydra.searchpath=[file://{conf_dir}]", "verifier=counting",
                                           "+verifier.bogus=1"])
    with pytest.raises(specdec.ConfigError, match=r"unknown key 'bogus' in verifier; valid keys: \['label', 'name'\]"):
        config.validate(cfg)


def test_the_bench_runs_the_registered_parts(registered, conf_dir, tmp_path):
    """Side by side with transformers' generate in the bench, zero mismatches."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"question_id": 1, "category": "x", "prompt": "w5 w6 w7 w5 w6 w7 w8 w5 w6"}) + "\n")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=[
            f"hydra.searchpath=[file://{conf_dir}]", "drafter=echo", "verifier=counting",
            f"target.name={save_tiny(tmp_path / 'target')}", "target.dtype=float64", f"bench.prompts={prompts}",
            "bench.max_new_tokens=16", "bench.threads=1", f"bench.output={tmp_path / 'out.json'}",
            "bench.methods=[hf,specdec:echo]", "bench.warmup=0"])
    result = bench.run_bench(cfg)
    run = next(r for r in result["runs"] if r["method"] == "specdec:echo")
    assert run["mismatches"] == 0 and run["verifier"]["name"] == "counting"
