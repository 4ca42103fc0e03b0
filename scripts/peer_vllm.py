"""vLLM's CPU engine on exactly the requests of a specdec bench run, checked and reported the same way.

Runs in vLLM's own virtual environment (``bash scripts/vllm_env.sh`` makes ``.venv-vllm``), never in the project's:

    python -m specdec.bench bench.save_tokens=true bench.limit=16 bench.output=bench_results/specdec.json ...
    .venv-vllm/bin/python scripts/peer_vllm.py --from bench_results/specdec.json --output bench_results/vllm.json
    python -m specdec.bench.report bench_results/specdec.json bench_results/vllm.json      # one table

It reads the bench JSON's requests (the very token ids specdec was given, chat template applied), generates greedily
with vLLM (``vllm``: no speculation; ``vllm:ngram``: its n-gram speculation; ``vllm:eagle3=<dir>``: an EAGLE-3 head it
can load), compares every output with the bench's ``hf`` outputs (transformers ``generate``, greedy), and writes the
same JSON fields as the bench, with ``speedup_vs_hf`` against the bench's ``hf`` run (run them back to back, on a quiet
machine). Batch 1: one request at a time, each call timed. Batch B (``--batch-size``): all requests submitted at once,
``max_num_seqs=B`` (continuous batching), the whole run timed.

``--serve`` answers requests one JSON line at a time on stdin/stdout instead, so the bench can run vLLM methods
interleaved with its own, prompt by prompt, in one sitting (``bench.methods=[hf,specdec:none,vllm,vllm:ngram]``;
:mod:`specdec.bench.peer`): it prints ``{"ready": ...}`` once every engine is built, then for each
``{"method", "ids", "max_new_tokens"}`` line one ``{"tokens", "accepted", "drafted", "time_s"}`` line. With
``--max-num-seqs B`` its engines batch: a ``{"method", "batch": [ids, ...], "max_new_tokens"}`` line submits those
requests at once (continuous batching, at most B running) and gets one ``{"outputs": [tokens, ...], "accepted",
"drafted", "time_s"}`` line, so the bench can alternate vLLM's batches with its own (``bench.batch_size=B
bench.rounds=R``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: steadier timings

METHODS = {
    "vllm": None,
    "vllm:ngram": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 3},
}


DRAFT_HEADS = ("vllm:eagle3", "vllm:medusa")  # methods that take a drafter directory: vllm:<method>=<dir>[,<k>]


def engine_model(method: str, target: str) -> str:
    """What vLLM loads as its model: the target, or for ``vllm:speculators=<dir>`` the speculators directory
    (vLLM reads the target and its speculative settings from that directory's config)."""
    return method[len("vllm:speculators="):] if method.startswith("vllm:speculators=") else target


def speculative_config(method: str) -> dict | None:
    """``vllm``, ``vllm:ngram``, ``vllm:ngram<k>`` (k draft tokens), ``vllm:eagle3=<dir>[,<k>]``,
    ``vllm:medusa=<dir>[,<k>]`` or ``vllm:speculators=<dir>`` (none: the directory says)."""
    if method.startswith("vllm:speculators="):
        return None
    if method in METHODS:
        return METHODS[method]
    if method.startswith("vllm:ngram") and method[len("vllm:ngram"):].isdigit():
        return {**METHODS["vllm:ngram"], "num_speculative_tokens": int(method[len("vllm:ngram"):])}
    kind, _, rest = method.partition("=")
    if kind in DRAFT_HEADS:  # a drafter directory (e.g. written by specdec export) in vLLM's speculative_config
        path, _, k = rest.partition(",")
        return {"method": kind.removeprefix("vllm:"), "model": path, "num_speculative_tokens": int(k or 4)}
    raise SystemExit(f"unknown method {method!r}; use vllm, vllm:ngram[<k>], vllm:eagle3=<dir>[,<k>], "
                     "vllm:medusa=<dir>[,<k>] or "
                     "vllm:speculators=<dir>")


def spec_counts(llm, drafts: bool = False) -> tuple[int, ...]:
    """(accepted draft tokens, draft tokens[, drafts]) so far, from the engine's metrics (zeros without
    speculation); vLLM's mean acceptance length is ``1 + accepted / drafts``."""
    counts = {"vllm:spec_decode_num_accepted_tokens": 0, "vllm:spec_decode_num_draft_tokens": 0,
              "vllm:spec_decode_num_drafts": 0}
    for m in llm.get_metrics():
        if m.name in counts:
            counts[m.name] += int(m.value)
    out = tuple(counts.values())
    return out if drafts else out[:2]


def run_method(method: str, bench: dict, batch_size: int, warmup: int) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    requests = bench["requests"]
    llm = LLM(model=engine_model(method, bench["target_path"]), dtype=bench["dtype"], seed=0, max_num_seqs=batch_size,
              max_model_len=max(len(r["input_ids"]) for r in requests) + bench["max_new_tokens"] + 16,
              speculative_config=speculative_config(method), disable_log_stats=False,
              gpu_memory_utilization=0.3, kv_cache_memory_bytes=1 << 30)  # CPU: a fixed KV size, not a RAM share
    params = SamplingParams(temperature=0.0, max_tokens=bench["max_new_tokens"])
    prompts = [TokensPrompt(prompt_token_ids=r["input_ids"]) for r in requests]
    for _ in range(warmup):
        llm.generate(prompts[:min(2, batch_size)], params, use_tqdm=False)
    acc0, drafted0, drafts0 = spec_counts(llm, drafts=True)
    outputs, times = [], []
    if batch_size == 1:
        for p in prompts:
            start = time.perf_counter()
            out = llm.generate([p], params, use_tqdm=False)
            times.append(time.perf_counter() - start)
            outputs.append(list(out[0].outputs[0].token_ids))
    else:
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        share = (time.perf_counter() - start) / len(prompts)
        outputs = [list(o.outputs[0].token_ids) for o in outs]
        times = [share] * len(prompts)
    acc1, drafted1, drafts1 = spec_counts(llm, drafts=True)
    del llm
    return {"outputs": outputs, "times": times, "accepted": acc1 - acc0, "drafted": drafted1 - drafted0,
            "drafts": drafts1 - drafts0}


def summarize(method: str, bench: dict, got: dict, batch_size: int) -> dict:
    ref_run = next(r for r in bench["runs"] if r["method"] == "hf")
    ref = ref_run["outputs"]
    cats = [r["category"] for r in bench["requests"]]
    new = sum(len(o) for o in got["outputs"])
    time_s = sum(got["times"])
    tps = new / time_s
    speculative = method != "vllm"
    steps = new - got["accepted"] if speculative else None  # each step commits its accepted drafts + one token
    run = {"method": method, "batch_size": batch_size, "new_tokens": new, "time_s": time_s, "tokens_per_s": tps,
           "tau": new / steps if speculative and steps else None,
           "acceptance_rate": got["accepted"] / got["drafted"] if speculative and got["drafted"] else None,
           "mean_acceptance_length": 1 + got["accepted"] / got["drafts"] if speculative and got["drafts"] else None,
           "speedup_vs_hf": tps / ref_run["tokens_per_s"] if batch_size == bench["batch_size"] else None,
           "mismatches": sum(1 for a, b in zip(got["outputs"], ref) if list(a) != list(b)),
           "per_category": {}, "engine": "vllm", "speculative_config": speculative_config(method),
           "outputs": got["outputs"]}
    for cat in sorted(set(cats)):
        idx = [i for i, c in enumerate(cats) if c == cat]
        t = sum(got["times"][i] for i in idx)
        n = sum(len(got["outputs"][i]) for i in idx)
        ref_cat = (ref_run.get("per_category") or {}).get(cat, {}).get("tokens_per_s")
        timed = batch_size == 1
        run["per_category"][cat] = {"tokens_per_s": n / t if timed and t else None, "tau": None,
                                    "speedup_vs_hf": (n / t) / ref_cat if timed and t and ref_cat else None}
    return run


def split_methods(text: str) -> list[str]:
    """``--methods`` list: comma-separated, where a bare number after a comma is the previous method's ``,<k>``
    (``vllm,vllm:eagle3=out/eagle3,3`` -> ``["vllm", "vllm:eagle3=out/eagle3,3"]``)."""
    methods: list[str] = []
    for part in text.split(","):
        if part.isdigit() and methods and methods[-1].partition("=")[0] in DRAFT_HEADS:
            methods[-1] += "," + part
        elif part:
            methods.append(part)
    return methods


def build_order(methods: list[str]) -> list[str]:
    """The order to build engines in: n-gram ones last. vLLM 0.32's CPU platform rescans ``sys.modules`` to patch
    its Triton kernels whenever an engine starts, and fails (``'_lib_fn_wrapper' object has no attribute 'get'``)
    once the n-gram proposer has imported numba's llvmlite; engines built before that start fine."""
    return sorted(methods, key=lambda m: m.startswith("vllm:ngram"))


def serve(target: str, dtype: str, methods: list[str], max_model_len: int, max_num_seqs: int = 1) -> int:
    """The ``--serve`` loop: one engine per method, greedy, one request (or one batch of requests) per line (see
    the module docstring)."""
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    # several engines in one process: each gets a fixed 1 GiB KV cache (vLLM's default claims most of the host's
    # memory for the first engine); one request at a time needs far less, and capacity does not change speed
    # every engine's start replaces vLLM's Prometheus metrics with its own, so speculation counts can be read only
    # for the engine built last (run scripts/peer_vllm.py --from ... on one method for another's acceptance)
    order = build_order(methods)
    engines = {m: LLM(model=engine_model(m, target), dtype=dtype, seed=0, max_num_seqs=max_num_seqs,
                      max_model_len=max_model_len,
                      speculative_config=speculative_config(m), disable_log_stats=False,
                      gpu_memory_utilization=0.3, kv_cache_memory_bytes=1 << 30) for m in order}
    print(json.dumps({"ready": True, "versions": {"vllm": vllm.__version__, "torch": torch.__version__},
                      "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("quit"):
            break
        llm = engines[req["method"]]
        acc0, drafted0 = spec_counts(llm)
        params = SamplingParams(temperature=0.0, max_tokens=int(req["max_new_tokens"]))
        batch = req.get("batch")
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in (batch if batch is not None else [req["ids"]])]
        start = time.perf_counter()
        out = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        acc1, drafted1 = spec_counts(llm)
        counted = req["method"] == order[-1]  # None: not measurable in this process (see above)
        reply = {"accepted": acc1 - acc0 if counted else None, "drafted": drafted1 - drafted0 if counted else None,
                 "time_s": elapsed}
        outputs = [list(o.outputs[0].token_ids) for o in out]
        reply.update({"outputs": outputs} if batch is not None else {"tokens": outputs[0]})
        print(json.dumps(reply), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="answer requests on stdin (see the module docstring)")
    parser.add_argument("--dtype", default="float32", help="--serve: the target's dtype")
    parser.add_argument("--max-model-len", type=int, default=4096, help="--serve: prompt + new tokens, at most")
    parser.add_argument("--max-num-seqs", type=int, default=1, help="--serve: requests an engine runs at once")
    parser.add_argument("--from", dest="source", help="a bench JSON written with bench.save_tokens=true")
    parser.add_argument("--output")
    parser.add_argument("--methods", default="vllm,vllm:ngram", help="comma-separated, e.g. vllm,vllm:ngram,vllm:eagle3=<dir>,3")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the bench run's batch size")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--target", default=None, help="the target's directory (default: the bench's, or the "
                        "default target converted by specdec under $SPECDEC_CACHE)")
    args = parser.parse_args()
    if args.serve:
        if not args.target:
            raise SystemExit("--serve needs --target <HF model directory>.")
        return serve(args.target, args.dtype, split_methods(args.methods), args.max_model_len, args.max_num_seqs)
    if not args.source or not args.output:
        raise SystemExit("pass --from <bench JSON> and --output <JSON> (or --serve).")
    bench = json.loads(Path(args.source).read_text(encoding="utf-8"))
    if "requests" not in bench or not all("outputs" in r for r in bench["runs"] if r["method"] == "hf"):
        raise SystemExit(f"{args.source} has no requests/outputs: run the bench with bench.save_tokens=true.")
    cache = Path(os.environ.get("SPECDEC_CACHE", Path.home() / ".cache" / "specdec"))
    bench["target_path"] = args.target or bench.get("target_path") or str(cache / "models" / "smollm2-135m-instruct")
    if not Path(bench["target_path"]).exists():
        raise SystemExit(f"no target at {bench['target_path']}: run specdec once (it converts the default target) "
                         "or pass --target <HF model directory>.")
    batch_size = args.batch_size or bench["batch_size"]
    runs = []
    for method in build_order(split_methods(args.methods)):
        print(f"{method}: {len(bench['requests'])} requests, batch size {batch_size}", file=sys.stderr)
        runs.append(summarize(method, bench, run_method(method, bench, batch_size, args.warmup), batch_size))
        r = runs[-1]
        print(f"  {r['tokens_per_s']:.1f} tokens/s, tau {r['tau']}, mismatches {r['mismatches']}", file=sys.stderr)
    import torch
    import vllm

    result = {k: bench[k] for k in ("target", "dtype", "device", "prompts", "prompts_file", "max_new_tokens")}
    result.update({"threads": torch.get_num_threads(), "batch_size": batch_size, "runs": runs,
                   "versions": {"vllm": vllm.__version__, "torch": torch.__version__}, "source": args.source})
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
