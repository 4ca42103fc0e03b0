"""First check on a CUDA machine: speculative decoding on a GPU target equals plain greedy decoding.

A tiny seeded random Llama (no hub access) goes to ``--device`` (default cuda) in ``--dtype`` (default float32);
each drafter's greedy output through ``SpecDecoder`` must equal ``model.generate(do_sample=False)`` token for token,
and a seeded sampled run must run and repeat itself. Untrained EAGLE / Medusa heads are built on the CPU, as a
checkpoint loads, so the drafters must move them. Prints ``OK <drafter>`` per drafter; exits 1 on any mismatch or
exception. Run: ``python scripts/gpu_check.py`` (``--device cpu`` runs it anywhere; ``--dtype float64`` tells
rounding-order argmax flips from real bugs).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: specdec, drafters

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from drafters.draft_model import DraftModelDrafter
from drafters.eagle import EagleDrafter, EagleHead
from drafters.hybrid import HybridDrafter
from drafters.layerskip import LayerSkipDrafter
from drafters.medusa import MedusaDrafter, MedusaHeads
from drafters.ngram import NGramDrafter
from drafters.none import NoDrafter
from specdec.generate import SpecDecoder

VOCAB = 96
TREE = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]


def tiny_llama(seed: int, dtype: torch.dtype, device: str, layers: int = 2) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
                      eos_token_id=2, pad_token_id=2, initializer_range=0.1, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = 2
    return model


def eagle(target, dynamic: bool):
    d2t = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(3))[:48]  # a reduced draft vocabulary
    head = EagleHead.for_target(target, d2t)  # on the CPU, in float32: the drafter moves it
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(7))
    return EagleDrafter(target, head=head, choices=None if dynamic else TREE, dynamic=dynamic, top_k=3,
                        depth=4 if dynamic else None)


def medusa(target, dynamic: bool):
    heads = MedusaHeads.for_target(target, 3, 1, torch.arange(VOCAB))  # on the CPU: the drafter moves them
    heads.init_from_target(target)
    with torch.no_grad():
        for block in heads.blocks:
            block[0].linear.weight.normal_(0, 1, generator=torch.Generator().manual_seed(7))
    return MedusaDrafter(target, heads=heads, choices=None if dynamic else TREE, dynamic=dynamic, top_k=3)


def hybrid(target):
    h = HybridDrafter(target, drafters=[{"name": "ngram", "min_ngram": 1}, "none"])
    h.parts[1], h.needs_hidden_states = eagle(target, dynamic=True), True  # no EAGLE checkpoint for a tiny target
    return h


DRAFTERS = {  # name (+paged: through the paged verifier) -> drafter factory
    "none": lambda t: NoDrafter(t),
    "ngram": lambda t: NGramDrafter(t, min_ngram=1),
    "eagle-tree": lambda t: eagle(t, dynamic=False),
    "eagle-dynamic": lambda t: eagle(t, dynamic=True),
    "medusa-tree": lambda t: medusa(t, dynamic=False),
    "medusa-dynamic": lambda t: medusa(t, dynamic=True),
    "draft_model": lambda t: DraftModelDrafter(t, model=tiny_llama(1234, torch.float32, "cpu", layers=1),
                                               depth=3, width=2),
    "layerskip": lambda t: LayerSkipDrafter(t, skip_attention=[1], depth=3, width=2),
    "hybrid": hybrid,
    "eagle-dynamic+paged": lambda t: eagle(t, dynamic=True),
    "ngram+paged": lambda t: NGramDrafter(t, min_ngram=1),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    ap.add_argument("--tokens", type=int, default=40)
    args = ap.parse_args()
    target = tiny_llama(0, getattr(torch, args.dtype), args.device)
    print(f"target on {target.device} in {target.dtype}; torch {torch.__version__}", flush=True)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g) for n in (6, 17)]
    prompts.append(prompts[1][:6].repeat(4))  # repeats: n-gram matches
    prompts = [p[None].to(args.device) for p in prompts]
    refs = [target.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=args.tokens,
                            do_sample=False)[0, p.shape[1]:].tolist() for p in prompts]
    failed = []
    for name, build in DRAFTERS.items():
        try:
            decoder = SpecDecoder(target, None, drafter=build(target), max_nodes=8,
                                  verifier="paged" if name.endswith("+paged") else "hf")
            for p, ref in zip(prompts, refs):
                out = decoder.generate(p, max_new_tokens=args.tokens)
                assert out.sequences.device == target.device, f"output on {out.sequences.device}"
                assert out.new_tokens == ref, f"greedy mismatch:\n  spec {out.new_tokens}\n  ref  {ref}"
                runs = [decoder.generate(p, max_new_tokens=args.tokens, do_sample=True, temperature=0.8, top_k=20,
                                         seed=5).new_tokens for _ in range(2)]
                assert runs[0] == runs[1], f"seeded sampling did not repeat: {runs}"
            print(f"OK {name} (tau {out.stats.tau:.2f})", flush=True)
        except Exception:  # noqa: BLE001 - report every drafter, then fail
            failed.append(name)
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
    print("all OK" if not failed else f"FAILED: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
