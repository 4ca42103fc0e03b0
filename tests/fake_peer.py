"""A stand-in for ``scripts/peer_vllm.py --serve`` (tests only): the same line protocol, answered by transformers'
greedy ``generate`` on the target, with made-up speculation counts for ``vllm:*`` methods."""

from __future__ import annotations

import argparse
import json
import sys
import time

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from peer_vllm import build_order, split_methods  # noqa: E402  (the real server's method list and build order)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", action="store_true")
    parser.add_argument("--target")
    parser.add_argument("--dtype")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--methods")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(args.target, dtype=getattr(torch, args.dtype)).eval()
    print("some library chatter on stdout")
    methods = split_methods(args.methods)
    counted = build_order(methods)[-1]  # as in vLLM: only the engine built last reports speculation counts
    print(json.dumps({"ready": True, "methods": methods, "max_model_len": args.max_model_len}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("quit"):
            break
        assert req["method"] in methods
        ids = torch.tensor([req["ids"]])
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=req["max_new_tokens"],
                             do_sample=False, eos_token_id=model.generation_config.eos_token_id)
        tokens = out[0, ids.shape[1]:].tolist()
        speculative = req["method"] != "vllm"
        accepted, drafted = (len(tokens) // 2, 2 * len(tokens)) if speculative else (0, 0)
        if req["method"] != counted:
            accepted = drafted = None
        print(json.dumps({"tokens": tokens, "accepted": accepted, "drafted": drafted,
                          "time_s": time.perf_counter() - start}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
