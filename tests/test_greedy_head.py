"""The screened greedy head: exactly ``argmax(h @ W.T)``, near-ties and ties included; where the verifier uses it."""

from __future__ import annotations

import pytest
import torch

from specdec import registry
from specdec.algorithms import acceptance
from specdec.algorithms import tree as tree_ops
from specdec.algorithms.sampling import SamplingParams
from specdec import profiler
from specdec.kernels import greedy_head
from specdec.kernels.greedy_head import ScreenedArgmax, available, screenable
from tests.conftest import get_tiny
from tests.equality import assert_all_greedy_equal

needs_kernel = pytest.mark.skipif(not available(), reason="oneDNN bfloat16 matmul not available on this CPU")


def reference(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (h.double() @ w.double().T).argmax(-1)


@needs_kernel
@pytest.mark.parametrize("vocab,hidden", [(7, 16), (5000, 64), (20000, 576)])
def test_equals_argmax_on_random_logits(vocab, hidden):
    g = torch.Generator().manual_seed(vocab)
    w = torch.randn(vocab, hidden, generator=g) * 0.1
    h = torch.randn(3, 5, hidden, generator=g) * 3
    got = ScreenedArgmax(w)(h)
    assert got.shape == (3, 5) and got.dtype == torch.long
    assert torch.equal(got, reference(h, w))


@needs_kernel
def test_near_ties_below_bfloat16_resolution_are_decided_in_float32():
    """Rows whose logits differ by far less than bfloat16 can resolve (but far more than float32 error): the screen
    keeps both and the float32 check picks the larger, whichever index it has."""
    g = torch.Generator().manual_seed(0)
    hidden, vocab = 64, 3000
    w = torch.randn(vocab, hidden, generator=g) * 0.05
    h = torch.randn(8, hidden, generator=g)
    for r in range(8):
        best, rival = 100 + 7 * r, 2000 - 9 * r
        unit = h[r] / h[r].norm()
        w[best] = unit * 2.0  # the winner: logit 2 ||h||
        w[rival] = unit * 2.0 - unit * (1e-4 if r % 2 else -1e-4)  # 1e-4 below (odd r) or above (even r)
    got = ScreenedArgmax(w)(h)
    want = reference(h, w)
    assert torch.equal(got, want)
    assert [int(want[r]) == 100 + 7 * r for r in range(8)] == [r % 2 == 1 for r in range(8)]


@needs_kernel
def test_exact_ties_take_the_lowest_id_like_torch_argmax():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(500, 32, generator=g)
    w[400] = w[37]
    w[450] = w[37]
    h = w[37:38] * 10  # aligned with row 37 (and its copies): they win, equal
    assert int(ScreenedArgmax(w)(h)[0]) == 37 == int((h @ w.T).argmax(-1)[0])


@needs_kernel
def test_non_finite_hidden_states_fall_back_to_the_plain_product():
    w = torch.randn(50, 8)
    h = torch.randn(2, 8)
    h[1, 3] = float("nan")
    got = ScreenedArgmax(w)(h)
    assert torch.equal(got, (h @ w.T).argmax(-1))


@needs_kernel
def test_a_changed_weight_is_screened_afresh():
    w = torch.randn(300, 16)
    h = torch.randn(4, 16)
    head = ScreenedArgmax(w)
    assert torch.equal(head(h), reference(h, w))
    with torch.no_grad():
        w.mul_(-1)  # every argmax moves
    assert torch.equal(head(h), reference(h, w))


def test_screenable_only_float32_llama_like_targets():
    assert not screenable(get_tiny(0))  # float64: its logits are already exact, nothing to screen
    if available():
        assert screenable(get_tiny(0, torch.float32))


def test_is_argmax_only_for_rules_that_read_the_argmax():
    assert acceptance.is_argmax(acceptance.greedy, None)
    assert acceptance.is_argmax(acceptance.rejection, SamplingParams())
    assert not acceptance.is_argmax(acceptance.rejection, SamplingParams(do_sample=True))
    assert not acceptance.is_argmax(acceptance.typical, SamplingParams())


@needs_kernel
def test_hf_verifier_returns_the_logits_argmax_for_greedy_steps():
    target = get_tiny(2, torch.float32)
    prompt = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(5))
    tree = tree_ops.from_sequences(int(prompt[0, -1]), [[5, 6, 7], [5, 9], [11]], max_nodes=7)
    outs = {}
    for screen in (True, False):
        v = registry.build_verifier("hf", target, screen_greedy=screen)
        assert (v.greedy_head is not None) == screen
        v.start(0, prompt[:, :-1])
        outs[screen] = v.score([0], [tree], output_hidden=True, greedy=True)
    assert outs[True].logits is None and outs[False].greedy is None
    assert torch.equal(outs[True].greedy, outs[False].logits.argmax(-1))
    assert torch.allclose(outs[True].hidden, outs[False].hidden)


@needs_kernel
def test_paged_verifier_returns_the_logits_argmax_for_greedy_batches():
    """A batch of trees of different sizes (dead nodes padded in): the screened greedy tokens equal the logits'
    argmax at every live node, hidden states alike; and a batched greedy generate is unchanged by the screen."""
    import specdec
    from tests.tiny import tiny_tokenizer

    target = get_tiny(2, torch.float32)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 96, (1, n), generator=g) for n in (9, 14, 5)]
    trees = [tree_ops.from_sequences(int(p[0, -1]), seqs, max_nodes=7)
             for p, seqs in zip(prompts, ([[5, 6, 7], [5, 9], [11]], [[4]], [[8, 8, 8, 8]]))]
    outs = {}
    for screen in (True, False):
        v = registry.build_verifier("paged", target, num_blocks=32, block_size=4, screen_greedy=screen)
        assert (v.greedy_head is not None) == screen
        for i, p in enumerate(prompts):
            v.start(i, p[:, :-1])
        outs[screen] = v.score([0, 1, 2], trees, output_hidden=True, greedy=True)
    assert outs[True].logits is None and outs[False].greedy is None
    for i, t in enumerate(trees):
        n = t.num_nodes
        assert torch.equal(outs[True].greedy[i, :n], outs[False].logits[i, :n].argmax(-1))
        torch.testing.assert_close(outs[True].hidden[i, :n], outs[False].hidden[i, :n])
    runs = [specdec.SpecDecoder(target, tiny_tokenizer(), drafter="ngram", verifier="paged",
                                verifier_kwargs={"num_blocks": 64, "block_size": 4, "screen_greedy": s})
            .generate([p for p in prompts], max_new_tokens=10) for s in (True, False)]
    assert_all_greedy_equal(runs[0], runs[1], "screened vs full head")


def test_profiles_are_keyed_by_the_greedy_head():
    target = get_tiny(0, torch.float32)
    on = profiler.profile_key(target)
    off = profiler.profile_key(target, cost_key=registry.build_verifier("hf", target, screen_greedy=False).cost_key())
    assert off["lm_head"] == "logits"
    assert on["lm_head"] == (greedy_head.kind() if available() else "logits")


@needs_kernel
@pytest.mark.parametrize("panels", [True, False])
def test_both_screens_are_exact(panels, monkeypatch):
    """The skinny kernel's bfloat16 panels (AVX-512 BF16) and oneDNN's packed bfloat16 screen the same way."""
    from specdec.kernels import skinny_gemm

    if panels and not skinny_gemm.bf16_available():
        pytest.skip("no AVX-512 BF16 here")
    monkeypatch.setattr(skinny_gemm, "bf16_available", lambda: panels)
    g = torch.Generator().manual_seed(11)
    w = torch.randn(3000, 64, generator=g) * 0.1
    w[7] = w[8] + 1e-6  # a near-tie below bfloat16's resolution
    h = torch.randn(9, 64, generator=g)
    h[0] = w[8] * 40
    screen = ScreenedArgmax(w)
    assert torch.equal(screen(h), reference(h, w))
    assert (screen._panels is not None) == panels


@needs_kernel
@pytest.mark.parametrize("rows", [1, 8, 37])
def test_cpp_screen_keeps_the_torch_screens_candidates(rows, monkeypatch):
    """The one-pass C++ screen (specdec.kernels.screen_cpp) keeps the same (row, token) pairs as the torch ops, on rows
    whose floor is above and below ``scale * max ||W_i||`` (both slack cases), and the argmax is the same either way."""
    from specdec.kernels import screen_cpp

    if not screen_cpp.available():
        pytest.skip(f"C++ screen not built: {screen_cpp._KERNEL.failure()}")
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(4099, 64, generator=g) * 0.1  # not a multiple of 16: the scalar tail runs too
    w[4097] = w[3] + 1e-6  # a near-tie in the tail
    h = torch.randn(rows, 64, generator=g) * torch.linspace(0.01, 30, rows)[:, None]
    h[0] = w[3] * 50
    screen = ScreenedArgmax(w)
    want = reference(h, w)
    assert torch.equal(screen(h), want)
    c, u = screen.bound_factors()
    a = (h.to(torch.bfloat16) @ w.to(torch.bfloat16).T).contiguous()
    scale = c * h.norm(dim=1, keepdim=True)
    got = screen_cpp.candidates(a, screen._row_norm, scale[:, 0], screen._max_norm, u)
    ref = screen._screen(a, scale, u)
    assert sorted(zip(*[t.tolist() for t in got])) == sorted(zip(*[t.tolist() for t in ref]))
    assert set(zip(range(rows), want.tolist())) <= set(zip(*[t.tolist() for t in got]))
    monkeypatch.setattr(screen_cpp, "available", lambda: False)
    assert torch.equal(screen(h), want)
