"""Nothing lost, nothing mixed up: one test per failure found by trying specdec as a new user would (issue 23).

Threads sharing a decoder, KV blocks held after a request, a single request out of KV blocks, padded batches with
``attention_mask``, reproducible sampling on a reused adaptive decoder, and bad input that must get one clear
error. Tiny float64 Llama targets (tests/conftest.py).
"""

from __future__ import annotations

import threading

import pytest
import torch

import specdec
from specdec.algorithms.acceptance import get_rule
from specdec.algorithms.stopping import Stopper
from specdec.errors import SpecdecError
from specdec.serving.engine import BatchEngine, DrafterPool
from tests.conftest import get_tiny
from tests.equality import GreedyRef, assert_all_greedy_equal, assert_greedy_equal, assert_greedy_prefix, greedy_ref
from tests.tiny import random_prompt, tiny_tokenizer

TOK = tiny_tokenizer()
PROMPTS = [random_prompt(s, n) for s, n in [(1, 9), (2, 23), (3, 5), (4, 40), (5, 14), (6, 31)]]


def solo(prompt: torch.Tensor, n: int = 24) -> GreedyRef:
    return greedy_ref(get_tiny(0), prompt, n, eos_token_id=None)


# ------------------------------------------------------------------------------------------ 1. threads

@pytest.mark.parametrize("verifier", ["hf", "paged"])
def test_threads_sharing_a_decoder_never_mix(verifier):
    dec = specdec.SpecDecoder(get_tiny(0), TOK, drafter="ngram", verifier=verifier)
    results: dict[int, specdec.GenerationOutput] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(2):
                out = dec.generate(PROMPTS[i], max_new_tokens=24, eos_token_id=None)
                assert_greedy_equal(out, results.setdefault(i, out), f"prompt {i}, run again")
        except BaseException as e:  # noqa: BLE001 - reported below, with the thread's prompt
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert_all_greedy_equal([results[i] for i in range(len(PROMPTS))], [solo(p) for p in PROMPTS])


# ------------------------------------------------------------------------------------------ 2, 3. KV blocks

def paged(num_blocks: int = 8, block_size: int = 16, preemption: str = "refuse", **kw):
    return specdec.SpecDecoder(get_tiny(0), TOK, drafter="ngram", verifier="paged", max_nodes=8,
                               verifier_kwargs={"num_blocks": num_blocks, "block_size": block_size,
                                                "preemption": preemption}, **kw)


def test_a_finished_request_frees_its_blocks_and_a_batch_after_it_runs():
    dec = paged()
    dec.generate(PROMPTS[0], max_new_tokens=8, eos_token_id=None)
    assert dec.verifier.num_free_blocks == dec.verifier.num_blocks
    long = random_prompt(7, 60)  # needs more blocks than the single request left free before the fix (5 of 8)
    done = []
    t = threading.Thread(target=lambda: done.append(dec.generate(input_ids=[long[0]], max_new_tokens=4,
                                                                 eos_token_id=None)))
    t.start()
    t.join(timeout=60)
    assert done, "the batch never finished"
    assert_greedy_equal(done[0][0], solo(long, 4))
    assert dec.verifier.num_free_blocks == dec.verifier.num_blocks


def test_blocks_held_outside_a_batch_fail_at_once_instead_of_spinning():
    dec = paged()
    dec.verifier.start("elsewhere", PROMPTS[3][:, :39])  # 39 positions: 3 of the 8 blocks held by no batch request
    engine = BatchEngine(dec.verifier, DrafterPool(lambda: None, first=dec.drafter), get_rule("greedy"),
                         max_nodes=8, max_batch_size=2)
    long = random_prompt(7, 100)  # 7 blocks: fits the pool, not what is free
    engine.add(long, max_new_tokens=4, stopper=Stopper(long[0].tolist(), 4, None, None, None))
    with pytest.raises(SpecdecError, match="held outside"):
        for _ in range(3):
            engine.step()


@pytest.mark.parametrize("preemption", ["refuse", "recompute"])
def test_a_single_request_out_of_blocks_ends_keeping_its_tokens(preemption):
    dec = paged(num_blocks=4, block_size=4, preemption=preemption)  # 16 positions: prompt 9 + a few steps
    out = dec.generate(PROMPTS[0], max_new_tokens=40, eos_token_id=None)
    # cut short on purpose: finish reason "kv_exhausted", 1 to 39 tokens kept, each the target's own
    assert_greedy_prefix(out, solo(PROMPTS[0], 40), "kv_exhausted", min_tokens=1)
    assert "num_blocks" in out.error and "max_batch_size" not in out.error
    assert dec.verifier.num_free_blocks == dec.verifier.num_blocks


# ------------------------------------------------------------------------------------------ 4. padded batches

@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("verifier", ["hf", "paged"])
def test_padded_batches_with_attention_mask(side, verifier):
    rows = [PROMPTS[0][0], PROMPTS[2][0], PROMPTS[4][0]]
    width = max(len(r) for r in rows)
    ids = torch.full((3, width), 2, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    outs = specdec.generate(get_tiny(0), ids, attention_mask=mask, tokenizer=TOK, drafter="ngram",
                            verifier=verifier, max_new_tokens=16, eos_token_id=None)
    assert_all_greedy_equal(outs, [solo(r[None], 16) for r in rows])
    one = specdec.generate(get_tiny(0), ids[1:2], attention_mask=mask[1:2], tokenizer=TOK, max_new_tokens=16,
                           eos_token_id=None)
    assert_greedy_equal(one, solo(rows[1][None], 16))


@pytest.mark.parametrize("mask, words", [
    (torch.ones(2, 3), "shape"), (torch.full((1, 5), 2), r"1 \(token\) and 0"), (torch.zeros(1, 5), "every token")])
def test_bad_attention_masks(mask, words):
    with pytest.raises(SpecdecError, match=words):
        specdec.generate(get_tiny(0), torch.ones(1, 5, dtype=torch.long) * 7, attention_mask=mask, tokenizer=TOK,
                         max_new_tokens=4)


# ------------------------------------------------------------------------------------------ 6. bad input

BAD_INPUTS = [
    (dict(input_ids=torch.tensor([[5, 96]])), "outside the target's vocabulary"),
    (dict(input_ids=torch.tensor([[5, -1]])), "outside the target's vocabulary"),
    (dict(input_ids=torch.tensor([[5.0, 6.7]])), "integer token ids"),
    (dict(prompt=[{"role": "user"}]), "needs a 'role'"),
    (dict(prompt=[{"content": "hi"}]), "needs a 'role'"),
    (dict(input_ids=torch.tensor([[5, 6]]), stop_strings=[None]), "stop_strings"),
    (dict(input_ids=torch.tensor([[5, 6]]), stop_strings=5), "stop_strings"),
    (dict(input_ids=torch.tensor([[5, 6]]), eos_token_id="2"), "the string '2'"),
    (dict(input_ids=torch.tensor([[5, 6]]), eos_token_id=-3), "non-negative"),
    (dict(prompt="bad \ud800 text"), "lone surrogate"),
]


@pytest.mark.parametrize("kwargs, words", BAD_INPUTS, ids=[w for _, w in BAD_INPUTS])
def test_bad_input_gets_one_clear_error(kwargs, words):
    dec = specdec.SpecDecoder(get_tiny(0), TOK, drafter="ngram")
    with pytest.raises(SpecdecError, match=words):
        dec.generate(max_new_tokens=4, chat=False, **kwargs)


def test_eos_as_a_tensor_is_taken_like_transformers():
    dec = specdec.SpecDecoder(get_tiny(0), TOK, drafter="ngram")
    want = greedy_ref(get_tiny(0), PROMPTS[1], 30, eos_token_id=[7, 11])
    out = dec.generate(PROMPTS[1], max_new_tokens=30, eos_token_id=torch.tensor([7, 11]))
    assert_greedy_equal(out, want)


def test_missing_paths_are_named_as_such(tmp_path):
    with pytest.raises(SpecdecError, match="no such directory"):
        specdec.SpecDecoder(get_tiny(0), TOK, drafter=str(tmp_path / "nope"))
    with pytest.raises(SpecdecError, match="draft model"):
        specdec.SpecDecoder(get_tiny(0), TOK, drafter="draft_model", drafter_kwargs={"path": str(tmp_path / "no")})


def test_cli_names_its_own_flag(capsys):
    from specdec import cli

    with pytest.raises(SystemExit):
        cli.main(["generate", "hi", "--drafter", "draft_model"])
    assert "--draft-path" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ 7. seeds

def test_seeded_sampling_on_a_reused_adaptive_decoder_is_reproducible():
    """A dynamic tree is cut by calibrated node values: with the decoder's shared calibrator, what it learned from
    other requests changed the trees, and so the sampled tokens, of a seeded request."""
    from specdec.algorithms.cost import CostProfile
    from tests.conftest import _draft_model

    profile = CostProfile(key={}, verify_ms={1: 50.0, 2: 52.0, 4: 60.0, 8: 80.0, 16: 130.0},
                          draft_ms={"DraftModelDrafter": 5.0})
    drafter = _draft_model(get_tiny(0), TOK, depth=4, width=1, dynamic=True)
    dec = specdec.SpecDecoder(get_tiny(0), TOK, drafter=drafter, adaptive=True, cost_profile=profile)
    first = dec.generate(PROMPTS[1], max_new_tokens=32, do_sample=True, seed=3, eos_token_id=None).new_tokens
    for p in PROMPTS:  # other requests teach the shared calibrator
        dec.generate(p, max_new_tokens=32, eos_token_id=None)
        dec.generate(p, max_new_tokens=32, do_sample=True, seed=11, eos_token_id=None)
    again = dec.generate(PROMPTS[1], max_new_tokens=32, do_sample=True, seed=3, eos_token_id=None).new_tokens
    assert again == first


def test_an_inconsistent_draft_model_config_is_named(tmp_path):
    import json

    from tests.tiny import save_tiny

    path = save_tiny(tmp_path / "draft", seed=3, layers=1)
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_attention_heads"] = 5  # does not divide hidden_size 32
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SpecdecError, match="draft model .* invalid config"):
        specdec.SpecDecoder(get_tiny(0, dtype=torch.float32), TOK, drafter="draft_model",
                            drafter_kwargs={"path": str(path)})
