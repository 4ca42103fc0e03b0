"""Serve an EAGLE-3 head exported by ``specdec export`` with vLLM's CPU engine and check it against specdec.

Runs in vLLM's own environment (``bash scripts/vllm_env.sh``). Needs a bench JSON written with
``bench.save_tokens=true`` whose methods include ``hf`` and specdec's run of the same head as a chain of ``k``
drafts (``drafter=eagle3 drafter.path=<our checkpoint> drafter.depth=<k> drafter.max_nodes=<k+1>``,
method ``specdec:eagle3``):

    python -m specdec.bench drafter=eagle3 drafter.path=runs/eagle3/final drafter.depth=3 drafter.max_nodes=4 \\
        "bench.methods=[hf,specdec:eagle3]" bench.save_tokens=true bench.output=bench_results/eagle3_chain.json
    specdec export runs/eagle3/final --to eagle3 runs/eagle3/final-eagle3
    specdec export runs/eagle3/final --to speculators runs/eagle3/final-speculators --verifier <target dir> \\
        --speculative-tokens 3
    .venv-vllm/bin/python scripts/vllm_eagle3_check.py --from bench_results/eagle3_chain.json \\
        --eagle3 runs/eagle3/final-eagle3 --speculators runs/eagle3/final-speculators -k 3 \\
        --output docs/results/vllm_eagle3_check.json

For each exported directory it generates every request greedily with vLLM (the EAGLE-3 layout through
``speculative_config={"method": "eagle3", "model": dir, "num_speculative_tokens": k}``; the speculators layout as
the model itself, no flags), and reports: outputs equal to transformers' greedy (the bench's ``hf`` outputs),
vLLM's mean acceptance length (``1 + accepted / drafts``) beside specdec's tokens per step for the same head and
chain, and whether the two are within 10%.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import peer_vllm  # noqa: E402  (scripts/peer_vllm.py: the same engine runs and JSON fields as the bench's peer)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", required=True, help="bench JSON with hf and specdec:eagle3 runs")
    parser.add_argument("--eagle3", help="a directory written by specdec export --to eagle3")
    parser.add_argument("--speculators", help="a directory written by specdec export --to speculators")
    parser.add_argument("-k", type=int, default=3, help="draft tokens per step (the chain specdec ran)")
    parser.add_argument("--specdec-method", default="specdec:eagle3", help="the bench run of the same head")
    parser.add_argument("--target", default=None, help="the target's directory (default: the bench's)")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    bench = json.loads(Path(args.source).read_text(encoding="utf-8"))
    ours = next((r for r in bench["runs"] if r["method"] == args.specdec_method), None)
    if ours is None or "requests" not in bench:
        raise SystemExit(f"{args.source} needs bench.save_tokens=true and a {args.specdec_method} run.")
    cache = Path(os.environ.get("SPECDEC_CACHE", Path.home() / ".cache" / "specdec"))
    bench["target_path"] = args.target or bench.get("target_path") or str(cache / "models" / "smollm2-135m-instruct")
    methods = ([f"vllm:eagle3={args.eagle3},{args.k}"] if args.eagle3 else []) + \
        ([f"vllm:speculators={args.speculators}"] if args.speculators else [])
    if not methods:
        raise SystemExit("pass --eagle3 and/or --speculators.")
    rows = []
    for method in methods:
        run = peer_vllm.summarize(method, bench, peer_vllm.run_method(method, bench, 1, 1), 1)
        mal = run["mean_acceptance_length"]
        rows.append({"method": method, "requests": len(bench["requests"]), "mismatches_vs_hf": run["mismatches"],
                     "vllm_mean_acceptance_length": mal, "specdec_tau": ours["tau"],
                     "specdec_mismatches_vs_hf": ours.get("mismatches"),
                     "relative_difference": None if mal is None else abs(mal - ours["tau"]) / ours["tau"],
                     "within_10_percent": None if mal is None else abs(mal - ours["tau"]) <= 0.1 * ours["tau"],
                     "vllm_tokens_per_s": run["tokens_per_s"], "speculative_config": run["speculative_config"]})
        r = rows[-1]
        print(f"{method}: mismatches {r['mismatches_vs_hf']}/{r['requests']}, vLLM mean acceptance length "
              f"{mal:.3f} vs specdec tau {ours['tau']:.3f} ({100 * r['relative_difference']:.1f}% apart)",
              file=sys.stderr)
    import torch
    import vllm

    result = {k: bench.get(k) for k in ("target", "dtype", "prompts", "prompts_file", "max_new_tokens")}
    result.update({"k": args.k, "source": args.source, "checks": rows,
                   "versions": {"vllm": vllm.__version__, "torch": torch.__version__}})
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.output}", file=sys.stderr)
    return 0 if all(r["mismatches_vs_hf"] == 0 and r["within_10_percent"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
