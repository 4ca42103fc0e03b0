"""The one exact greedy-equality check: same tokens, same length, same finish reason.

Greedy losslessness is compared whole. A reference carries the target's own greedy tokens (``model.generate``,
EOS kept) *and* why that decoding ended, named as :class:`specdec.algorithms.stopping.Stopper` names it:
``"eos"`` (the last token is an EOS id), ``"stop_string"`` (the last token completes a stop string) or
``"length"`` (exactly ``max_new_tokens`` tokens). :func:`assert_greedy_equal` then checks an output against it, so an
empty, truncated or over-long output, or one that stopped for another reason, fails with a message naming the first
differing position.

Example::

    ref = greedy_ref(target, ids, 20)                 # GreedyRef(tokens=[...], finish_reason="eos")
    out = specdec.generate(target, ids, drafter="ngram", max_new_tokens=20)
    assert_greedy_equal(out, ref)

The one sanctioned partial comparison is :func:`assert_greedy_prefix`, for a request that was cut short on purpose
(``"kv_exhausted"``): it states the reason and that the kept tokens are a correct, strictly shorter prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

FINISH_REASONS = ("eos", "stop_string", "length")  # the ones a model.generate reference can have
_UNSET = object()


@dataclass(frozen=True)
class GreedyRef:
    """A greedy result: the new tokens and why decoding ended (see the module docstring)."""

    tokens: list[int]
    finish_reason: str | None

    def __len__(self) -> int:
        return len(self.tokens)


def _eos_ids(model, eos_token_id) -> frozenset[int]:
    if eos_token_id is _UNSET:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int):
        return frozenset([eos_token_id])
    return frozenset(int(e) for e in eos_token_id)


def reference_finish_reason(prompt: Sequence[int], tokens: Sequence[int], max_new_tokens: int, eos_ids=(),
                            stop_strings=None, tokenizer=None) -> str:
    """Why ``model.generate`` stopped after ``tokens``, checked in :class:`Stopper`'s order (EOS, stop string,
    length); raises when none explains where it stopped (then the reference itself is not what the test thinks)."""
    tokens = [int(t) for t in tokens]
    if tokens and tokens[-1] in set(eos_ids):
        return "eos"
    if tokens and stop_strings:
        from transformers.generation.stopping_criteria import StopStringCriteria

        criteria = StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings)
        if bool(criteria(torch.tensor([list(prompt) + tokens]), None)[0]):
            return "stop_string"
    if len(tokens) == max_new_tokens:
        return "length"
    raise AssertionError(f"the reference stopped after {len(tokens)} of {max_new_tokens} tokens without EOS "
                         f"(ids {sorted(eos_ids)}) or a stop string ({stop_strings}): {tokens}")


def greedy_ref(model, ids, max_new_tokens: int, *, eos_token_id=_UNSET, stop_strings=None, tokenizer=None,
               **kwargs) -> GreedyRef:
    """The target's own greedy decoding of ``ids`` (``[1, T]`` tensor, 1-D tensor or list), with its finish reason.

    ``eos_token_id``: as ``model.generate`` takes it (unset: the model's generation config; None: no EOS).
    ``stop_strings`` need ``tokenizer``. Other ``kwargs`` go to ``model.generate``.
    """
    ids = torch.as_tensor(ids, dtype=torch.long)
    ids = ids[None] if ids.dim() == 1 else ids
    assert ids.shape[0] == 1, f"a greedy reference is one request; got ids of shape {tuple(ids.shape)}"
    ids = ids.to(getattr(model, "device", ids.device))
    if eos_token_id is not _UNSET:
        kwargs["eos_token_id"] = eos_token_id
    if stop_strings:
        kwargs.update(stop_strings=stop_strings, tokenizer=tokenizer)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         **kwargs)
    prompt, tokens = ids[0].tolist(), out[0, ids.shape[1]:].tolist()
    reason = reference_finish_reason(prompt, tokens, max_new_tokens, _eos_ids(model, eos_token_id), stop_strings,
                                     tokenizer)
    return GreedyRef(tokens, reason)


def as_greedy(result) -> GreedyRef:
    """A :class:`GreedyRef` of what a test holds: a :class:`GreedyRef`, a ``GenerationOutput`` (its ``new_tokens``
    and ``stats.finish_reason``; its ``sequences`` must end with those tokens), an engine ``Request`` (``tokens``,
    ``finish_reason``) or a ``(tokens, finish_reason)`` pair. A bare token list is refused: say why it ended."""
    if isinstance(result, GreedyRef):
        return result
    if hasattr(result, "new_tokens") and hasattr(result, "stats"):  # GenerationOutput
        tokens = list(result.new_tokens)
        seq = getattr(result, "sequences", None)
        if seq is not None and tokens:
            tail = seq[0, seq.shape[-1] - len(tokens):].tolist()
            assert tail == tokens, f"output.sequences does not end with output.new_tokens: {tail} != {tokens}"
        return GreedyRef(tokens, result.stats.finish_reason)
    if hasattr(result, "tokens") and hasattr(result, "finish_reason"):  # serving Request
        return GreedyRef(list(result.tokens), result.finish_reason)
    if isinstance(result, tuple) and len(result) == 2 and (result[1] is None or isinstance(result[1], str)):
        return GreedyRef([int(t) for t in result[0]], result[1])
    raise TypeError(f"cannot compare {type(result).__name__} as a greedy result: pass a GenerationOutput, a Request, "
                    "a GreedyRef or a (tokens, finish_reason) pair (a bare token list has no finish reason)")


def _window(tokens: list[int], at: int, width: int = 4) -> str:
    lo = max(0, at - width)
    head = "... " if lo else ""
    tail = " ..." if at + width + 1 < len(tokens) else ""
    return f"{head}{tokens[lo:at + width + 1]}{tail}"


def greedy_difference(actual, expected) -> str | None:
    """None when ``actual`` and ``expected`` are the same greedy result, else a readable account of how they differ."""
    got, want = as_greedy(actual), as_greedy(expected)
    if got.tokens == want.tokens and got.finish_reason == want.finish_reason:
        return None
    first = next((i for i, (a, b) in enumerate(zip(got.tokens, want.tokens)) if a != b), None)
    if first is not None:
        what = (f"first difference at position {first}: got {got.tokens[first]}, want {want.tokens[first]}\n"
                f"  got  around it: {_window(got.tokens, first)}\n  want around it: {_window(want.tokens, first)}")
    elif len(got.tokens) < len(want.tokens):
        what = (f"the output is a strict prefix of the reference: it stops at position {len(got.tokens)}, where the "
                f"reference goes on with {want.tokens[len(got.tokens)]}")
    elif len(got.tokens) > len(want.tokens):
        what = (f"the output runs past the reference: the reference ends at position {len(want.tokens)}, where the "
                f"output goes on with {got.tokens[len(want.tokens)]}")
    else:
        what = "same tokens, different finish reason"
    return (f"greedy output differs from the reference: {what}\n"
            f"  got  {len(got.tokens)} tokens, finish_reason={got.finish_reason!r}\n"
            f"  want {len(want.tokens)} tokens, finish_reason={want.finish_reason!r}")


def assert_greedy_equal(actual, expected, context: str = "") -> None:
    """Assert ``actual`` is exactly ``expected``: same tokens, same length, same finish reason (either side may be
    anything :func:`as_greedy` takes, e.g. a batched output against the same request generated alone)."""
    diff = greedy_difference(actual, expected)
    if diff is not None:
        raise AssertionError(f"{context}: {diff}" if context else diff)


def assert_all_greedy_equal(actuals, expecteds, context: str = "") -> None:
    """:func:`assert_greedy_equal` for each pair of two equally long sequences (request i named on failure)."""
    actuals, expecteds = list(actuals), list(expecteds)
    assert len(actuals) == len(expecteds), f"{context}: {len(actuals)} results for {len(expecteds)} references"
    for i, (a, e) in enumerate(zip(actuals, expecteds)):
        assert_greedy_equal(a, e, f"{context} request {i}" if context else f"request {i}")


def assert_greedy_prefix(actual, expected, finish_reason: str = "kv_exhausted", min_tokens: int = 1,
                         context: str = "") -> None:
    """A request cut short on purpose (e.g. out of KV blocks) keeps a correct prefix: its finish reason is
    ``finish_reason``, it has at least ``min_tokens`` tokens, strictly fewer than the reference, and each equals the
    reference's token at its position."""
    got, want = as_greedy(actual), as_greedy(expected)
    where = f"{context}: " if context else ""
    assert got.finish_reason == finish_reason, (f"{where}a cut-short request should finish with {finish_reason!r}; "
                                                f"got {got.finish_reason!r} after {len(got.tokens)} tokens")
    assert min_tokens <= len(got.tokens) < len(want.tokens), (
        f"{where}a cut-short request keeps between {min_tokens} and {len(want.tokens) - 1} tokens of the "
        f"{len(want.tokens)}-token reference; got {len(got.tokens)}")
    assert_greedy_equal(GreedyRef(got.tokens, None), GreedyRef(want.tokens[:len(got.tokens)], None),
                        f"{context} (the kept prefix)".strip())
