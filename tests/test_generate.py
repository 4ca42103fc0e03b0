"""The generate() API: streaming, statistics, outputs, and bad input that fails early naming the fix."""

from __future__ import annotations

import pytest
import torch
from transformers import TextStreamer

import specdec
from specdec import registry
from specdec.errors import (
    ConfigError,
    PromptError,
    SpecdecError,
    VocabularyMismatchError,
)
from specdec.types import DraftTree
from tests.conftest import get_tiny
from tests.equality import assert_all_greedy_equal, assert_greedy_equal, greedy_ref
from tests.tiny import random_prompt, tiny_tokenizer

# ---------------------------------------------------------------- streaming, stats, outputs


@pytest.mark.parametrize("drafter", ["none", "ngram"])
@pytest.mark.parametrize("eos", [None, "default"])
def test_text_streamer_matches_model_generate(capsys, tokenizer, drafter, eos):
    seed, pseed = (10, 101) if eos == "default" else (0, 1)  # (10, 101) ends in EOS (id 2, skipped in text)
    target = get_tiny(seed)
    prompt = random_prompt(pseed, 10, repeat=eos is None)
    kwargs = {} if eos == "default" else {"eos_token_id": None}
    ref = greedy_ref(target, prompt, 30, streamer=TextStreamer(tokenizer, skip_special_tokens=True), **kwargs)
    expected = capsys.readouterr().out
    out = specdec.generate(target, prompt, tokenizer=tokenizer, drafter=drafter, max_new_tokens=30,
                           streamer=TextStreamer(tokenizer, skip_special_tokens=True),
                           eos_token_id="default" if eos else None)
    got = capsys.readouterr().out
    assert_greedy_equal(out, ref)
    assert ref.finish_reason == ("eos" if eos else "length")
    assert got == expected
    # the prompt and every new token were printed (EOS skipped)
    assert got.split() == tokenizer.decode(out.sequences[0], skip_special_tokens=True).split()
    assert len(got.split()) == 10 + len([t for t in out.new_tokens if t != 2]) > 20
    assert out.text == tokenizer.decode(out.new_tokens, skip_special_tokens=True)


def test_streamer_skip_prompt(capsys, tokenizer):
    target = get_tiny(0)
    prompt = random_prompt(3, 8)
    out = specdec.generate(target, prompt, tokenizer=tokenizer, max_new_tokens=12, eos_token_id=None,
                           streamer=TextStreamer(tokenizer, skip_prompt=True))
    assert capsys.readouterr().out == out.text + "\n"


def test_stats_fields(target):
    prompt = random_prompt(0, 12)
    out = specdec.generate(target, prompt, drafter="ngram", max_new_tokens=40, eos_token_id=None)
    s = out.stats
    assert s.new_tokens == len(out.new_tokens) == 40
    assert s.verify_steps == len(s.drafted) == len(s.accepted) >= 1
    assert s.verify_steps < 40  # drafts were accepted on this repetitive prompt
    assert all(0 <= a <= d for a, d in zip(s.accepted, s.drafted))
    assert sum(a + 1 for a in s.accepted) == s.new_tokens  # each step: accepted drafts + one bonus
    assert s.tau == pytest.approx(40 / s.verify_steps) and s.tau > 1.0
    assert s.wall_time_s > 0 and s.tokens_per_s > 0
    assert s.finish_reason == "length"
    assert s.acceptance_rate == pytest.approx(sum(s.accepted) / sum(s.drafted))
    # acceptance_by_depth: fraction of steps whose accepted path reached depth d (non-increasing in d)
    by_depth = s.acceptance_by_depth()
    assert len(by_depth) == max(s.accepted)
    for d, frac in enumerate(by_depth, start=1):
        assert frac == pytest.approx(sum(a >= d for a in s.accepted) / s.verify_steps)
    assert all(a >= b for a, b in zip(by_depth, by_depth[1:]))
    d = s.as_dict()
    assert d["verify_steps"] == s.verify_steps and d["tau"] == s.tau
    assert d["drafted_per_step"] == s.drafted and d["accepted_per_step"] == s.accepted


def test_stats_plain_decoding_tau_is_one(target):
    out = specdec.generate(target, random_prompt(0, 12), drafter="none", max_new_tokens=9, eos_token_id=None)
    assert out.stats.verify_steps == 9 and out.stats.tau == 1.0
    assert out.stats.drafted == [0] * 9 and out.stats.accepted == [0] * 9
    assert out.stats.acceptance_by_depth() == [] and out.stats.acceptance_rate == 0.0


def test_output_sequences_are_prompt_plus_new_tokens(target, tokenizer):
    prompt = random_prompt(5, 7)
    out = specdec.generate(target, prompt, tokenizer=tokenizer, max_new_tokens=15, eos_token_id=None)
    assert out.sequences.shape == (1, 7 + 15) and out.sequences.dtype == torch.long
    assert out.sequences[0, :7].tolist() == prompt[0].tolist()
    assert out.sequences[0, 7:].tolist() == out.new_tokens
    assert_greedy_equal(out, greedy_ref(target, prompt, 15, eos_token_id=None))
    assert out.text == tokenizer.decode(out.new_tokens, skip_special_tokens=True)
    # no tokenizer: no text, same tokens
    bare = specdec.generate(target, prompt, max_new_tokens=15, eos_token_id=None)
    assert bare.text is None
    assert_greedy_equal(bare, out)


def test_input_forms(target, tokenizer):
    """input_ids as [1, T] tensor, 1-D tensor, list, or text through the tokenizer: same output."""
    ids = [5, 6, 7, 8, 5, 6]
    outs = [
        specdec.generate(target, torch.tensor([ids]), max_new_tokens=8, eos_token_id=None),
        specdec.generate(target, torch.tensor(ids), max_new_tokens=8, eos_token_id=None),
        specdec.generate(target, ids, max_new_tokens=8, eos_token_id=None),
        specdec.generate(target, torch.tensor([ids], dtype=torch.int32), max_new_tokens=8, eos_token_id=None),
        specdec.generate(target, prompt=" ".join(f"w{i}" for i in ids), tokenizer=tokenizer, max_new_tokens=8,
                         eos_token_id=None),
    ]
    for i, o in enumerate(outs):
        assert_greedy_equal(o, outs[0], f"input form {i}")
        assert o.sequences[0, :6].tolist() == ids


def test_decode_loop_directly(target):
    """The loop alone commits exactly max_new_tokens and every step's tokens are accepted drafts + bonus."""
    from specdec.algorithms.acceptance import greedy
    from verifiers.hf import HFVerifier

    prompt = random_prompt(0, 12)
    steps = list(specdec.decode(HFVerifier(target), registry.build_drafter("ngram", target), greedy, prompt,
                                max_new_tokens=25, max_nodes=8))
    tokens = [t for s in steps for t in s.new_tokens]
    # the loop alone has no stopper: it ends by committing exactly max_new_tokens, i.e. by length
    assert_greedy_equal((tokens, "length"), greedy_ref(target, prompt, 25, eos_token_id=None))
    for s in steps:
        path = s.acceptance.accepted_nodes(0)
        assert s.new_tokens[:-1] == s.tree.tokens[0, path[1:]].tolist()
        assert s.tree.num_nodes <= 8


class OracleDrafter:
    """Drafts the target's own greedy continuation as a long chain, ignoring ``ctx.max_depth`` on purpose."""

    needs_hidden_states = False
    returns_probs = False
    vocab_size = None

    def __init__(self, prompt_len: int, continuation: list[int], depth: int = 6):
        self.prompt_len, self.continuation, self.depth = prompt_len, continuation, depth
        self.seen: list[tuple[int, int]] = []  # (ctx.max_nodes, ctx.max_depth) per proposal

    def reset(self):
        self.seen.clear()

    def propose(self, ctx):
        self.seen.append((ctx.max_nodes, ctx.max_depth))
        done = ctx.input_ids.shape[1] - self.prompt_len
        from specdec.algorithms.tree import chain

        return chain(int(ctx.input_ids[0, -1]), self.continuation[done:done + self.depth])

    def observe(self, feedback):
        pass

    def modules(self):
        return []


@pytest.mark.parametrize("max_new", [1, 2, 3, 5, 7, 13])
def test_loop_never_drafts_past_max_new_tokens(target, max_new):
    """Even a drafter that ignores ctx.max_depth cannot make a verify step commit past max_new_tokens."""
    from specdec.algorithms.acceptance import greedy
    from verifiers.hf import HFVerifier

    prompt = random_prompt(1, 10)
    cont = greedy_ref(target, prompt, 20, eos_token_id=None).tokens
    drafter = OracleDrafter(prompt.shape[1], cont)
    steps = list(specdec.decode(HFVerifier(target), drafter, greedy, prompt, max_new_tokens=max_new, max_nodes=16))
    assert_greedy_equal(([t for s in steps for t in s.new_tokens], "length"),
                        greedy_ref(target, prompt, max_new, eos_token_id=None))
    assert len(steps) == -(-max_new // 7)  # every draft accepted: 6 drafts + 1 bonus per step
    remaining = max_new
    for s, (nodes, depth) in zip(steps, drafter.seen):
        assert nodes == 16 and depth == remaining - 1  # the loop tells the drafter how deep it may go
        assert s.tree.num_nodes - 1 <= remaining - 1
        remaining -= len(s.new_tokens)


# ---------------------------------------------------------------- bad input: fails early, names the fix


def test_unknown_drafter_name(target):
    with pytest.raises(ConfigError, match="choose one of"):
        specdec.generate(target, [4, 5], drafter="nope", max_new_tokens=2)


def test_unknown_drafter_option(target):
    with pytest.raises(ConfigError, match=r"has no option\(s\) \['bogus'\]; its options are"):
        specdec.generate(target, [4, 5], drafter="ngram", drafter_kwargs={"bogus": 1}, max_new_tokens=2)


def test_drafter_kwargs_with_object(target):
    with pytest.raises(SpecdecError, match="configure the object directly"):
        specdec.generate(target, [4, 5], drafter=registry.build_drafter("none", target), drafter_kwargs={"x": 1})


def test_bad_ngram_options(target):
    with pytest.raises(ConfigError, match="min_ngram <= max_ngram"):
        specdec.generate(target, [4, 5], drafter="ngram", drafter_kwargs={"min_ngram": 3, "max_ngram": 2})


def test_unknown_acceptance(target):
    with pytest.raises(ConfigError, match=r"choose one of \['greedy'"):
        specdec.generate(target, [4, 5], acceptance="magic", max_new_tokens=2)


def test_unknown_verifier(target):
    with pytest.raises(ConfigError, match="choose one of"):
        specdec.generate(target, [4, 5], verifier="nope", max_new_tokens=2)


def test_empty_prompt_ids(target):
    with pytest.raises(PromptError, match="pass at least one token"):
        specdec.generate(target, torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)


@pytest.mark.parametrize("text", ["", "  ", "\n\t"])
def test_empty_prompt_text(target, tokenizer, text):
    with pytest.raises(PromptError, match="pass some text"):
        specdec.generate(target, prompt=text, tokenizer=tokenizer, max_new_tokens=2)


def test_prompt_and_ids_both_or_neither(target, tokenizer):
    with pytest.raises(PromptError, match="exactly one of"):
        specdec.generate(target, [4], prompt="w4", tokenizer=tokenizer)
    with pytest.raises(PromptError, match="exactly one of"):
        specdec.generate(target, tokenizer=tokenizer)


def test_text_prompt_needs_tokenizer(target):
    with pytest.raises(PromptError, match="pass tokenizer="):
        specdec.generate(target, prompt="w4 w5")


def test_stop_strings_need_tokenizer(target):
    with pytest.raises(SpecdecError, match="pass tokenizer="):
        specdec.generate(target, [4, 5], stop_strings=["w5"], max_new_tokens=2)


def test_prompt_longer_than_context():
    small = get_tiny(0, max_positions=32)
    with pytest.raises(PromptError, match="shorten the prompt"):
        specdec.generate(small, random_prompt(0, 40), max_new_tokens=2)
    with pytest.raises(PromptError, match="shorten the prompt"):
        specdec.generate(small, random_prompt(0, 32), max_new_tokens=1)


def test_prompt_plus_max_new_tokens_over_context():
    small = get_tiny(0, max_positions=32)
    with pytest.raises(PromptError, match="lower max_new_tokens to at most 12"):
        specdec.generate(small, random_prompt(0, 20), max_new_tokens=13)
    out = specdec.generate(small, random_prompt(0, 20), max_new_tokens=12, eos_token_id=None)  # exactly fits
    assert len(out.new_tokens) == 12


@pytest.mark.parametrize("max_new", [0, -3, 2.5, None])
def test_bad_max_new_tokens(target, max_new):
    with pytest.raises(SpecdecError, match="max_new_tokens must be a positive integer"):
        specdec.generate(target, [4, 5], max_new_tokens=max_new)


def test_batch_of_two_prompts(target):
    """A [B, T] tensor is a batch: generate() serves it with the paged verifier and returns one output each."""
    outs = specdec.generate(target, torch.tensor([[4, 5, 6], [7, 8, 9]]), max_new_tokens=2, eos_token_id=None)
    assert_all_greedy_equal(outs, [greedy_ref(target, p, 2, eos_token_id=None) for p in ([4, 5, 6], [7, 8, 9])])
    with pytest.raises(PromptError, match="for one request"):
        specdec.inputs.request_ids(torch.tensor([[4, 5], [6, 7]]), None, tokenizer=None, chat=False, device="cpu")


def chat_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tok


@pytest.mark.parametrize("with_template", [False, True])
def test_batch_of_two_text_prompts(target, with_template):
    """A list of texts is a batch: one output per prompt, each as if generated alone."""
    tok = chat_tokenizer() if with_template else tiny_tokenizer()
    outs = specdec.generate(target, prompt=["w4 w5", "w6 w7"], tokenizer=tok, max_new_tokens=3, eos_token_id=None)
    for text, out in zip(["w4 w5", "w6 w7"], outs):
        alone = specdec.generate(target, prompt=text, tokenizer=tok, max_new_tokens=3, eos_token_id=None)
        assert_greedy_equal(out, alone, text)
        assert out.text == alone.text
        assert torch.equal(out.sequences, alone.sequences)


@pytest.mark.parametrize("prompt", [[], [{"role": "user", "content": ""}]])
def test_empty_chat_prompt(target, prompt):
    """An empty conversation, or one the template turns into 0 tokens, is an empty prompt."""
    with pytest.raises(PromptError, match="empty"):
        specdec.generate(target, prompt=prompt, tokenizer=chat_tokenizer(), max_new_tokens=2)


def test_chat_messages_prompt(target):
    tok = chat_tokenizer()
    messages = [{"role": "user", "content": "w4 w5"}, {"role": "assistant", "content": "w6"}]
    out = specdec.generate(target, prompt=messages, tokenizer=tok, max_new_tokens=3, eos_token_id=None)
    assert out.sequences[0, :3].tolist() == [4, 5, 6]
    plain = specdec.generate(target, prompt="w4 w5", tokenizer=tok, max_new_tokens=3, eos_token_id=None)
    assert plain.sequences[0, :2].tolist() == [4, 5]


def test_bad_max_nodes(target):
    with pytest.raises(SpecdecError, match="max_nodes must be >= 1"):
        specdec.generate(target, [4, 5], max_nodes=0)


def test_greedy_rule_refuses_sampling(target):
    with pytest.raises(SpecdecError, match="acceptance=rejection"):
        specdec.generate(target, [4, 5], acceptance="greedy", do_sample=True)


def test_sampling_is_reproducible_for_a_seed(target):
    a = specdec.generate(target, [4, 5, 6], do_sample=True, seed=7, max_new_tokens=12, eos_token_id=None)
    b = specdec.generate(target, [4, 5, 6], do_sample=True, seed=7, max_new_tokens=12, eos_token_id=None)
    assert a.new_tokens == b.new_tokens and len(a.new_tokens) == 12


class FakeDrafter:
    """A drafter from another vocabulary (e.g. a draft model with a different tokenizer)."""

    needs_hidden_states = False
    returns_probs = False
    vocab_size = 7

    def reset(self):
        pass

    def propose(self, ctx):
        return DraftTree(ctx.input_ids[:, -1:], torch.tensor([[-1]]))

    def observe(self, feedback):
        pass

    def modules(self):
        return []


def test_vocabulary_mismatch(target):
    with pytest.raises(VocabularyMismatchError, match="shares the target's tokenizer"):
        specdec.generate(target, [4, 5], drafter=FakeDrafter(), max_new_tokens=2)
    ok = FakeDrafter()
    ok.vocab_size = 96
    assert len(specdec.generate(target, [4, 5], drafter=ok, max_new_tokens=3).new_tokens) == 3


def test_capability_check(target):
    class NeedsProbs(FakeDrafter):
        vocab_size = None

    from specdec.protocols import VerifierCapabilities, check_capabilities

    no_hidden = VerifierCapabilities(hidden_states=False, greedy_scoring=False, batching=False)
    with pytest.raises(specdec.errors.CapabilityError, match="capabilities include hidden_states"):
        check_capabilities(type("H", (FakeDrafter,), {"needs_hidden_states": True})(), no_hidden)
    with pytest.raises(specdec.errors.CapabilityError, match="use a rule for deterministic drafts"):
        check_capabilities(NeedsProbs(), VerifierCapabilities(True, True, False), rule_needs_probs=True)


def test_an_object_that_is_not_a_drafter_is_refused_naming_what_it_lacks(target):
    class Half:
        needs_hidden_states = False

        def propose(self, ctx):
            return None

    with pytest.raises(specdec.ConfigError, match=r"lacks \['returns_probs', 'vocab_size', 'reset', 'observe'"):
        specdec.SpecDecoder(target, drafter=Half())


# ---------------------------------------------------------------- one request-parameters object


def test_generation_params_from_keywords_a_dataclass_or_a_transformers_generation_config(target):
    from transformers import GenerationConfig

    ids = torch.tensor([[4, 5, 6, 4, 5]])
    by_keywords = specdec.generate(target, ids, max_new_tokens=6, eos_token_id=None)
    by_params = specdec.generate(target, ids, generation_config=specdec.GenerationParams(max_new_tokens=6,
                                                                                           eos_token_id=None))
    by_hf = specdec.generate(target, ids, generation_config=GenerationConfig(max_new_tokens=6), eos_token_id=None)
    ref = greedy_ref(target, ids, 6, eos_token_id=None)
    for name, out in [("keywords", by_keywords), ("GenerationParams", by_params), ("GenerationConfig", by_hf)]:
        assert_greedy_equal(out, ref, name)
    # keywords override the config's fields; a sampled GenerationConfig brings its warping
    p = specdec.GenerationParams.resolve(GenerationConfig(do_sample=True, temperature=0.5, top_k=7, top_p=0.9,
                                                          max_new_tokens=9), {"top_k": 3})
    assert (p.max_new_tokens, p.do_sample, p.temperature, p.top_k, p.top_p) == (9, True, 0.5, 3, 0.9)


def test_generation_params_refuse_what_they_cannot_honour(target):
    from transformers import GenerationConfig

    with pytest.raises(specdec.ConfigError, match=r"unknown generation option\(s\) \['max_tokens'\]"):
        specdec.generate(target, [4, 5], max_tokens=3)
    with pytest.raises(specdec.ConfigError, match="num_beams"):
        specdec.generate(target, [4, 5], generation_config=GenerationConfig(num_beams=4, max_new_tokens=3))
    with pytest.raises(specdec.ConfigError, match="repetition_penalty"):
        specdec.GenerationParams.from_generation_config(GenerationConfig(repetition_penalty=1.3))
    with pytest.raises(specdec.SpecdecError, match="max_new_tokens must be a positive integer"):
        specdec.generate(target, [4, 5], max_new_tokens=0)
