"""The fast CPU linear kernel (specdec.kernels.cpu_gemm): same products as F.linear, contiguous outputs, packed weights
re-made when a weight changes, and patched only inside the context."""

from __future__ import annotations

import functools
import gc

import pytest
import torch
import torch.nn.functional as F

from specdec.kernels import cpu_gemm
from tests.conftest import _hybrid, _medusa
from tests.tiny import tiny_llama, tiny_tokenizer

ROUTES = ["onednn", "wxt"] if cpu_gemm.onednn_available() else ["wxt"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("rows", [1, 2, 3, 16, 33, 70])
@pytest.mark.parametrize("bias", [False, True])
def test_route_equals_linear_and_is_contiguous(route, rows, bias):
    g = torch.Generator().manual_seed(rows)
    layer = torch.nn.Linear(24, 40, bias=bias)
    x = torch.randn(1, rows, 24, generator=g)
    with torch.inference_mode(), cpu_gemm.fast_linears(layer, route=route):
        y = layer(x)
        y_t = layer(torch.randn(24, rows, generator=g).T)  # a transposed (non-contiguous) input
    assert y.shape == (1, rows, 40) and y_t.shape == (rows, 40)
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    # a transposed (W @ x.T).T would reach attention with a last-dim stride != 1 and send SDPA to its math kernel
    assert y.is_contiguous()


@pytest.mark.parametrize("route", ROUTES)
def test_other_dtypes_gradients_and_empty_inputs_take_f_linear(route):
    layer = torch.nn.Linear(8, 4).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    with cpu_gemm.fast_linears(layer, route=route):
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        assert layer(torch.zeros(0, 8, dtype=torch.float64)).shape == (0, 4)
    layer = torch.nn.Linear(8, 4)
    with cpu_gemm.fast_linears(layer, route=route):
        y = layer(torch.randn(3, 8))  # gradients on: trainable as usual
        y.sum().backward()
    assert layer.weight.grad is not None


@pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="this torch build has no oneDNN")
@pytest.mark.parametrize("route", ["skinny", "onednn"])
def test_packed_weights_are_remade_when_a_weight_changes_and_freed_with_the_module(route):
    from specdec.kernels import skinny_gemm

    if route == "skinny" and not skinny_gemm.available():
        pytest.skip(f"no skinny kernel: {skinny_gemm.failure()}")
    cache = cpu_gemm._panel_packs if route == "skinny" else cpu_gemm._packs
    layer = torch.nn.Linear(16, 8, bias=False)
    # a few rows take the skinny kernel's panels; more rows than it takes, the packed oneDNN route
    x = torch.randn(3 if route == "skinny" else skinny_gemm.MAX_ROWS + 1, 16)
    with torch.inference_mode(), cpu_gemm.fast_linears(layer):
        first = layer(x)
    with torch.no_grad():
        layer.weight.mul_(2)  # e.g. an optimizer step between two validation runs
    with torch.inference_mode(), cpu_gemm.fast_linears(layer):
        torch.testing.assert_close(layer(x), 2 * first)
    assert layer in cache
    del layer
    gc.collect()
    assert len([m for m in cache if m.in_features == 16 and m.out_features == 8]) == 0


def test_modules_made_under_inference_mode_take_the_kernel():
    """A drafter built for a request that joins a running batch is made under inference mode: its weights are
    inference tensors, which have no version counter."""
    with torch.inference_mode():
        layer = torch.nn.Linear(16, 8)
        x = torch.randn(2, 16)
        with cpu_gemm.fast_linears(layer):
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        model = tiny_llama(3, dtype=torch.float32)  # sibling projections (q/k/v, gate/up) too
        ids = torch.tensor([[5, 6, 7, 8]])
        want = model(ids).logits
        with cpu_gemm.fast_linears(model):
            torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)


def test_kernel_names_the_route(monkeypatch):
    from specdec.kernels import cpu_decoder_layer, cpu_layers, skinny_gemm

    assert cpu_gemm.kernel(tiny_llama(0, dtype=torch.float64)) == "off"
    onednn = "onednn+siblings" + (f"+panels{skinny_gemm.MAX_ROWS}" if skinny_gemm.available() else "") + (
        "+layers" if cpu_layers.available() else "") + (
        "+decoder" if cpu_layers.available() and cpu_decoder_layer.available() else "")
    assert cpu_gemm.kernel(tiny_llama(0, dtype=torch.float32)) == (onednn if cpu_gemm.onednn_available() else "wxt")
    for kernel in (skinny_gemm._KERNEL, cpu_layers._KERNEL):
        monkeypatch.setattr(kernel, "_failed", "no compiler (simulated)")
    assert cpu_gemm.kernel(tiny_llama(0, dtype=torch.float32)) == ("onednn+siblings" if cpu_gemm.onednn_available()
                                                                    else "wxt")


def test_context_patches_target_and_drafter_linears_only_inside():
    target = tiny_llama(0, dtype=torch.float32)
    drafter = _medusa(target, tiny_tokenizer())
    modules = drafter.modules()
    assert modules and all(isinstance(m, torch.nn.Module) for m in modules)
    linears = cpu_gemm._linears([target, *modules])
    assert any(id(m) not in {id(t) for t in target.modules()} for m in linears)  # the heads' own layers
    with torch.inference_mode(), cpu_gemm.fast_linears(target, *modules):
        assert all("forward" in m.__dict__ for m in linears)
        x = torch.randn(1, 3, target.config.hidden_size)
        torch.testing.assert_close(target.lm_head(x), F.linear(x, target.lm_head.weight), rtol=1e-5, atol=1e-5)
    assert not any("forward" in m.__dict__ for m in linears)
    with cpu_gemm.fast_linears(target, enabled=False):
        assert not any("forward" in m.__dict__ for m in linears)


def test_hybrid_drafter_modules_include_its_parts():
    target = tiny_llama(0, dtype=torch.float32)
    tok = tiny_tokenizer()
    hybrid = _hybrid(target, tok)
    assert any(m is hybrid.parts[1].head for m in hybrid.modules())  # the EAGLE part's head
    assert hybrid.parts[0].modules() == []  # n-gram: no modules


def test_batched_generation_gives_every_pooled_drafter_the_kernel(monkeypatch):
    """Batched requests past the first get drafters built during the run: their linears take the kernel too, and
    are restored afterwards."""
    from specdec import registry
    from specdec.generate import SpecDecoder

    target, tok = tiny_llama(0, dtype=torch.float32), tiny_tokenizer()
    built, saw = [], []

    def build(name, target_, tokenizer=None, **kwargs):
        d = _medusa(target_, tok)
        propose = d.propose

        def watched(ctx):
            saw.append(all("forward" in m.__dict__ for m in cpu_gemm._linears(d.modules())))
            return propose(ctx)

        d.propose = watched
        built.append(d)
        return d

    monkeypatch.setattr(registry, "build_drafter", build)
    dec = SpecDecoder(target, tok, drafter="medusa", verifier="paged", max_batch_size=3)
    dec.generate_batch([[5, 6, 7], [8, 9], [10, 11, 12, 13]], max_new_tokens=4, eos_token_id=None)
    assert len(built) == 3 and saw and all(saw)
    assert not any("forward" in m.__dict__ for d in built
                   for m in cpu_gemm._linears(d.modules()))


# ---------------------------------------------------------------- sibling projections as one product

needs_onednn = pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="this torch build has no oneDNN")


class Projections(torch.nn.Module):
    """q/k/v and gate/up as in a Llama layer (k has a bias, the others none: the fused bias pads with zeros)."""

    def __init__(self, h=24):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(h, o, bias=b) for o, b in ((h, False), (8, True),
                                                                                           (8, False)))
        self.gate_proj, self.up_proj = torch.nn.Linear(h, 40, bias=False), torch.nn.Linear(h, 40, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))


@needs_onednn
@pytest.mark.parametrize("order", [("q_proj", "k_proj", "v_proj"), ("v_proj", "q_proj", "k_proj"), ("k_proj",),
                                   ("q_proj", "q_proj", "k_proj", "v_proj", "v_proj")])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_siblings_equal_each_linear_in_any_call_order(order, rows):
    m = Projections()
    assert [[type(x) for x in g] for g in cpu_gemm.sibling_groups([m])] == [[torch.nn.Linear] * 3, [torch.nn.Linear] * 2]
    x, y = torch.randn(2, rows, 24), torch.randn(2, rows, 24)
    with torch.inference_mode(), cpu_gemm.fast_linears(m):
        assert isinstance(m.q_proj.forward, functools.partial)
        for name in order:
            lin = getattr(m, name)
            for inp in (x, y, x):  # another input in between: computed afresh, never a stale sibling's output
                torch.testing.assert_close(lin(inp), F.linear(inp, lin.weight, lin.bias), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(m.gate_proj(x) * m.up_proj(x), F.linear(x, m.gate_proj.weight)
                                   * F.linear(x, m.up_proj.weight), rtol=1e-5, atol=1e-3)
    assert not any("forward" in lin.__dict__ for lin in m.modules())


@needs_onednn
def test_siblings_follow_weight_updates_and_can_be_turned_off():
    m = Projections()
    x = torch.randn(3, 24)
    with torch.inference_mode(), cpu_gemm.fast_linears(m):
        m.q_proj(x)
    with torch.no_grad():
        m.k_proj.weight.mul_(2)
    with torch.inference_mode(), cpu_gemm.fast_linears(m):
        m.q_proj(x)
        torch.testing.assert_close(m.k_proj(x), F.linear(x, m.k_proj.weight, m.k_proj.bias), rtol=1e-5, atol=1e-4)
    with torch.inference_mode(), cpu_gemm.fast_linears(m, fuse=False):
        assert isinstance(m.q_proj.forward, cpu_gemm._Single)  # each projection on its own
    x.requires_grad_(True)  # gradients: F.linear
    with cpu_gemm.fast_linears(m):
        m.q_proj(x).sum().backward()
    assert x.grad is not None


def test_sibling_groups_in_a_llama_target():
    target = tiny_llama(0, dtype=torch.float32)
    groups = cpu_gemm.sibling_groups([target])
    assert len(groups) == 2 * target.config.num_hidden_layers
    assert cpu_gemm.sibling_groups([tiny_llama(0, dtype=torch.float64)]) == []  # float32 only
