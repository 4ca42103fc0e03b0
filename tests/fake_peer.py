"""A stand-in for ``scripts/peer_vllm.py --serve`` (tests only): the same line protocol, answered by transformers'
greedy ``generate`` on the target, with made-up speculation counts for ``vllm:*`` methods."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM


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
    print(json.dumps({"ready": True, "methods": args.methods.split(","), "max_model_len": args.max_model_len}),
          flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("quit"):
            break
        assert req["method"] in args.methods.split(",")
        ids = torch.tensor([req["ids"]])
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=req["max_new_tokens"],
                             do_sample=False, eos_token_id=model.generation_config.eos_token_id)
        tokens = out[0, ids.shape[1]:].tolist()
        speculative = req["method"] != "vllm"
        print(json.dumps({"tokens": tokens, "accepted": len(tokens) // 2 if speculative else 0,
                          "drafted": 2 * len(tokens) if speculative else 0, "time_s": time.perf_counter() - start}),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
