"""The support matrix: every declared family x {none, n-gram (branching tries), draft-model tree, self-draft,
sampling} x {hf verifier, paged batch}, each cell lossless or refused with the declared reason.

Targets are tiny seeded random float64 models (tests/families.py) whose sliding windows (12 positions) are far
shorter than the prompts, with Gemma 2's attention softcapping set low enough to change its outputs. Greedy cells
compare with ``model.generate``; the paged column runs a batch of prompts of different lengths, each compared with
its own reference. The sampling cell has the target draft for itself with ``do_sample=True``: every draft token is
accepted only if the verifier's distributions equal the drafter's (the target's own forward) at every node; the
distribution itself is checked by the chi-square tests at the end (two non-Llama families, one sliding).

The support matrix in ``docs/support-matrix.md`` is :func:`render_matrix` of the same cells
(``test_support_matrix_doc_is_current``); ``SPECDEC_UPDATE_MATRIX=1 pytest tests/test_families.py -k matrix_doc``
rewrites it.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import pytest
import torch
import transformers as tf

import specdec
from drafters.draft_model import DraftModelDrafter
from specdec.models import families
from specdec.models.families import UnsupportedModelError
from tests.equality import GreedyRef, assert_greedy_equal, greedy_ref
from tests.families import SERVED, WINDOW, tiny_family
from tests.tiny import random_prompt, tiny_llama, tiny_tokenizer

TOK = tiny_tokenizer()
METHODS = ["none", "ngram", "draft tree", "self-draft", "sampling"]
VERIFIERS = ["hf", "paged"]
MAX_NEW = 24
MATRIX_DOC = Path(__file__).resolve().parents[1] / "docs" / "support-matrix.md"


def branching_prompt(seed: int, length: int) -> torch.Tensor:
    """``[1, length]`` ids in which each of a few bigrams recurs with different continuations, so the n-gram
    drafter's tries branch."""
    g = torch.Generator().manual_seed(seed)
    heads = torch.randint(3, 96, (3, 2), generator=g)
    ids = []
    while len(ids) < length:
        ids += heads[len(ids) % 3].tolist() + torch.randint(3, 96, (2,), generator=g).tolist()
    return torch.tensor([ids[:length]])


PROMPTS = [branching_prompt(1, 3 * WINDOW), branching_prompt(2, 2 * WINDOW + 5)]  # both cross the window


def family_type(name: str) -> str:
    return SERVED[name][0].model_type


def expected(name: str, verifier: str) -> str | None:
    """The declared refusal of a cell (None: lossless)."""
    fam = families.FAMILIES[family_type(name)]
    return fam.refusal or (fam.paged_refusal if verifier == "paged" else None)


def branches(parents: list[int]) -> bool:
    """Whether a tree (its parents list, dead nodes -1) has a node with two children."""
    live = [p for p in parents[1:] if p >= 0]
    return len(set(live)) < len(live)


def count_branching(verifier) -> list[int]:
    """Counts, in the returned one-element list, the trees ``verifier`` scores that branch (so a branching cell
    cannot pass vacuously); wraps its ``score`` on this instance."""
    seen = [0]
    inner = verifier.score

    def wrapped(request_ids, trees, *args, **kwargs):
        seen[0] += sum(branches(t.parents[0].tolist()) for t in trees)
        return inner(request_ids, trees, *args, **kwargs)

    verifier.score = wrapped
    return seen


def drafter_for(method: str, model) -> tuple[str, dict]:
    """The cell's drafter by name and keyword arguments (a batch builds one per request)."""
    if method == "none":
        return "none", {}
    if method == "ngram":
        return "ngram", {"min_ngram": 1, "max_candidates": 4}
    if method == "draft tree":
        return "draft_model", {"model": tiny_llama(1234, dtype=model.dtype, layers=1), "depth": 3, "width": 2,
                               "top_k": 3}
    return "draft_model", {"model": model, "depth": 3, "width": 1}  # self-draft and sampling


@functools.cache
def reference(name: str, i: int) -> GreedyRef:
    return greedy_ref(tiny_family(name), PROMPTS[i], MAX_NEW, eos_token_id=None)


def run_cell(name: str, method: str, verifier: str):
    """Decode the cell's prompts; returns (outputs, the count of branching trees verified)."""
    model = tiny_family(name)
    drafter, kwargs = drafter_for(method, model)
    dec = specdec.SpecDecoder(model, TOK, drafter=drafter, drafter_kwargs=kwargs, verifier=verifier, max_nodes=8,
                              **({"verifier_kwargs": {"num_blocks": 64, "block_size": 4}} if verifier == "paged"
                                 else {}))
    branching = count_branching(dec.verifier)
    params = {"max_new_tokens": MAX_NEW, "eos_token_id": None}
    if method == "sampling":
        params.update(do_sample=True, seed=5)
    if verifier == "paged":  # one batch of prompts of different lengths
        outs = dec.generate(input_ids=[p[0] for p in PROMPTS], **params)
    else:
        outs = [dec.generate(p, **params) for p in PROMPTS]
    return outs, branching[0]


CELLS = [(n, m, v) for n in SERVED for v in VERIFIERS for m in METHODS]


@pytest.mark.parametrize("name, method, verifier", CELLS, ids=[f"{n}-{m}-{v}".replace(" ", "_") for n, m, v in CELLS])
def test_cell(name, method, verifier):
    refusal = expected(name, verifier)
    if refusal is not None:
        with pytest.raises(UnsupportedModelError, match=re.escape(refusal)):
            run_cell(name, method, verifier)
        return
    outs, branching = run_cell(name, method, verifier)
    if method == "sampling":  # the target drafting for itself: p == q at every node, so every draft is accepted
        for out in outs:
            assert out.stats.accepted == out.stats.drafted and sum(out.stats.drafted) > 0
        return
    for i, out in enumerate(outs):
        assert_greedy_equal(out, reference(name, i), f"prompt {i}")
    if method == "self-draft":
        assert all(o.stats.accepted == o.stats.drafted for o in outs)
    if method in ("ngram", "draft tree"):
        assert branching >= 2, "no tree branched"


def test_prompts_cross_every_window():
    assert all(p.shape[1] > WINDOW + 8 for p in PROMPTS)
    for name in ("mistral", "qwen2-sliding", "gemma2", "gemma3"):
        spec = families.attention_spec(tiny_family(name).config)
        assert spec.sliding and max(w or 0 for w in spec.windows) == WINDOW


def test_the_window_and_softcap_change_the_outputs():
    """Cells on sliding/softcapped families are not vacuous: without the window (or the softcap) the model's
    greedy output differs."""
    for name, change in [("mistral", {"sliding_window": None}), ("gemma2", {"attn_logit_softcapping": None})]:
        model = tiny_family(name)
        other = type(model)(type(model.config)(**{**SERVED[name][1], **change}))
        other.config._attn_implementation = model.config._attn_implementation
        other.load_state_dict(model.state_dict())
        other = other.to(model.dtype).eval()
        assert greedy_ref(other, PROMPTS[0], MAX_NEW, eos_token_id=None).tokens != reference(name, 0).tokens, name


# ------------------------------------------------------------------------------------------ refused up front

def _mamba():
    return tf.MambaForCausalLM(tf.MambaConfig(vocab_size=96, hidden_size=16, num_hidden_layers=1, state_size=4))


def _t5():
    return tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=96, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                                     d_kv=8))


def _bert():
    return tf.BertModel(tf.BertConfig(vocab_size=96, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32))


def _gpt2_no_head():
    return tf.GPT2Model(tf.GPT2Config(vocab_size=96, n_embd=16, n_layer=1, n_head=2))


REFUSED = {  # what a user might pass -> the words the error must contain
    "mamba": (_mamba, "recurrent state"),
    "t5": (_t5, "encoder-decoder"),
    "bert": (_bert, "no LM head"),
    "gpt2-model": (_gpt2_no_head, "no LM head"),
}


@pytest.mark.parametrize("kind", list(REFUSED))
@pytest.mark.parametrize("verifier", VERIFIERS)
def test_refused_up_front(kind, verifier):
    build, words = REFUSED[kind]
    with pytest.raises(UnsupportedModelError, match=words) as e:
        specdec.SpecDecoder(build().eval(), TOK, drafter="none", verifier=verifier)
    assert "decoder-only" in str(e.value)  # says what is supported


def test_refused_as_a_draft_model():
    with pytest.raises(UnsupportedModelError, match="draft model"):
        DraftModelDrafter(tiny_family("llama"), TOK, model=_t5())


def test_unknown_layer_kinds_and_unplaceable_windows_are_refused():
    cfg = tf.Qwen2Config(**{**SERVED["qwen2"][1], "layer_types": ["full_attention", "linear_attention"]})
    with pytest.raises(UnsupportedModelError, match="linear_attention"):
        families.attention_spec(cfg)
    cfg = tf.LlamaConfig(**SERVED["llama"][1])
    cfg.sliding_window = 8  # a window on a family not declared to slide on every layer: which layers?
    with pytest.raises(UnsupportedModelError, match="which layers"):
        families.attention_spec(cfg)


def test_undeclared_families_are_refused_until_declared():
    model = tiny_family("llama")
    model.config.model_type = "my_llama_fork"
    try:
        with pytest.raises(UnsupportedModelError, match="not in specdec's support matrix.*register_family"):
            specdec.SpecDecoder(model, TOK, drafter="none")
        families.register_family("my_llama_fork")
        out = specdec.SpecDecoder(model, TOK, drafter="ngram").generate(PROMPTS[0], max_new_tokens=8,
                                                                        eos_token_id=None)
        # without EOS, 8 new tokens are the first 8 of the longer reference, ended by length
        assert_greedy_equal(out, GreedyRef(reference("llama", 0).tokens[:8], "length"))
        with pytest.raises(UnsupportedModelError, match="declared for the hf verifier only"):
            specdec.SpecDecoder(model, TOK, drafter="none", verifier="paged")
    finally:
        model.config.model_type = "llama"
        families.FAMILIES.pop("my_llama_fork", None)


def test_falcon_keeps_its_code_path():
    """Falcon compares its attention implementation's name with "sdpa": our forwards must not rename it."""
    from specdec.models.gqa_attention import gqa_attention_on

    model = tiny_family("falcon")
    with gqa_attention_on(model):
        assert model.config._attn_implementation == "sdpa"
    with gqa_attention_on(tiny_family("llama")):
        assert tiny_family("llama").config._attn_implementation != "sdpa"  # the families declared safe switch


# ------------------------------------------------------------------------------------------ sampling: chi-square

@pytest.mark.parametrize("name", ["qwen2-sliding", "gemma2"])
@pytest.mark.parametrize("verifier", VERIFIERS)
def test_sampling_keeps_the_distribution(name, verifier):
    """The first two sampled tokens after a prompt longer than the window (V = 8, window 4) follow the target's
    exact joint distribution (tests/test_sampling_e2e.py's method), through a width-2 draft-model tree."""
    from tests.test_rejection import assert_matches
    from tests.test_sampling_e2e import exact_joint, first_two_counts, params

    v, n = 8, 1200
    model = tiny_family(name, vocab_size=v, window=4)
    prompt = random_prompt(10, 12, vocab_size=v)
    draft = tiny_llama(1234, vocab_size=v, init=0.1, layers=1)
    dec = specdec.SpecDecoder(model, None, drafter=DraftModelDrafter(model, None, model=draft, depth=2, width=2),
                              verifier=verifier)
    counts, _, accepted = first_two_counts(dec, prompt, v, n, seed0=90_000)
    assert sum(accepted) > n // 10
    assert_matches(counts, exact_joint(model, prompt, params(False)), f"{name}/{verifier}")


# -------------------------------------------------------------------------------- docs/support-matrix.md's matrix

def cell_text(name: str, method: str, verifier: str) -> str:
    return "lossless" if expected(name, verifier) is None else "refused"


def render_matrix() -> str:
    """The matrix of ``docs/support-matrix.md``: one row per tested family, one column per (method, verifier)."""
    head = "| family (model_type) | " + " | ".join(f"{m}, {'paged batch' if v == 'paged' else v}"
                                                 for v in VERIFIERS for m in METHODS) + " |"
    lines = [head, "|" + "---|" * (1 + len(VERIFIERS) * len(METHODS))]
    for name in SERVED:
        spec = families.attention_spec(tiny_family(name).config)
        notes = [w for w in (f"window {WINDOW}" if spec.sliding else "", "softcap" if spec.softcap else "") if w]
        label = f"{name} (`{family_type(name)}`{', ' + ', '.join(notes) if notes else ''})"
        cells = ["✅" if cell_text(name, m, v) == "lossless" else "refused" for v in VERIFIERS for m in METHODS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    refusals = sorted({(family_type(n), expected(n, "paged")) for n in SERVED if expected(n, "paged")})
    lines += [""] + [f"- `{t}`{' (paged)' if families.FAMILIES[t].refusal is None else ''}: refused: it {why}."
                     for t, why in refusals]
    lines += [f"- refused up front by both verifiers: {', '.join(f'{k} ({w})' for k, (_, w) in REFUSED.items())}."]
    return "\n".join(lines)


def test_support_matrix_doc_is_current():
    text = MATRIX_DOC.read_text()
    start, end = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"
    assert start in text and end in text, f"{MATRIX_DOC} lost its support-matrix markers"
    block = f"{start}\n{render_matrix()}\n{end}"
    current = text[text.index(start):text.index(end) + len(end)]
    if os.environ.get("SPECDEC_UPDATE_MATRIX") == "1":
        MATRIX_DOC.write_text(text.replace(current, block))
        return
    assert current == block, "docs/support-matrix.md's matrix is stale: run SPECDEC_UPDATE_MATRIX=1 pytest " \
                             "tests/test_families.py -k matrix_doc"
