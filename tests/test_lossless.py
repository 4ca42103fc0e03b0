"""Lossless equality: for every drafter, specdec's greedy output == ``model.generate(do_sample=False)``.

Parametrized over ``DRAFTER_FACTORIES`` (tests/conftest.py) and many tiny random targets and prompts: short, long,
one-token, repetitive (n-grams match) and random; EOS inside an accepted run, ``max_new_tokens`` landing inside a
run, stop strings.
"""

from __future__ import annotations

import functools

import pytest
import torch

import specdec
from tests.conftest import DRAFTER_FACTORIES, char_tokenizer, get_tiny
from tests.equality import GreedyRef, assert_greedy_equal, greedy_ref
from tests.tiny import random_prompt, tiny_tokenizer

NO_EOS = None
_TOKENIZER = tiny_tokenizer()
_CHARS = char_tokenizer()  # for stop strings (see its docstring)


@functools.cache
def reference(seed: int, prompt: tuple[int, ...], max_new_tokens: int, eos=2, stop: tuple[str, ...] = ()) -> GreedyRef:
    """Tiny target ``seed``'s own greedy decoding of ``prompt``, with its finish reason (cached: treat as frozen)."""
    kwargs = {"eos_token_id": list(eos) if isinstance(eos, tuple) else eos}
    if stop:
        kwargs.update(stop_strings=list(stop), tokenizer=_CHARS)
    return greedy_ref(get_tiny(seed), torch.tensor([prompt]), max_new_tokens, **kwargs)


class RecordingStreamer:
    """Records what a streamer is given: the prompt (one put of [1, T]), then each token, then end()."""

    def __init__(self):
        self.puts: list[list[int]] = []
        self.ended = 0

    def put(self, value: torch.Tensor):
        self.puts.append(value.flatten().tolist())

    def end(self):
        self.ended += 1


def spec(factory, seed: int, prompt: tuple[int, ...], max_new_tokens: int, eos=2, stop: tuple[str, ...] = (),
         max_nodes: int = 16, verifier: str = "hf") -> specdec.GenerationOutput:
    """``factory``'s drafter on tiny target ``seed`` through ``verifier``, streamed and checked against its own
    stream (and, for a self-draft, full acceptance)."""
    target = get_tiny(seed)
    streamer = RecordingStreamer()
    out = specdec.generate(target, torch.tensor([prompt]), tokenizer=_CHARS if stop else _TOKENIZER,
                           drafter=factory.build(target, _TOKENIZER), max_new_tokens=max_new_tokens,
                           eos_token_id=eos, stop_strings=list(stop) or None, max_nodes=max_nodes,
                           streamer=streamer, verifier=verifier)
    # the streamer sees exactly the output, token by token, even when a stop cuts a verify step's run
    assert streamer.puts == [list(prompt)] + [[t] for t in out.new_tokens] and streamer.ended == 1
    if factory.self_draft:  # the target drafting for itself: every draft token is accepted
        assert out.stats.accepted == out.stats.drafted
    return out


def prompt_of(seed: int, length: int, repeat: bool) -> tuple[int, ...]:
    return tuple(random_prompt(seed, length, repeat=repeat)[0].tolist())


# (model seed, prompt seed, prompt length, repetitive prompt, max_new_tokens)
CASES = [
    (0, 0, 12, True, 40),
    (1, 1, 1, False, 32),  # one-token prompt
    (2, 2, 1, True, 24),  # one-token prompt
    (3, 3, 2, False, 32),
    (4, 4, 30, True, 40),
    (5, 5, 30, False, 40),
    (6, 6, 120, True, 32),  # long
    (7, 7, 120, False, 32),  # long, random
    (8, 8, 6, True, 48),
    (11, 9, 9, False, 40),
    (12, 10, 16, True, 40),
    (13, 11, 5, True, 40),
    (14, 12, 20, False, 24),
    (15, 13, 48, True, 40),
]


@pytest.mark.parametrize("seed, pseed, plen, repeat, max_new", CASES)
def test_greedy_equals_model_generate(drafter_factory, seed, pseed, plen, repeat, max_new):
    prompt = prompt_of(pseed, plen, repeat)
    ref = reference(seed, prompt, max_new, eos=NO_EOS)
    out = spec(drafter_factory, seed, prompt, max_new, eos=NO_EOS)
    assert_greedy_equal(out, ref)
    assert len(out.new_tokens) == max_new
    assert out.sequences[0].tolist() == list(prompt) + ref.tokens


def test_drafting_actually_accepts_tokens():
    """Guard against a vacuous suite: on repetitive text the n-gram drafter gets drafts accepted."""
    prompt = prompt_of(0, 12, True)
    out = spec(next(f for f in DRAFTER_FACTORIES if f.name == "ngram"), 0, prompt, 40, eos=NO_EOS)
    assert sum(out.stats.accepted) > 5 and out.stats.tau > 1.2


# natural EOS (id 2) found in the tiny targets' greedy output: (model seed, prompt seed, repeat)
NATURAL_EOS = [(9, 90, True), (10, 101, False), (24, 242, True), (30, 300, True), (30, 301, False), (32, 320, True)]


@pytest.mark.parametrize("seed, pseed, repeat", NATURAL_EOS)
def test_natural_eos(drafter_factory, seed, pseed, repeat):
    prompt = prompt_of(pseed, 10, repeat)
    ref = reference(seed, prompt, 48)
    assert ref.finish_reason == "eos" and ref.tokens[-1] == 2  # the case really ends in EOS
    out = spec(drafter_factory, seed, prompt, 48)
    assert_greedy_equal(out, ref)


def step_spans(stats: specdec.GenerationStats) -> list[tuple[int, int]]:
    """``[start, end)`` output positions committed by each verify step."""
    spans, start = [], 0
    for a in stats.accepted:
        spans.append((start, start + a + 1))
        start += a + 1
    return spans


def mid_run_positions(out: specdec.GenerationOutput) -> list[int]:
    """Output positions that are inside a verify step's run (not its last token) and hold a token's first
    occurrence, so stopping on that token must cut the run."""
    toks = out.new_tokens
    return [p for s, e in step_spans(out.stats) for p in range(s, e - 1)
            if p < len(toks) and toks[p] not in toks[:p] and toks[p] not in (0, 1, 2)]


SEEDS = list(range(12))


# drafters that get many tokens accepted on echo prompts; for them the mid-run cases must really occur
ACCEPTS_OFTEN = {"ngram", "ngram-min1", "draft_model-self"}


def echo_prompt(seed: int, prompt_seed: int) -> tuple[int, ...]:
    """``P + G + P``: a random prompt, the target's greedy continuation of it, and the prompt again, so the
    n-gram drafter proposes G after the second P and the target often repeats part of it (accepted runs that
    hold a token's first occurrence in the output)."""
    p = prompt_of(prompt_seed, 8, False)
    return p + tuple(reference(seed, p, 24, eos=NO_EOS).tokens) + p


def test_eos_inside_accepted_run(drafter_factory):
    hits = 0
    for seed in SEEDS:
        prompt = echo_prompt(seed, 100 + seed)
        free = spec(drafter_factory, seed, prompt, 40, eos=NO_EOS)
        mids = mid_run_positions(free)
        if not mids:
            continue
        p = mids[len(mids) // 2]
        eos = free.new_tokens[p]
        ref = reference(seed, prompt, 40, eos=eos)
        out = spec(drafter_factory, seed, prompt, 40, eos=eos)
        # p is the EOS id's first occurrence in the EOS-free decoding: the reference must end there
        assert ref == GreedyRef(free.new_tokens[:p + 1], "eos")
        assert_greedy_equal(out, ref, f"seed {seed}")
        hits += 1
    if drafter_factory.name in ACCEPTS_OFTEN:
        assert hits >= 3


@pytest.mark.parametrize("seed", SEEDS)
def test_eos_list_and_any_position(drafter_factory, seed):
    """EOS given as a list; the stop lands wherever the first of them appears."""
    prompt = prompt_of(200 + seed, 9, seed % 2 == 0)
    free = reference(seed, prompt, 30, eos=NO_EOS).tokens
    eos = [free[7], free[20]]
    ref = reference(seed, prompt, 30, eos=tuple(eos))
    assert ref.finish_reason == "eos" and len(ref) <= 8  # stops at the first of them, at position 7 or before
    out = spec(drafter_factory, seed, prompt, 30, eos=eos)
    assert_greedy_equal(out, ref)


@pytest.mark.parametrize("max_new", [1, 2, 3, 4, 7, 10])
def test_max_new_tokens_lands_mid_run(drafter_factory, max_new):
    for seed in range(0, 12, 2):
        prompt = prompt_of(300 + seed, 15, True)
        ref = reference(seed, prompt, max_new, eos=NO_EOS)
        out = spec(drafter_factory, seed, prompt, max_new, eos=NO_EOS)
        assert ref.finish_reason == "length" and len(ref) == max_new
        assert_greedy_equal(out, ref, f"seed {seed}")
        assert len(out.stats.accepted) == out.stats.verify_steps
        # never drafts past the budget: the last step's run ends exactly at max_new_tokens
        assert sum(a + 1 for a in out.stats.accepted) == max_new
    if max_new == 1:
        assert out.stats.verify_steps == 1


def test_max_new_tokens_never_exceeded_with_eos(drafter_factory):
    for seed, pseed, repeat in NATURAL_EOS:
        prompt = prompt_of(pseed, 10, repeat)
        for max_new in (1, 3, 17):
            ref = reference(seed, prompt, max_new)
            out = spec(drafter_factory, seed, prompt, max_new)
            assert_greedy_equal(out, ref, f"seed {seed}, max_new_tokens {max_new}")
            assert len(out.new_tokens) <= max_new


def stop_window(tokens: list[int], start: int, length: int) -> str | None:
    """The text of ``tokens[start:start+length]`` under the character tokenizer (None if it has a special id)."""
    ids = tokens[max(start, 0):start + length]
    if len(ids) < length or min(ids) < 3:
        return None
    return "".join(_CHARS.convert_ids_to_tokens(ids))


@pytest.mark.parametrize("seed", range(8))
def test_stop_strings(drafter_factory, seed):
    """Stop strings, matched by transformers' StopStringCriteria on both sides (character tokens here)."""
    prompt = echo_prompt(seed, 400 + seed)
    free = spec(drafter_factory, seed, prompt, 30, eos=NO_EOS)
    toks = free.new_tokens
    mids = [p for p in mid_run_positions(free) if toks[p] >= 3] or [p for p in range(5, 30) if toks[p] >= 3][:1]
    p = mids[0]
    text = "".join(_CHARS.convert_ids_to_tokens(toks))
    absent = next(c for c in ("~|", "|~", "^_", "_^", "@@", "&&") if c not in text)
    candidates = [
        (stop_window(toks, p, 1),),  # one token, first seen at p (inside a run when drafts were accepted)
        (stop_window(toks, p - 1, 2),),  # spans two tokens
        (stop_window(toks, 12, 3),),  # spans three tokens
        (stop_window([*prompt, *toks], len(prompt) - 1, 2),),  # spans the prompt's last token and the first new one
        (absent, stop_window(toks, 20, 1)),  # several strings, one never matches
        (absent,),  # never matches
    ]
    stops = [c for c in candidates if None not in c]
    assert len(stops) >= 3
    for stop in stops:
        ref = reference(seed, prompt, 30, eos=NO_EOS, stop=stop)
        out = spec(drafter_factory, seed, prompt, 30, eos=NO_EOS, stop=stop)
        assert_greedy_equal(out, ref, f"stop {stop}")
        # the case is what it claims: a stop string only cuts the stop-free decoding, and it did stop (or never could)
        assert toks[:len(ref)] == ref.tokens
        assert ref.finish_reason == ("length" if stop == (absent,) else "stop_string"), stop
    first = spec(drafter_factory, seed, prompt, 30, eos=NO_EOS, stop=(stop_window(toks, p, 1),))
    # a one-character string stops at its first token
    assert_greedy_equal(first, GreedyRef(toks[:toks.index(toks[p]) + 1], "stop_string"))


@pytest.mark.parametrize("max_nodes", [1, 2, 3, 5, 32])
def test_node_budgets(drafter_factory, max_nodes):
    for seed in (0, 3):
        prompt = prompt_of(500 + seed, 10, True)
        ref = reference(seed, prompt, 24, eos=NO_EOS)
        out = spec(drafter_factory, seed, prompt, 24, eos=NO_EOS, max_nodes=max_nodes)
        assert_greedy_equal(out, ref, f"seed {seed}")
        assert max(out.stats.drafted) <= max_nodes - 1


@pytest.mark.parametrize("seed", range(3))
def test_float32_targets(drafter_factory, seed):
    """float32 targets too (argmax ties could in principle flip; these seeds have none)."""
    target = get_tiny(seed, torch.float32)
    prompt = random_prompt(600 + seed, 10, repeat=True)
    ref = greedy_ref(target, prompt, 24, eos_token_id=None)
    out = specdec.generate(target, prompt, drafter=drafter_factory.build(target, _TOKENIZER), max_new_tokens=24,
                           eos_token_id=None)
    assert_greedy_equal(out, ref)


def test_decoder_reuse_across_requests(drafter_factory):
    """One SpecDecoder, several requests: drafter and verifier state must not leak between them."""
    target = get_tiny(0)
    decoder = specdec.SpecDecoder(target, _TOKENIZER, drafter=drafter_factory.build(target, _TOKENIZER))
    for pseed, plen in [(700, 12), (701, 1), (702, 30), (700, 12)]:
        prompt = prompt_of(pseed, plen, True)
        out = decoder.generate(torch.tensor([prompt]), max_new_tokens=20, eos_token_id=None)
        assert_greedy_equal(out, reference(0, prompt, 20, eos=NO_EOS), f"prompt {pseed}")


class SkippingBudget:
    """An adaptive budget that gives no draft nodes on some steps (the drafter is then not called: its hidden states
    and tokens wait for its next proposal) and the whole budget on the others: ``pattern`` of 1s and 0s, cycled."""

    def __init__(self, max_nodes: int, pattern: tuple[int, ...]) -> None:
        self.max_nodes, self.pattern, self.step = max_nodes, pattern, 0

    def nodes(self, batch_rows: int = 0) -> int:
        self.step += 1
        return self.max_nodes if self.pattern[self.step % len(self.pattern)] else 1

    def cut(self, tree, batch_rows: int = 0):
        return tree, None

    def observe(self, tree, acceptance, draft_ms=None) -> None:
        pass


@pytest.mark.parametrize("verifier", ["hf", "paged"])
@pytest.mark.parametrize("pattern", [(1, 0, 0), (0, 0, 1, 1, 0)])
def test_steps_the_budget_skips_leave_every_drafter_in_step(drafter_factory, verifier, pattern):
    """A step whose budget gives one node does not call the drafter; stateful drafters (an EAGLE head's feature
    cache, a draft model's KV cache, suffix segments) catch up at their next proposal, and the output stays the
    target's own."""
    from specdec.algorithms.acceptance import get_rule
    from specdec.serving.engine import decode
    from verifiers.hf import HFVerifier
    from verifiers.paged.verifier import PagedVerifier

    target = get_tiny(2)
    prompt = prompt_of(900, 14, True)
    ref = reference(2, prompt, 28, eos=NO_EOS)
    drafter = drafter_factory.build(target, _TOKENIZER)
    calls = []
    propose = drafter.propose
    drafter.propose = lambda ctx: calls.append(ctx.input_ids.shape[1]) or propose(ctx)
    v = HFVerifier(target) if verifier == "hf" else PagedVerifier(target)
    budget = SkippingBudget(8, pattern)
    steps = list(decode(v, drafter, get_rule("greedy"), torch.tensor([prompt]), max_new_tokens=28, max_nodes=8,
                        budget=budget))
    tokens = [t for s in steps for t in s.new_tokens]
    assert_greedy_equal(GreedyRef(tokens, "length"), ref)
    assert 0 < len(calls) < len(steps)  # some steps drafted, some skipped the drafter
