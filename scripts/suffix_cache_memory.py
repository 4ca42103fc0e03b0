"""Memory of the suffix-decoding cache per million cached tokens, on real text: the drafter training data's
conversations tokenized with the default model's tokenizer, one request per conversation.

    python scripts/suffix_cache_memory.py [--tokens 1000000] [--tokenizer <dir or hub id>]

Prints the tokens, requests, distinct token pairs and index entries, the bytes Python allocated for the cache
(tracemalloc), the cache's own estimate, and the time to fill it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drafters.suffix_cache import SuffixCache  # noqa: E402
from specdec import models  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "train"))
    ap.add_argument("--tokenizer", default=None, help="default: the default model's")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models.resolve_target_path(args.tokenizer))
    requests: list[list[int]] = []
    total = 0
    for path in sorted(Path(args.data).glob("*.jsonl")):
        with path.open(encoding="utf-8") as f:
            for line in f:
                text = "\n".join(m["content"] for m in json.loads(line)["messages"])
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                requests.append(ids)
                total += len(ids)
                if total >= args.tokens:
                    break
        if total >= args.tokens:
            break
    tracemalloc.start()
    start = time.perf_counter()
    cache = SuffixCache(max_tokens=args.tokens + 1)
    for ids in requests:
        sid = cache.open_segment()
        cache.extend(sid, ids)
        cache.close_segment(sid)
    seconds = time.perf_counter() - start
    allocated, _ = tracemalloc.get_traced_memory()
    st = cache.stats()
    per_million = allocated / st["tokens"] * 1e6 / 2**20
    print(f"{st['tokens']} tokens in {st['segments']} requests, {st['pairs']} token pairs, {st['entries']} index "
          f"entries: {allocated / 2**20:.1f} MiB allocated ({per_million:.1f} MiB per million tokens; the cache's "
          f"estimate {st['approx_bytes'] / 2**20:.1f} MiB), filled in {seconds:.1f} s")


if __name__ == "__main__":
    main()
