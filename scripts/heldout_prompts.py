"""Write a second benchmark prompt set no drafter here was trained on: the first user turns of rows in the training
data's held-out split (train/data.py's hash of the row id, the same split every train/ job keeps out), a few per
source, in Spec-Bench format (``question_id``, ``category`` = the source, ``turns``).

    python scripts/heldout_prompts.py --per-source 4 --out bench_results/heldout.jsonl
    python -m specdec.bench bench.prompts=bench_results/heldout.jsonl ...

The file is derived from ../shared/data on the machine that runs it (nothing is copied into the repository).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.data import is_validation  # noqa: E402

SOURCES = ("sharegpt_chat", "gpteacher", "self_instruct", "gsm8k_train", "mbpp", "oasst_prompts")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"),
                    help="the shared data folder (default: ../shared/data next to the repository)")
    ap.add_argument("--per-source", type=int, default=4, help="prompts per source file")
    ap.add_argument("--val-fraction", type=float, default=0.05, help="the train/ data config's val_fraction")
    ap.add_argument("--max-chars", type=int, default=1500, help="skip prompts longer than this")
    ap.add_argument("--out", default="bench_results/heldout.jsonl")
    args = ap.parse_args()
    out = []
    for source in SOURCES:
        path = Path(args.data) / "train" / f"{source}.jsonl"
        taken = 0
        with path.open(encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                first = next((m for m in row["messages"] if m["role"] == "user"), None)
                if (first is None or not is_validation(str(row["id"]), args.val_fraction)
                        or not first["content"].strip() or len(first["content"]) > args.max_chars):
                    continue
                out.append({"question_id": row["id"], "category": source, "turns": [first["content"]]})
                taken += 1
                if taken == args.per_source:
                    break
        if taken < args.per_source:
            print(f"{source}: only {taken} held-out prompts", file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in out), encoding="utf-8")
    print(f"wrote {len(out)} prompts to {args.out}")


if __name__ == "__main__":
    main()
