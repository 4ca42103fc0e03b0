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
    parser.add_argument("--max-num-seqs", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(args.target, dtype=getattr(torch, args.dtype)).eval()
    print("some library chatter on stdout")
    methods = split_methods(args.methods)
    counted = build_order(methods)[-1]  # as in vLLM: only the engine built last reports speculation counts
    print(json.dumps({"ready": True, "methods": methods, "max_model_len": args.max_model_len,
                      "max_num_seqs": args.max_num_seqs}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("quit"):
            break
        assert req["method"] in methods
        batch = req.get("batch")
        assert batch is None or args.max_num_seqs > 1  # batches go to engines built for them
        start = time.perf_counter()
        outputs = []
        for prompt in batch if batch is not None else [req["ids"]]:  # one at a time: the same greedy tokens
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=req["max_new_tokens"],
                                 do_sample=False, eos_token_id=model.generation_config.eos_token_id)
            outputs.append(out[0, ids.shape[1]:].tolist())
        n = sum(len(t) for t in outputs)
        speculative = req["method"] != "vllm"
        accepted, drafted = (n // 2, 2 * n) if speculative else (0, 0)
        if req["method"] != counted:
            accepted = drafted = None
        reply = {"accepted": accepted, "drafted": drafted, "time_s": time.perf_counter() - start}
        reply.update({"outputs": outputs} if batch is not None else {"tokens": outputs[0]})
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
