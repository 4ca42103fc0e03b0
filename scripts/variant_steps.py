"""Verify-step cost of the target in each dtype / quantization, interleaved in one process (ratios to float32).

    python scripts/variant_steps.py [--variants float32 bfloat16 bf16 int8 int4] [--sizes 1 4 8 16] [--rounds 3]
        [--verifier paged] [--out bench_results/variant_steps.json]

A verify step of N nodes is what a plain decode step (N = 1) or a speculative step over an N-node tree costs
(:func:`specdec.profiler.measure_verify`: score + commit over a 256-token prefix, median of its reps). Variants are
measured in turn, ``--rounds`` times, so the machine's drift spreads over all of them; the table gives the median
per variant and size and the speed relative to float32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specdec import registry  # noqa: E402
from specdec.bench.quality import load_variant  # noqa: E402
from specdec.profiler import measure_verify  # noqa: E402
from specdec.textio import format_table, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=None)
    ap.add_argument("--variants", nargs="+", default=["float32", "bfloat16", "int8", "int4"],
                    help="float32, bfloat16, bf16 (bfloat16 weights), int8, int4, gguf (the default model's Q4_1 file)")
    ap.add_argument("--sizes", nargs="+", type=int, default=[1, 4, 8, 16])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--verifier", default="paged")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench_results/variant_steps.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    verifiers = {v: registry.build_verifier(args.verifier, load_variant(args.target, v)) for v in args.variants}
    times: dict[str, dict[int, list[float]]] = {v: {n: [] for n in args.sizes} for v in args.variants}
    for r in range(args.rounds):
        for v, verifier in verifiers.items():
            for n, ms in measure_verify(verifier.model, verifier, args.sizes, reps=args.reps).items():
                times[v][n].append(ms)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    med = {v: {n: statistics.median(t) for n, t in d.items()} for v, d in times.items()}
    base = med.get("float32")
    rows = [[v, *[f"{med[v][n]:.1f}" + (f" ({base[n] / med[v][n]:.2f}x)" if base else "") for n in args.sizes]]
            for v in args.variants]
    print(format_table(["variant", *[f"{n} node{'s' if n > 1 else ''} ms" for n in args.sizes]], rows))
    write_json(args.out, {"verifier": args.verifier, "threads": args.threads, "sizes": args.sizes, "median_ms": med,
                          "all_ms": times})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
