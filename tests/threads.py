"""Several threads decoding at once with drafters that share one store (a suffix cache, a recycling table)."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable

import torch

import specdec
from tests.conftest import get_tiny
from tests.tiny import tiny_tokenizer


def check_threads_keep_their_outputs(make_drafter: Callable, threads: int = 6, rounds: int = 2) -> None:
    """``threads`` threads, each with its own model copy and decoder, decode ``rounds`` requests with drafters from
    ``make_drafter(target, tokenizer)`` (sharing whatever it shares); every output must equal plain decoding."""
    target, tok = get_tiny(0), tiny_tokenizer()
    models = [copy.deepcopy(target) for _ in range(threads)]
    prompts = [torch.tensor([[3 + (i * 7 + j) % 40 for j in range(12)] * 2]) for i in range(threads)]
    plain = [specdec.generate(target, p, tokenizer=tok, drafter="none", max_new_tokens=24, eos_token_id=None)
             for p in prompts]
    outs: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def run(i):
        try:
            for _ in range(rounds):
                outs[i] = specdec.generate(models[i], prompts[i], tokenizer=tok, drafter=make_drafter(target, tok),
                                           max_new_tokens=24, eos_token_id=None).new_tokens
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors
    assert [outs[i] for i in range(threads)] == [p.new_tokens for p in plain]
