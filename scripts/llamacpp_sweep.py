"""A short sweep of llama.cpp's n-gram speculation settings on this machine, against its plain decoding.

    .venv/bin/python scripts/llamacpp_sweep.py --limit 6 --max-new-tokens 64 [--gguf f32] [--types ngram-mod]

Starts one llama-server per setting (plus one without speculation) on the default target's GGUF, all idle but the
one timed. For every prompt, each setting (a different one first at each prompt) runs right after the plain server
on the same prompt, so each speedup is a ratio of neighbours in time: this VM's drift and other jobs move both
alike. Prints per setting tokens/s, plain's tokens/s beside it, the speedup, tau (tokens per target step), how many
outputs differ from plain llama.cpp's, and the share of the CPU that other processes used meanwhile (high: rerun on
a quiet machine). It also sums the CPU time the idle servers spent while another was timed (~0: a waiting
llama-server sleeps). The best of each type goes into ``SPEC_ARGS`` in specdec/bench/peer_llamacpp.py by hand.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specdec.bench import peer_llamacpp as lc
from specdec.bench.prompts import load_prompts

# (type, {option suffix: value}); the option is --spec-<type>-<suffix> (ngram-mod: --spec-ngram-mod-<suffix>)
GRID = {
    "ngram-simple": [{"size-n": n, "size-m": m} for n, m in [(2, 4), (3, 4), (3, 6), (4, 4), (3, 8), (12, 48)]],
    "ngram-map-k": [{"size-n": n, "size-m": m, "min-hits": h}
                    for n, m, h in [(2, 4, 1), (3, 4, 1), (3, 8, 1), (3, 4, 2), (12, 48, 1)]],
    "ngram-mod": [{"n-match": n, "n-min": lo, "n-max": hi}
                  for n, lo, hi in [(8, 1, 8), (12, 2, 16), (16, 2, 16), (24, 48, 64)]],
}


def setting_args(kind: str, setting: dict) -> list[str]:
    args = ["--spec-type", kind]
    for key, value in setting.items():
        args += [f"--spec-{kind}-{key}", str(value)]
    return args


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far (Linux /proc)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of the whole line)
    return total / os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """CPU time the whole machine has been busy so far (all cores, /proc/stat), in seconds."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def timed(servers: dict, name: str, ids: list[int], max_new_tokens: int) -> dict:
    """One request to ``servers[name]``, with the CPU time the other (idle) servers spent meanwhile (``idle_s``)
    and the CPU time of anything else on the machine (``foreign_s``: another job makes every figure noise)."""
    others = [s.proc.pid for n, s in servers.items() if n != name]
    pids = [os.getpid(), servers[name].proc.pid]
    idle0, ours0, busy0 = cpu_seconds(others), cpu_seconds(pids), busy_seconds()
    got = servers[name].complete(ids, max_new_tokens)
    idle = cpu_seconds(others) - idle0
    foreign = busy_seconds() - busy0 - idle - (cpu_seconds(pids) - ours0)
    return {**got, "idle_s": idle, "foreign_s": max(0.0, foreign)}


def print_table(rows: dict) -> None:
    print(f"{'setting':52} {'tok/s':>6} {'plain':>6} {'speedup':>7} {'tau':>5} {'differ':>6} {'other load':>10}")
    for name, r in rows.items():
        if not r["time"]:
            continue
        tau = r["tokens"] / (r["tokens"] - r["accepted"])
        other = r["foreign"] / (r["time"] + r["plain"])
        print(f"{name:52} {r['tokens'] / r['time']:6.1f} {r['tokens'] / r['plain']:6.1f} "
              f"{r['plain'] / r['time']:6.2f}x {tau:5.2f} {r['differ']:6d} {other:9.0%}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--gguf", default="f32", help="a GGUF type or file (bench.llamacpp_gguf)")
    parser.add_argument("--types", nargs="*", default=list(GRID))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dir", default=".llamacpp")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from specdec.models.loading import encode_prompt, resolve_target_path

    target = resolve_target_path(None)
    tokenizer = AutoTokenizer.from_pretrained(target)
    prompts, _ = load_prompts(None, None, args.limit, False)
    inputs = [encode_prompt(tokenizer, p.text, chat=not p.raw)[0].tolist() for p in prompts]
    ctx = max(map(len, inputs)) + args.max_new_tokens + 16
    model = lc.model_gguf(target, args.gguf, args.dir, None)
    settings = [(f"{k} {s}", setting_args(k, s)) for k in args.types for s in GRID[k]]
    servers = {}
    try:
        for name, extra in [("plain", []), *settings]:
            print(f"starting {name}", file=sys.stderr)
            servers[name] = lc.LlamaServer(lc.server_path(args.dir), model, extra, args.threads, 1, ctx, name=name)
        for server in servers.values():  # warm-up
            server.complete(inputs[0], 16)
        rows = {name: {"tokens": 0, "time": 0.0, "plain": 0.0, "accepted": 0, "differ": 0, "foreign": 0.0}
                for name, _ in settings}
        names, idle_cpu = [name for name, _ in settings], 0.0
        for i, ids in enumerate(inputs):
            for name in names[i % len(names):] + names[:i % len(names)]:  # a rotated order: no setting always first
                plain = timed(servers, "plain", ids, args.max_new_tokens)
                got = timed(servers, name, ids, args.max_new_tokens)
                r = rows[name]
                r["tokens"] += len(got["tokens"])
                r["time"] += got["time_s"]
                r["plain"] += plain["time_s"]
                r["accepted"] += got["accepted"]
                r["differ"] += got["tokens"] != plain["tokens"]
                r["foreign"] += plain["foreign_s"] + got["foreign_s"]
                idle_cpu += plain["idle_s"] + got["idle_s"]
            print(f"after prompt {i + 1} of {len(inputs)}: {args.max_new_tokens} new tokens, {args.gguf}, "
                  f"{args.threads} threads; CPU time of the idle servers while another was timed: {idle_cpu:.2f} s")
            print_table(rows)  # after every prompt: a run cut short still says what it measured
    finally:
        for server in servers.values():
            server.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
