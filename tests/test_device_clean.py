"""The decoding path keeps every tensor on the target's device (checked on a CPU, for a target on a GPU).

Two probes stand in for a CUDA device:

* ``with torch.device("meta")`` makes **meta** the default device of every factory call (``torch.tensor``,
  ``arange``, ``zeros``, ``rand``, ...) that names none. The target, its inputs and the drafters stay on the CPU,
  so a decode gives the same tokens only if every tensor that meets the model (or is read back with ``tolist``)
  was made with an explicit ``device=``; one made on the default device is a meta tensor, which has no data and
  fails there. On a GPU the same tensor would land on the CPU: a device mismatch.
* a target moved to the meta device: every drafter built for it must hold its own modules, buffers and index
  tensors there (checkpoint heads load on the CPU and must follow the target), the decoder's sampling generator
  must be asked for there, and the CPU-only kernels (:mod:`specdec.kernels.cpu_gemm`, :mod:`specdec.kernels.greedy_head`) must
  switch themselves off.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from specdec import inputs
from specdec.algorithms.cost import CostProfile
from specdec.generate import SpecDecoder
from specdec.kernels import cpu_gemm, greedy_head
from specdec.protocols import Drafter
from tests.conftest import get_tiny
from tests.tiny import random_prompt, tiny_llama

META = torch.device("meta")


def _decode(target, tokenizer, drafter, ids, *, sample: bool, meta: bool, **decoder_kwargs) -> list[int]:
    """New tokens of one request; the CPU-only kernels off, as they are for a target on a GPU."""
    decoder = SpecDecoder(target, tokenizer, drafter=drafter, fast_linears=False, max_nodes=8,
                          verifier_kwargs={"screen_greedy": False} if decoder_kwargs.get("verifier", "hf") == "hf"
                          else None, **decoder_kwargs)
    kwargs = {"max_new_tokens": 14, "do_sample": sample, "seed": 3 if sample else None,
              "temperature": 1.5 if sample else None}
    if not meta:
        return decoder.generate(ids, **kwargs).new_tokens
    score, trees = decoder.verifier.score, []

    def checked_score(request_ids, scored, *args, **kw):  # every tensor of every tree verified is on the ids' device
        trees.extend(scored)
        for tree in scored:
            for field in ("tokens", "parents", "draft_probs", "scores"):
                t = getattr(tree, field)
                assert t is None or t.device == ids.device, f"tree.{field} on {t.device}, the ids on {ids.device}"
        return score(request_ids, scored, *args, **kw)

    decoder.verifier.score = checked_score
    with torch.device("meta"):
        out = decoder.generate(ids, **kwargs).new_tokens
    assert trees
    return out


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampling"])
def test_decode_makes_no_tensor_on_the_default_device(drafter_factory, tokenizer, sample):
    target = get_tiny(0)
    ids = random_prompt(5, 20)
    plain = _decode(target, tokenizer, drafter_factory.build(target, tokenizer), ids, sample=sample, meta=False)
    probed = _decode(target, tokenizer, drafter_factory.build(target, tokenizer), ids, sample=sample, meta=True)
    assert probed == plain and len(plain) == 14


@pytest.mark.parametrize("setting", ["paged", "adaptive", "one-token-prompt"])
def test_decode_settings_make_no_tensor_on_the_default_device(tokenizer, setting):
    from tests.conftest import _eagle

    target = get_tiny(0)
    ids = random_prompt(6, 1 if setting == "one-token-prompt" else 18)
    kwargs = {"verifier": "paged"} if setting == "paged" else {}
    if setting == "adaptive":
        kwargs = {"adaptive": True, "cost_profile": CostProfile(key={}, verify_ms={1: 50.0, 4: 55.0, 8: 65.0})}
    for sample in (False, True):
        plain = _decode(target, tokenizer, _eagle(target, tokenizer, vocab=48, dynamic=True), ids, sample=sample,
                        meta=False, **kwargs)
        probed = _decode(target, tokenizer, _eagle(target, tokenizer, vocab=48, dynamic=True), ids, sample=sample,
                         meta=True, **kwargs)
        assert probed == plain


# ---------------------------------------------------------------- a target on another device


@pytest.fixture(scope="module")
def meta_target():
    """The tiny float32 target moved to the meta device (a copy: the shared tiny models are never mutated)."""
    return copy.deepcopy(get_tiny(0, dtype=torch.float32)).to(META)


def drafter_tensors(obj, name: str = "drafter", seen: set[int] | None = None) -> list[tuple[str, torch.Tensor]]:
    """Every tensor a drafter holds: its modules' parameters and buffers, tensor attributes, and those of the parts
    (drafters or modules) in its lists, tuples and dicts, with where each was found."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [(name, obj)]
    if isinstance(obj, torch.nn.Module):
        return [(f"{name}.{n}", t) for n, t in (*obj.named_parameters(), *obj.named_buffers())]
    if isinstance(obj, (list, tuple)):
        return [x for i, v in enumerate(obj) for x in drafter_tensors(v, f"{name}[{i}]", seen)]
    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in drafter_tensors(v, f"{name}[{k!r}]", seen)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # e.g. a drafter's DraftVocab
        return [x for f in dataclasses.fields(obj) for x in drafter_tensors(getattr(obj, f.name), f"{name}.{f.name}",
                                                                               seen)]
    if isinstance(obj, Drafter):
        return [x for k, v in vars(obj).items() for x in drafter_tensors(v, f"{name}.{k}", seen)]
    return []


def _meta_drafters(target_cpu, meta_target, tokenizer) -> dict:
    """Each drafter kind built for ``meta_target`` from pieces made on the CPU, as checkpoints load."""
    from drafters.draft_model import DraftModelDrafter
    from drafters.eagle import EagleDrafter, EagleHead
    from drafters.hybrid import HybridDrafter
    from drafters.layerskip import ExitAdapter, LayerSkipDrafter
    from drafters.medusa import MedusaDrafter, MedusaHeads

    v = target_cpu.config.vocab_size
    d2t = torch.randperm(v, generator=torch.Generator().manual_seed(3))[:48].sort().values
    medusa = MedusaHeads.for_target(target_cpu, 3, 1, d2t)
    medusa.init_from_target(target_cpu)

    def eagle(reduced: bool):
        return EagleDrafter(meta_target, tokenizer, head=EagleHead.for_target(target_cpu, d2t if reduced else
                                                                              torch.arange(v)),
                            choices=[[0], [1], [0, 0]])

    hybrid = HybridDrafter(meta_target, tokenizer, drafters=["ngram", eagle(True)])
    return {
        "eagle": eagle(False),
        "eagle-reduced-vocab": eagle(True),
        "medusa": MedusaDrafter(meta_target, tokenizer, heads=medusa, choices=[[0], [1], [0, 0]]),
        "draft_model": DraftModelDrafter(meta_target, tokenizer, model=tiny_llama(1234, dtype=torch.float32,
                                                                                  layers=1), depth=3),
        "layerskip": LayerSkipDrafter(meta_target, tokenizer, skip_attention=[1], d2t=d2t,
                                      adapter=ExitAdapter(target_cpu.config.hidden_size, 4)),
        "hybrid": hybrid,
    }


def test_drafters_hold_their_tensors_on_the_target_device(meta_target, tokenizer):
    target_cpu = get_tiny(0, dtype=torch.float32)
    for kind, drafter in _meta_drafters(target_cpu, meta_target, tokenizer).items():
        tensors = drafter_tensors(drafter)
        own = [n for n, t in tensors if n.split(".")[1] in ("head", "heads", "model", "adapter", "vocab")
               or ".parts[" in n]
        assert len(own) >= 3, f"{kind}: found too few tensors to check: {own}"
        off = [f"{n} on {t.device}" for n, t in tensors if t.device != META]
        assert not off, f"{kind} keeps tensors off the target's device: {off}"
    # the index buffers that pick the draft vocabulary's rows and ids
    drafters = _meta_drafters(target_cpu, meta_target, tokenizer)
    assert drafters["eagle-reduced-vocab"].vocab.ids.device == META
    assert drafters["eagle"].vocab.ids is None  # the full vocabulary: no id mapping
    assert drafters["medusa"].heads.d2t.device == META
    assert drafters["layerskip"].vocab.ids.device == META


def test_decoder_on_another_device(meta_target, tokenizer, monkeypatch):
    decoder = SpecDecoder(meta_target, tokenizer, drafter="none")
    assert decoder.device == META
    # the CPU-only kernels switch themselves off for a target that is not on the CPU
    assert not cpu_gemm.wanted(meta_target) and decoder.fast_linears is False
    assert not greedy_head.screenable(meta_target) and decoder.verifier.greedy_head is None
    # input ids (given as a list, a CPU tensor or a prompt) go to the target's device
    for ids in ([5, 6, 7], torch.tensor([[5, 6, 7]])):
        assert inputs.request_ids(ids, None, tokenizer=tokenizer, chat=True, device=decoder.device).device == META
    # the sampling generator is made on the target's device (torch draws only with a generator of the tensor's
    # device); torch has no meta generators, so record what is asked for
    asked = []

    class Recorder:
        def __init__(self, device=None):
            asked.append(torch.device(device) if device is not None else torch.device("cpu"))

        def manual_seed(self, seed):
            asked.append(seed)
            return self

    monkeypatch.setattr(torch, "Generator", Recorder)
    assert decoder._generator(None) is None and asked == []
    assert isinstance(decoder._generator(11), Recorder) and asked == [META, 11]


def test_generator_on_the_target_device(tokenizer):
    target = get_tiny(0)
    decoder = SpecDecoder(target, tokenizer, drafter="none")
    g = decoder._generator(0)
    assert g.device == next(target.parameters()).device == decoder.device
    # the same seed draws the same numbers as a plain CPU generator: nothing changes on a CPU
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=torch.Generator().manual_seed(0)))
