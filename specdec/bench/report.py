"""Benchmark results: per-call measurements -> per-method summaries, text tables and an atomically written JSON.

Pure functions (no model, no clock), so every number the bench prints has a unit test.

>>> ms = [Measurement("hf", 0, "math", (5, 6), 1.0), Measurement("specdec:ngram", 0, "math", (5, 6), 0.5, 1, 3, 1)]
>>> [(r["method"], r["tokens_per_s"], r["speedup_vs_hf"], r["tau"]) for r in summarize(ms, ["hf", "specdec:ngram"])]
[('hf', 2.0, 1.0, None), ('specdec:ngram', 4.0, 2.0, 2.0)]
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from specdec.textio import format_table, write_json  # noqa: F401 - the bench's tables and JSON, re-exported

REFERENCE = "hf"  # every method is compared with (and timed against) the target's own model.generate


@dataclass(frozen=True)
class Measurement:
    """One timed generate call: which method, which prompt, the new tokens and what the speculative loop counted."""

    method: str
    prompt_index: int
    category: str
    tokens: tuple[int, ...]  # the new tokens (prompt excluded)
    time_s: float  # perf_counter around the generate call only
    verify_steps: int | None = None  # None for HF methods (no verify steps to count)
    drafted: int = 0
    accepted: int = 0
    accepted_by_depth: tuple[int, ...] = ()  # [d] verify steps whose accepted path reached depth d+1


def totals(ms: Sequence[Measurement]) -> dict:
    """Aggregate calls: tokens/s = all new tokens / all generate time; tau = new tokens / verify steps."""
    new_tokens = sum(len(m.tokens) for m in ms)
    time_s = sum(m.time_s for m in ms)
    speculative = bool(ms) and all(m.verify_steps is not None for m in ms)
    steps = sum(m.verify_steps or 0 for m in ms)
    drafted = sum(m.drafted for m in ms)
    depth = [0] * max((len(m.accepted_by_depth) for m in ms), default=0)
    for m in ms:
        for d, c in enumerate(m.accepted_by_depth):
            depth[d] += c
    return {
        "new_tokens": new_tokens,
        "time_s": time_s,
        "tokens_per_s": new_tokens / time_s if time_s > 0 else 0.0,
        "tau": (new_tokens / steps if steps else None) if speculative else None,
        "acceptance_rate": (sum(m.accepted for m in ms) / drafted if drafted else 0.0) if speculative else None,
        "acceptance_by_depth": [c / steps for c in depth] if speculative and steps else None,
    }


def _speedup(tps: float, ref_tps: float | None) -> float | None:
    return tps / ref_tps if ref_tps else None


def count_mismatches(ms: Sequence[Measurement], reference: Sequence[Measurement]) -> int:
    """Prompts whose full new-token list differs from the reference method's."""
    ref = {m.prompt_index: m.tokens for m in reference}
    return sum(1 for m in ms if tuple(m.tokens) != tuple(ref.get(m.prompt_index, ())))


def summarize(measurements: Sequence[Measurement], methods: Sequence[str], reference: str = REFERENCE,
              sampled: bool = False, batch_size: int = 1) -> list[dict]:
    """One run dict per method (in ``methods`` order), with totals, speedup, mismatches and a per-category split.

    ``sampled``: outputs were sampled, so token-for-token comparison means nothing and mismatches are None.
    ``batch_size`` > 1: requests were served together, so there is no per-category time (tokens/s and speedup per
    category are None; tau per category stays). Each run records its ``batch_size``.
    """
    by_method = {name: [m for m in measurements if m.method == name] for name in methods}
    ref = by_method.get(reference, [])
    ref_all = totals(ref)["tokens_per_s"]
    ref_cat = {c: totals([m for m in ref if m.category == c])["tokens_per_s"] for c in {m.category for m in ref}}
    runs = []
    for name in methods:
        ms = by_method[name]
        run = {"method": name, "batch_size": batch_size, **totals(ms)}
        run["speedup_vs_hf"] = _speedup(run["tokens_per_s"], ref_all)
        run["mismatches"] = None if sampled else count_mismatches(ms, ref)
        run["per_category"] = {}
        for cat in sorted({m.category for m in ms}):
            t = totals([m for m in ms if m.category == cat])
            timed = batch_size == 1
            run["per_category"][cat] = {"tokens_per_s": t["tokens_per_s"] if timed else None, "tau": t["tau"],
                                        "speedup_vs_hf": _speedup(t["tokens_per_s"], ref_cat.get(cat)) if timed
                                        else None}
        runs.append(run)
    return runs


def tokens_record(measurements: Sequence[Measurement], prompts: Sequence, inputs: Sequence, runs: list[dict]) -> dict:
    """The requests (question id, category, input ids) and, in each run dict, its outputs in request order: what a
    peer engine needs to run the same requests and be checked against ``hf`` (``bench.save_tokens``)."""
    for run in runs:
        by_prompt = {m.prompt_index: list(m.tokens) for m in measurements if m.method == run["method"]}
        run["outputs"] = [by_prompt.get(i, []) for i in range(len(prompts))]
    return {"requests": [{"question_id": p.question_id, "category": p.category, "input_ids": ids[0].tolist()}
                         for p, ids in zip(prompts, inputs)]}


def merge(results: Sequence[dict]) -> dict:
    """Several result JSONs of one sitting (the bench's, a peer engine's) as one, runs in order; the header is the
    first's. Outputs are dropped (they are in the files)."""
    runs = [{k: v for k, v in r.items() if k != "outputs"} for result in results for r in result["runs"]]
    return {**{k: v for k, v in results[0].items() if k not in ("runs", "requests")}, "runs": runs}


def runs_table(runs: Sequence[dict]) -> str:
    """The headline table: method, tokens/s, speedup vs hf, tau, acceptance rate, mismatches."""
    rows = [[r["method"] + (" [LOSSY]" if r.get("lossy") else ""), r["tokens_per_s"], _times(r["speedup_vs_hf"]), r["tau"], r.get("acceptance_rate"),
             r["mismatches"]] for r in runs]
    return format_table(["method", "tokens/s", "speedup", "tau", "accept", "mismatches"], rows)


def category_table(runs: Sequence[dict]) -> str:
    """Per-category speedup vs hf (with tau for speculative methods): one row per category, one column per method."""
    categories = sorted({c for r in runs for c in r["per_category"]})
    rows = []
    for cat in categories:
        row: list[object] = [cat]
        for r in runs:
            c = r["per_category"].get(cat)
            cell = "-" if c is None else _times(c["speedup_vs_hf"])
            if c is not None and c["tau"] is not None:
                cell += f" tau {c['tau']:.2f}"
            row.append(cell)
        rows.append(row)
    return format_table(["category", *(r["method"] for r in runs)], rows)


def divergence_lines(runs: Sequence[dict]) -> str:
    """One line per run with ``divergences`` (:mod:`specdec.bench.divergence`): how many of its greedy outputs
    left the reference's, and the target's top-2 logit gap at the first differing token (max and median, as a logit
    difference and in steps of the dtype's resolution there); empty when no run has any.

    >>> e = {"gap": 0.0625, "gap_ulps": 1.0, "dtype": "bfloat16"}
    >>> runs = [{"method": "s", "divergences": [e, {**e, "gap": 0.125, "gap_ulps": 2.0}]}]
    >>> print(divergence_lines(runs))  # doctest: +NORMALIZE_WHITESPACE
    s: 2 divergences, top-2 logit gap at the first differing token: max 0.125 (2 bfloat16 steps),
    median 0.09375 (1.5 steps); 1 of 2 within 1 step
    """
    lines = []
    for r in runs:
        ds = r.get("divergences") or []
        if not ds:
            continue
        worst = max(ds, key=lambda d: d["gap"])
        within = sum(1 for d in ds if d["gap_ulps"] <= 1)
        median_gap = statistics.median(d["gap"] for d in ds)
        median_steps = statistics.median(d["gap_ulps"] for d in ds)
        lines.append(f"{r['method']}: {len(ds)} divergence{'s' * (len(ds) != 1)}, top-2 logit gap at the first "
                     f"differing token: max {worst['gap']:.4g} ({_steps(worst['gap_ulps'], worst['dtype'])}), "
                     f"median {median_gap:.4g} ({_steps(median_steps)}); {within} of {len(ds)} within 1 step")
    return "\n".join(lines)


def _steps(x: float, dtype: str = "") -> str:
    """``2 bfloat16 steps``, ``1 step``, ``315 float32 steps``, ``1.2e+13 float64 steps``."""
    n = f"{x:.0f}" if 100 <= x < 1e6 else f"{x:.3g}"
    return " ".join(filter(None, [n, dtype, "step" if n == "1" else "steps"]))


def quality_line(q: dict) -> str:
    """What the target's dtype or quantization costs: perplexity and top-1 agreement with float32."""
    return (f"quality ({q['variant']} vs float32, {q['tokens']} held-out tokens): perplexity {q['perplexity']:.3f} "
            f"(float32 {q['float32_perplexity']:.3f}), top-1 agreement {q['top1_agreement']:.2%}")


def text_report(result: dict) -> str:
    """The bench's printed summary: a header line, the headline table (with a divergence line per method whose
    greedy outputs differ from the reference's, see :func:`divergence_lines`) and the per-category table."""
    q = result.get("quantization")
    # int8 / int4 layers quantize their activations to 8 bits; bf16 weights multiply float32 activations
    weights = f"{q} weights, {'float32' if q == 'bf16' else '8-bit'} activations" if q else result["dtype"]
    head = (f"{result['target']} ({weights}, {result['device']}, {result['threads']} threads), "
            f"{result['prompts']} prompts, up to {result['max_new_tokens']} new tokens each")
    if result.get("batch_size", 1) > 1:
        head += f"; batch size {result['batch_size']}: tokens/s is total throughput over all requests"
    if result.get("sampling"):
        s = result["sampling"]
        head += (f"; sampled (temperature {s['temperature']}, top_k {s['top_k']}, top_p {s['top_p']}): "
                 "mismatches are not meaningful")
    quality = result.get("quality")
    table = "\n\n".join(filter(None, [runs_table(result["runs"]), divergence_lines(result["runs"]),
                                       quality_line(quality) if quality else None]))
    return "\n\n".join([head, table, "speedup vs hf by category", category_table(result["runs"])])


def _times(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"




def main(argv: Sequence[str] | None = None) -> int:
    """``python -m specdec.bench.report A.json [B.json ...]``: the tables of one or several result files (e.g. the
    bench's and scripts/peer_vllm.py's of the same sitting) as one report."""
    import sys

    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print(main.__doc__, file=sys.stderr)
        return 2
    print(text_report(merge([json.loads(Path(p).read_text(encoding="utf-8")) for p in paths])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
