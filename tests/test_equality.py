"""The greedy-equality helper itself: it can fail (truncated, empty, over-long, wrong token, wrong finish reason),
its references carry the finish reason ``model.generate`` had, and no test goes back to prefix comparisons."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from specdec.types import GenerationOutput, GenerationStats
from tests.conftest import char_tokenizer, get_tiny
from tests.equality import (
    GreedyRef,
    as_greedy,
    assert_all_greedy_equal,
    assert_greedy_equal,
    assert_greedy_prefix,
    greedy_ref,
)
from tests.tiny import random_prompt

REF = GreedyRef([5, 6, 7, 2], "eos")


def output(tokens: list[int], reason: str | None, prompt=(9, 9)) -> GenerationOutput:
    stats = GenerationStats(new_tokens=len(tokens), finish_reason=reason)
    return GenerationOutput(sequences=torch.tensor([list(prompt) + tokens]), new_tokens=tokens, stats=stats)


def test_equal_results_pass_in_every_form():
    assert_greedy_equal(output([5, 6, 7, 2], "eos"), REF)
    assert_greedy_equal(SimpleNamespace(tokens=[5, 6, 7, 2], finish_reason="eos"), REF)  # an engine Request
    assert_greedy_equal(([5, 6, 7, 2], "eos"), REF)
    assert_greedy_equal(output([5, 6, 7, 2], "eos"), output([5, 6, 7, 2], "eos", prompt=(4,)))  # output vs output
    assert_all_greedy_equal([output([5, 6, 7, 2], "eos"), ([1], "length")], [REF, GreedyRef([1], "length")])


@pytest.mark.parametrize("tokens, reason, says", [
    ([5, 6, 7], "length", "strict prefix of the reference: it stops at position 3"),  # truncated
    ([], "eos", "strict prefix of the reference: it stops at position 0"),  # empty
    ([5, 6, 7, 2, 8], "length", "runs past the reference"),  # too long
    ([5, 6, 7, 2], "length", "same tokens, different finish reason"),  # wrong finish reason
    ([5, 6, 7, 2], None, "same tokens, different finish reason"),  # no finish reason at all
    ([5, 9, 7, 2], "eos", "first difference at position 1: got 9, want 6"),  # wrong token
])
def test_each_difference_fails_with_a_readable_message(tokens, reason, says):
    with pytest.raises(AssertionError) as err:
        assert_greedy_equal(output(tokens, reason), REF, "case")
    message = str(err.value)
    assert says in message and message.startswith("case: ")
    assert f"got  {len(tokens)} tokens, finish_reason={reason!r}" in message
    assert "want 4 tokens, finish_reason='eos'" in message


def test_a_bare_token_list_and_a_mismatched_batch_are_refused():
    with pytest.raises(TypeError, match="no finish reason"):
        assert_greedy_equal([5, 6, 7, 2], REF)
    with pytest.raises(AssertionError, match="request 1"):
        assert_all_greedy_equal([REF, ([5], "eos")], [REF, REF])
    with pytest.raises(AssertionError, match="2 results for 1 references"):
        assert_all_greedy_equal([REF, REF], [REF])


def test_sequences_must_end_with_the_new_tokens():
    bad = GenerationOutput(sequences=torch.tensor([[9, 5, 6, 8]]), new_tokens=[5, 6, 7], stats=GenerationStats())
    with pytest.raises(AssertionError, match="sequences does not end with"):
        as_greedy(bad)


def test_prefix_is_only_for_a_stated_cut():
    assert_greedy_prefix(output([5, 6], "kv_exhausted"), REF)
    assert_greedy_prefix(output([], "kv_exhausted"), REF, min_tokens=0)
    for tokens, reason, says in [([5, 6], "length", "should finish with 'kv_exhausted'"),
                                 ([], "kv_exhausted", "keeps between 1 and 3 tokens"),
                                 ([5, 6, 7, 2], "kv_exhausted", "keeps between 1 and 3 tokens"),
                                 ([5, 8], "kv_exhausted", "first difference at position 1")]:
        with pytest.raises(AssertionError, match=re.escape(says)):
            assert_greedy_prefix(output(tokens, reason), REF)


def test_references_carry_the_finish_reason_of_model_generate():
    target = get_tiny(9)  # a case whose greedy output reaches EOS (id 2) within 48 tokens (see test_lossless)
    prompt = random_prompt(90, 10)
    eos = greedy_ref(target, prompt, 48)
    assert eos.finish_reason == "eos" and eos.tokens[-1] == 2 and len(eos) < 48
    assert greedy_ref(target, prompt[0].tolist(), 48) == eos  # a list prompt is the same request
    free = greedy_ref(target, prompt, 48, eos_token_id=None)
    assert free.finish_reason == "length" and len(free) == 48 and free.tokens[:len(eos)] == eos.tokens
    short = greedy_ref(target, prompt, len(eos) - 1)  # max_new_tokens lands just before the EOS
    assert short == GreedyRef(eos.tokens[:-1], "length")
    at_eos = greedy_ref(target, prompt, len(eos))  # EOS is the last allowed token: EOS wins, as in Stopper
    assert at_eos == eos


def test_stop_string_references():
    tok = char_tokenizer()
    target, prompt = get_tiny(0), random_prompt(0, 12)
    free = greedy_ref(target, prompt, 30, eos_token_id=None)
    p = next(i for i in range(3, 30) if free.tokens[i] not in free.tokens[:i] and free.tokens[i] > 2)
    stop = tok.decode([free.tokens[p]])
    ref = greedy_ref(target, prompt, 30, eos_token_id=None, stop_strings=[stop], tokenizer=tok)
    assert ref == GreedyRef(free.tokens[:p + 1], "stop_string")


PREFIX = re.compile(r"\[\s*:\s*len\(\s*[\w.\[\]]+\.(new_tokens|tokens)\s*\)\s*\]")


def test_no_test_compares_a_greedy_output_as_a_prefix():
    """``out.new_tokens == ref[: len(out.new_tokens)]`` passes an empty output: use assert_greedy_equal, or
    assert_greedy_prefix where a request is cut short on purpose."""
    here = Path(__file__).parent
    hits = [f"{path.name}:{n}: {line.strip()}" for path in sorted(here.glob("*.py"))
            if path.name not in ("equality.py", Path(__file__).name)
            for n, line in enumerate(path.read_text().splitlines(), 1) if PREFIX.search(line)]
    assert not hits, "prefix comparisons of greedy outputs:\n" + "\n".join(hits)
