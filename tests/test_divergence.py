"""The first differing token of two greedy outputs and the target's top-2 logit gap there (specdec.bench.divergence),
and the line the report prints for it. Tiny random models only: no network, no real model."""

from __future__ import annotations

import doctest

import pytest
import torch

from specdec.bench import divergence, report
from specdec.bench.divergence import add_divergences, first_difference, first_divergence, top2_gap, ulp
from specdec.bench.report import Measurement
from tests.tiny import random_prompt, tiny_llama

torch.set_num_threads(1)  # another process may be benchmarking on this machine


def plain_logits(model, prompt: torch.Tensor, prefix: list[int]) -> torch.Tensor:
    """The target's logits ``[V]`` for the token after prompt + prefix, from one forward written out here."""
    ids = torch.cat([prompt, torch.tensor([prefix], dtype=torch.long)], dim=1)
    with torch.no_grad():
        return model(ids).logits[0, -1]


def test_doctests():
    for module in (divergence, report):
        assert doctest.testmod(module).failed == 0


@pytest.mark.parametrize("a, b, expected", [
    ([5, 6, 7], [5, 6, 9], 2), ([1], [2], 0), ([5, 6], [5, 6, 1], 2), ([5, 6, 1], [5, 6], 2), ([], [3], 0),
    ([5, 6], [5, 6], None), ([], [], None), ((4, 5), [4, 5], None),
])
def test_first_difference(a, b, expected):
    assert first_difference(a, b) == expected


def test_ulp_golden():
    assert ulp(12.3, torch.bfloat16) == 0.0625 and ulp(-12.3, torch.bfloat16) == 0.0625  # 2**-7 * 2**3
    assert ulp(16.0, torch.bfloat16) == 0.125 and ulp(15.99, torch.bfloat16) == 0.0625  # binade edges
    assert ulp(1.0, torch.float16) == 2 ** -10 and ulp(0.75, torch.float16) == 2 ** -11
    assert ulp(3.0, torch.float32) == 2 ** -22
    assert ulp(0.0, torch.bfloat16) == 2 ** -133  # subnormal spacing: eps * smallest normal
    # the spacing is the distance to the next value of the dtype
    x = torch.tensor(12.3, dtype=torch.bfloat16)
    assert float(torch.nextafter(x, torch.tensor(100.0, dtype=torch.bfloat16)) - x) == ulp(float(x), torch.bfloat16)


def test_top2_gap_in_steps():
    logits = torch.tensor([1.0, 12.25, 12.375, -3.0], dtype=torch.bfloat16)
    assert top2_gap(logits) == (0.125, 2.0, 12.375)  # two bfloat16 steps of 0.0625 near 12
    tie = torch.tensor([7.5, 7.5, 0.0], dtype=torch.bfloat16)
    assert top2_gap(tie) == (0.0, 0.0, 7.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gap_at_the_first_differing_token(dtype):
    model = tiny_llama(seed=3, dtype=dtype)
    prompt = random_prompt(0, 10)
    a, b = [5, 6, 7, 8], [5, 6, 9]
    d = first_divergence(model, prompt, a, b)
    assert d.position == 2 and d.dtype == str(dtype).removeprefix("torch.")
    top1, top2 = plain_logits(model, prompt, [5, 6]).topk(2).values.tolist()
    assert d.gap == top1 - top2 and d.top_logit == top1 and d.gap > 0
    assert d.gap_ulps == d.gap / ulp(max(abs(top1), abs(top2)), dtype)
    assert first_divergence(model, prompt, b, a) == d  # symmetric: only the common prefix matters
    assert first_divergence(model, prompt, a, list(a)) is None


def test_gap_at_position_zero_and_after_a_shorter_output():
    model = tiny_llama(seed=3, dtype=torch.float32)
    prompt = random_prompt(1, 8)
    top1, top2 = plain_logits(model, prompt[:, :-1], prompt[0, -1:].tolist()).topk(2).values.tolist()
    assert first_divergence(model, prompt, [4], [5]).gap == top1 - top2  # the prompt alone
    d = first_divergence(model, prompt, [5, 6], [5, 6, 2])  # one output ended (no EOS, e.g. cut) where the other goes on
    top1, top2 = plain_logits(model, prompt, [5, 6]).topk(2).values.tolist()
    assert d.position == 2 and d.gap == top1 - top2


def test_an_exact_tie_has_gap_zero():
    """Two LM-head rows made equal: the target's top two logits tie exactly, so any order may pick either."""
    model = tiny_llama(seed=3, dtype=torch.bfloat16)
    prompt = random_prompt(2, 9)
    best = int(plain_logits(model, prompt, [7]).argmax())
    other = 3 if best != 3 else 4
    with torch.no_grad():
        model.lm_head.weight[other] = model.lm_head.weight[best]
    d = first_divergence(model, prompt, [7, best], [7, other])
    assert (d.position, d.gap, d.gap_ulps) == (1, 0.0, 0.0)


def test_add_divergences_fills_every_run():
    model = tiny_llama(seed=3, dtype=torch.bfloat16)
    inputs = [random_prompt(0, 10), random_prompt(1, 7)]
    ms = [Measurement("hf", 0, "c", (5, 6, 7), 1.0), Measurement("hf", 1, "c", (8, 9), 1.0),
          Measurement("s", 0, "c", (5, 6, 7), 1.0, 1), Measurement("s", 1, "c", (8, 4, 4), 1.0, 1)]
    runs = report.summarize(ms, ["hf", "s"])
    add_divergences(runs, ms, model, inputs, ["q0", "q1"])
    hf, s = runs
    assert hf["divergences"] == [] and hf["max_divergence_gap"] is None
    [e] = s["divergences"]
    d = first_divergence(model, inputs[1], [8, 9], [8, 4, 4])
    assert e == {"prompt_index": 1, "question_id": "q1", "position": 1, "reference_token": 9, "token": 4,
                 "top_logit": d.top_logit, "gap": d.gap, "gap_ulps": d.gap_ulps, "dtype": "bfloat16"}
    assert s["max_divergence_gap"] == d.gap and s["mismatches"] == len(s["divergences"])


def entry(gap: float, steps: float, dtype: str = "bfloat16") -> dict:
    return {"prompt_index": 0, "question_id": 1, "position": 3, "reference_token": 5, "token": 6, "top_logit": 12.0,
            "gap": gap, "gap_ulps": steps, "dtype": dtype}


def test_divergence_lines_golden():
    runs = [{"method": "hf", "divergences": []},
            {"method": "specdec:ngram", "divergences": [entry(0.0625, 1.0), entry(0.0, 0.0), entry(0.125, 2.0)]},
            {"method": "specdec:none", "divergences": [entry(0.0003, 315.4, "float32")]},
            {"method": "vllm"}]  # a peer engine's run: no divergences recorded
    assert report.divergence_lines(runs).splitlines() == [
        ("specdec:ngram: 3 divergences, top-2 logit gap at the first differing token: max 0.125 (2 bfloat16 steps), "
         "median 0.0625 (1 step); 2 of 3 within 1 step"),
        ("specdec:none: 1 divergence, top-2 logit gap at the first differing token: max 0.0003 (315 float32 steps), "
         "median 0.0003 (315 steps); 0 of 1 within 1 step"),
    ]
    assert report.divergence_lines(runs[:1]) == "" and report.divergence_lines([{"method": "x"}]) == ""


def _result(runs: list[dict]) -> dict:
    return {"target": "t", "dtype": "bfloat16", "device": "cpu", "threads": 2, "prompts": 2, "max_new_tokens": 8,
            "runs": runs}


def test_text_report_prints_divergences_under_the_table():
    ms = [Measurement("hf", 0, "c", (1, 2), 1.0), Measurement("s", 0, "c", (1, 3), 1.0, 1)]
    runs = report.summarize(ms, ["hf", "s"])
    runs[0]["divergences"], runs[1]["divergences"] = [], [entry(0.0625, 1.0)]
    text = report.text_report(_result(runs))
    table, lines = report.runs_table(runs), report.divergence_lines(runs)
    assert f"{table}\n\n{lines}\n\nspeedup vs hf by category" in text and lines.startswith("s: 1 divergence,")
    merged = report.merge([_result(runs)])  # the JSON keeps them, so `python -m specdec.bench.report` prints them
    assert report.text_report(merged) == text


def test_no_divergence_line_without_mismatches():
    ms = [Measurement("hf", 0, "c", (1, 2), 1.0), Measurement("s", 0, "c", (1, 2), 1.0, 1)]
    runs = report.summarize(ms, ["hf", "s"])
    plain = report.text_report(_result(runs))
    for run in runs:
        run["divergences"], run["max_divergence_gap"] = [], None
    assert report.text_report(_result(runs)) == plain and "divergence" not in plain
