"""What a dtype or a quantization costs in quality: perplexity, and top-1 agreement with the float32 target, on
held-out text.

The text is whole conversations (user and assistant turns, through the target's chat template) from the held-out
split of ``../shared/data/train/`` (:func:`specdec.splits.is_validation`: rows no drafter trained on), a few per
source. For every position the target predicts, perplexity is ``exp`` of the mean negative log-likelihood of the
actual next token, and top-1 agreement the share of positions where the variant's argmax is the float32 target's.

    python -m specdec.bench.quality                       # float32, bfloat16, bf16, int8, int4, the shipped Q4_1 GGUF
    python -m specdec.bench.quality --variants float32 int8 --texts 16 --target <hub id or path>

The bench prints the same two figures for a target that is not plain float32 (``bench.quality``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from specdec import models
from specdec.kernels import quant_gemm
from specdec.splits import is_validation
from specdec.textio import format_table, write_json

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "train"
SOURCES = ("sharegpt_chat", "gpteacher", "self_instruct", "gsm8k_train", "mbpp")
VARIANTS = ("float32", "bfloat16", "bf16", "int8", "int4", "gguf")  # gguf: the default target's own Q4_1 file


@dataclass(frozen=True)
class Quality:
    """Scores of one variant on ``tokens`` predicted positions."""

    variant: str
    perplexity: float
    top1_agreement: float
    tokens: int


def heldout_texts(tokenizer, n: int = 10, max_tokens: int = 384, data: Path = DATA) -> list[torch.Tensor]:
    """``n`` held-out conversations as ``[1, T]`` ids (T <= max_tokens), taken in turn from each source file."""
    per = -(-n // len(SOURCES))
    out: list[torch.Tensor] = []
    for source in SOURCES:
        path = Path(data) / f"{source}.jsonl"
        if not path.is_file():
            continue
        taken = 0
        with path.open(encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                roles = {m["role"] for m in row["messages"]}
                if not is_validation(str(row["id"])) or roles != {"user", "assistant"}:
                    continue
                # through the chat template where the tokenizer has one, as plain text where it has none
                text = row["messages"] if getattr(tokenizer, "chat_template", None) else \
                    "\n\n".join(m["content"] for m in row["messages"])
                ids = models.encode_prompt(tokenizer, text)[:, :max_tokens]
                if ids.shape[1] >= 32:
                    out.append(ids)
                    taken += 1
                if taken == per:
                    break
    if not out:
        raise FileNotFoundError(f"no held-out conversations under {data}; pass --data <folder of chat .jsonl files>.")
    return out[:n]


def next_token_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """``[T - 1, V]`` float32 logits predicting tokens 1..T-1 of ``ids [1, T]``."""
    with torch.inference_mode():
        return model(ids).logits[0, :-1].float()


def score(model, texts: list[torch.Tensor], reference: list[torch.Tensor], variant: str) -> Quality:
    """Perplexity of ``model`` on ``texts`` and agreement of its argmax with ``reference`` (the float32 target's
    argmax per text, ``[T - 1]``)."""
    nll, agree, count = 0.0, 0, 0
    for ids, ref in zip(texts, reference):
        logits = next_token_logits(model, ids)
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        agree += int((logits.argmax(-1) == ref).sum())
        count += ref.numel()
    return Quality(variant, math.exp(nll / count), agree / count, count)


def load_variant(target: str | None, variant: str):
    """The target as ``variant``: a dtype, a quantization, or ``gguf`` (the default target's shipped file)."""
    if variant == "gguf":
        return models.load_target("smollm2-q4_1")[0]
    if variant in quant_gemm.BITS:  # int8, int4, bf16 (bfloat16 weights; "bfloat16" is the whole model's dtype)
        return models.load_target(target, quantization=variant)[0]
    return models.load_target(target, dtype=variant)[0]


def measure(target: str | None, variants: list[str], n: int = 10, max_tokens: int = 384,
            data: Path = DATA) -> list[Quality]:
    """One :class:`Quality` per variant, float32 the reference."""
    reference_model, tokenizer = models.load_target(target)
    texts = heldout_texts(tokenizer, n, max_tokens, data)
    reference = [next_token_logits(reference_model, ids).argmax(-1) for ids in texts]
    return [score(load_variant(target, v), texts, reference, v) for v in tqdm(variants, desc="variants")]


def for_bench(target: str | None, model, variant: str, n: int = 5, max_tokens: int = 256) -> dict | None:
    """The bench's quality line for a target that is not plain float32 (``variant`` names it), scored against the
    float32 target on ``n`` held-out conversations; None where the held-out text is absent."""
    reference_model, tokenizer = models.load_target(target)
    try:
        texts = heldout_texts(tokenizer, n, max_tokens)
    except FileNotFoundError:
        return None
    reference = [next_token_logits(reference_model, ids).argmax(-1) for ids in texts]
    q = score(model, texts, reference, variant)
    f = score(reference_model, texts, reference, "float32")
    return {"variant": variant, "perplexity": q.perplexity, "float32_perplexity": f.perplexity,
            "top1_agreement": q.top1_agreement, "tokens": q.tokens}


def table(rows: list[Quality]) -> str:
    return format_table(["variant", "perplexity", "top-1 = float32", "tokens"],
                        [[q.variant, f"{q.perplexity:.3f}", f"{q.top1_agreement:.2%}", str(q.tokens)] for q in rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m specdec.bench.quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=None, help="hub id or path (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--texts", type=int, default=10, help="held-out conversations")
    ap.add_argument("--max-tokens", type=int, default=384, help="tokens per conversation (cut)")
    ap.add_argument("--data", default=str(DATA), help="folder of chat .jsonl files (../shared/data/train)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench_results/quality.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if "gguf" in args.variants and args.target not in (None, *models.DEFAULT_ALIASES):
        print("note: the gguf variant is the default target's file; dropped for another target", file=sys.stderr)
        args.variants = [v for v in args.variants if v != "gguf"]
    rows = measure(args.target, args.variants, args.texts, args.max_tokens, Path(args.data))
    print(table(rows))
    write_json(args.out, {"target": args.target or models.DEFAULT_TARGET, "texts": args.texts,
                          "max_tokens": args.max_tokens, "rows": [q.__dict__ for q in rows]})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
