"""``specdec generate``: every method name the bench knows, sampling flags, the verifier, the adaptive budget.

The CLI runs on a tiny seeded target (``models.load_target`` is patched to hand it over, except in the test that
loads a saved one by ``--target PATH``); greedy outputs are checked whole against the target's own greedy decoding.
"""

from __future__ import annotations

import sys

import pytest
import torch

import specdec
from drafters.eagle import EagleDrafter, EagleHead
from drafters.hybrid import HybridDrafter
from drafters.ngram import NGramDrafter
from specdec import cli, models, registry
from tests.conftest import get_tiny
from tests.equality import assert_greedy_equal, greedy_ref
from tests.tiny import VOCAB, save_tiny, tiny_tokenizer

# motifs repeat, so the n-gram drafter finds matches; the target's greedy continuation of PROMPT runs the full N
# tokens (11 distinct ones), of EOS_PROMPT ends at EOS after 16
PROMPT = "w40 w90 w88 w20 w72 w41 w40 w90 w88 w20 w72 w41 w40 w90 w88 w20 w72 w41"
EOS_PROMPT = "w83 w33 w80 w48 w61 w57 w83 w33 w80 w48 w61 w57 w83 w33 w80 w48 w61 w57"
N = 24
TOK = tiny_tokenizer()


def spy_outputs(monkeypatch) -> list:
    """Every ``(decoder, output)`` of SpecDecoder.generate from now on."""
    seen = []
    generate = specdec.SpecDecoder.generate

    def spy(self, *args, **kwargs):
        out = generate(self, *args, **kwargs)
        seen.append((self, out))
        return out

    monkeypatch.setattr(specdec.SpecDecoder, "generate", spy)
    return seen


@pytest.fixture
def run(monkeypatch, tmp_path):
    """``run(*flags) -> (decoder, output)``: ``specdec generate PROMPT --raw`` on the tiny target (float64, so argmax
    ties never flip), with the decoder and what its generate() returned."""
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))  # an adaptive budget measures a profile there
    monkeypatch.setattr(models, "load_target", lambda name=None, dtype="float32", **kw: (get_tiny(0), TOK))
    seen = spy_outputs(monkeypatch)

    def run_cli(*flags: str, prompt: str = PROMPT):
        assert cli.main(["generate", prompt, "--raw", "--max-new-tokens", str(N), *flags]) == 0
        assert len(seen) == 1, "the CLI generates once"
        return seen.pop()

    return run_cli


def greedy_of(prompt: str = PROMPT):
    return greedy_ref(get_tiny(0), models.encode_prompt(TOK, prompt, chat=False), N)


@pytest.fixture(scope="module")
def reference():
    ref = greedy_of(PROMPT)
    assert ref.finish_reason == "length" and len(set(ref.tokens)) > 5  # a continuation worth comparing
    return ref


class RandomHeadEagle(EagleDrafter):
    """Stands in for the eagle drafter: nothing is shipped for tiny targets, so a seeded random head (the options a
    config gives, e.g. hybrid.yaml's eagle part, are kept)."""

    def __init__(self, target=None, tokenizer=None, path=None, **options) -> None:
        torch.manual_seed(7)
        head = EagleHead.for_target(target, torch.arange(VOCAB)).to(target.dtype)
        with torch.no_grad():
            for p in head.parameters():
                p.normal_(0, 0.2)
        super().__init__(target, tokenizer, head=head.eval(), **options)


@pytest.mark.parametrize("prompt", [PROMPT, EOS_PROMPT])
def test_default_is_ngram_greedy_and_prints_the_text(prompt, run, capsys):
    reference = greedy_of(prompt)
    decoder, out = run(prompt=prompt)
    assert isinstance(decoder.drafter, NGramDrafter) and not decoder.adaptive
    assert type(decoder.verifier).__name__ == "HFVerifier" and decoder.max_nodes == 16
    assert_greedy_equal(out, reference)
    assert out.stats.verify_steps < len(reference)  # it drafted, and drafts were accepted
    printed = capsys.readouterr()
    assert printed.out.strip() == TOK.decode(reference.tokens, skip_special_tokens=True).strip()
    assert f"[{len(reference)} tokens in" in printed.err


def test_drafter_adaptive_is_the_recommended_drafter_with_the_adaptive_budget(run, reference, monkeypatch):
    monkeypatch.setitem(registry.DRAFTERS, "eagle", registry.DrafterEntry(RandomHeadEagle))
    decoder, out = run("--drafter", "adaptive")
    assert decoder.adaptive and decoder.cost_profile is not None
    assert isinstance(decoder.drafter, HybridDrafter) and registry.RECOMMENDED_DRAFTER == "hybrid"
    ngram, eagle = decoder.drafter.parts  # hybrid.yaml's parts, with its options
    assert isinstance(ngram, NGramDrafter) and isinstance(eagle, RandomHeadEagle)
    assert eagle.grower.dynamic.enabled and eagle.grower.dynamic.min_value == 0.6
    assert_greedy_equal(out, reference)


def test_adaptive_flag_on_any_drafter(run, reference):
    decoder, out = run("--drafter", "ngram", "--adaptive", "--max-nodes", "8")
    assert decoder.adaptive and decoder.max_nodes == 8
    assert_greedy_equal(out, reference)


def test_verifier_paged(run, reference):
    decoder, out = run("--verifier", "paged")
    assert type(decoder.verifier).__name__ == "PagedVerifier"
    assert_greedy_equal(out, reference)


def test_sampling_flags_with_a_seed_reproduce_the_library_call(run):
    flags = ("--temperature", "0.8", "--top-p", "0.9", "--top-k", "20")
    _, first = run(*flags, "--seed", "3")
    _, again = run(*flags, "--seed", "3")
    _, other = run(*flags, "--seed", "4")
    assert first.new_tokens == again.new_tokens and len(first.new_tokens) > 0
    assert other.new_tokens != first.new_tokens
    direct = specdec.SpecDecoder(get_tiny(0), TOK).generate(
        prompt=PROMPT, chat=False, max_new_tokens=N, do_sample=True, temperature=0.8, top_p=0.9, top_k=20, seed=3)
    assert first.new_tokens == direct.new_tokens and first.stats.finish_reason == direct.stats.finish_reason


def test_target_by_local_path(tmp_path, monkeypatch):
    path = save_tiny(tmp_path / "tiny")  # float32, with its tokenizer
    target, tok = models.load_target(str(path))
    ref = greedy_ref(target, models.encode_prompt(tok, PROMPT, chat=False), 16)
    seen = spy_outputs(monkeypatch)
    assert cli.main(["generate", PROMPT, "--raw", "--target", str(path), "--max-new-tokens", "16"]) == 0
    (decoder, out), = seen
    assert decoder.target is target
    assert_greedy_equal(out, ref)


def test_every_bench_drafter_name_resolves_as_the_bench_runs_it():
    """One definition: a name means the same drafter, options and budget in ``specdec generate --drafter <name>``
    as in the bench method ``specdec:<name>``."""
    from specdec.bench import config

    names = cli.drafter_names()
    assert {"adaptive", *registry.DRAFTERS, *config.group_options("drafter")} == set(names)
    for name in names:
        drafter, kwargs, adaptive = cli.resolve_drafter(name, None)
        named = registry.named_method(name)
        assert adaptive == named.adaptive
        if named.drafter in config.group_options("drafter"):
            node = config.load_drafter_config(named.drafter)
            assert (drafter, kwargs or {}) == (node.name, config.drafter_kwargs(node)), name
        else:
            assert (drafter, kwargs) == (name, None)
    assert cli.resolve_drafter("adaptive", None)[::2] == (registry.RECOMMENDED_DRAFTER, True)
    assert cli.resolve_drafter("draft_model", "some/path")[1]["path"] == "some/path"


def test_help_shows_an_example_of_each_flag(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    examples = text.split("examples:")[1]
    for example in ("--drafter adaptive", "--drafter eagle", "--drafter runs/eagle/final", "--draft-path",
                    "--verifier paged", "--adaptive", "--max-nodes 8", "--max-new-tokens 64", "--temperature 0.7",
                    "--top-p 0.9", "--top-k 50", "--seed 0", "--raw", "--target", "--dtype bfloat16"):
        assert example in examples, example
    assert "eagle_dynamic" in text  # --drafter lists the bench's names


def test_top_level_help_lists_the_new_flags(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--verifier", "--adaptive", "--temperature", "--top-p", "--top-k", "--seed", "adaptive"):
        assert flag in text, flag


@pytest.mark.parametrize("flags, message", [
    (["--top-p", "0.9"], "add --temperature > 0"),
    (["--top-k", "5", "--seed", "1"], "--top-k / --seed are for sampling only"),
    (["--temperature", "0", "--seed", "1"], "add --temperature > 0"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--temperature", "0.7", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--temperature", "0.7", "--top-k", "-1"], "--top-k must be >= 0"),
    (["--max-nodes", "0"], "--max-nodes must be >= 1"),
    (["--drafter", "draft_model"], "needs --draft-path"),
    (["--drafter", "nonsense"], "use one of adaptive, draft_model"),
    (["--verifier", "bogus"], "invalid choice: 'bogus'"),
])
def test_bad_combinations_are_refused_naming_the_fix(flags, message, monkeypatch, capsys):
    monkeypatch.setattr(models, "load_target", lambda *a, **k: pytest.fail("refused only after loading"))
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "hi", *flags])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_without_its_extra_names_the_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "hydra", None)  # as if hydra-core were not installed
    assert cli.main(["bench"]) == 2
    assert "pip install 'specdec[bench]'" in capsys.readouterr().err
