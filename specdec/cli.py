"""The ``specdec`` command.

    specdec generate "Write a haiku about caches" [--drafter ngram] [--max-new-tokens 128] [--target PATH_OR_ID]
    specdec bench [hydra overrides ...]          # same as python -m specdec.bench
    specdec profile [--target PATH_OR_ID] [--dtype float32] [--threads 2] [--verifier hf] [--remeasure]
    specdec export CHECKPOINT OUT_DIR --to eagle3|speculators|medusa [--verifier ID] [--speculative-tokens 3] [--pad-vocab]
"""

from __future__ import annotations

import argparse
import sys

from specdec import registry
from specdec.errors import SpecdecError


def _generate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="specdec generate", description="Stream one speculative generation.")
    parser.add_argument("prompt", help="user message (the chat template is applied when the tokenizer has one)")
    parser.add_argument("--target", default=None, help="hub id or local path (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--drafter", default=registry.DEFAULT_DRAFTER,
                        help=f"{' | '.join(registry.DRAFTERS)}, or a train/ checkpoint directory")
    parser.add_argument("--draft-path", default=None,
                        help=f"the drafter's checkpoint or model (hub id or path); required by --drafter "
                             f"{registry.ASSISTANT_DRAFTER}")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-nodes", type=int, default=16, help="draft tree node budget, root included")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--raw", action="store_true", help="treat the prompt as raw completion text (no template)")
    args = parser.parse_args(argv)
    if args.drafter == registry.ASSISTANT_DRAFTER and not args.draft_path:
        parser.error(f"--drafter {registry.ASSISTANT_DRAFTER} needs --draft-path <hub id or local path of a causal LM "
                     "sharing the target's tokenizer, or a train/ checkpoint>.")

    from transformers import TextStreamer

    from specdec import SpecDecoder, models

    model, tokenizer = models.load_target(args.target, dtype=args.dtype)
    kwargs = {"path": args.draft_path} if args.draft_path else None
    decoder = SpecDecoder(model, tokenizer, drafter=args.drafter, drafter_kwargs=kwargs, max_nodes=args.max_nodes)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = decoder.generate(prompt=args.prompt, chat=not args.raw, max_new_tokens=args.max_new_tokens,
                           streamer=streamer)
    s = out.stats
    print(f"\n[{s.new_tokens} tokens in {s.wall_time_s:.2f} s = {s.tokens_per_s:.1f} tokens/s; "
          f"{s.verify_steps} verify steps, tau {s.tau:.2f}, acceptance {s.acceptance_rate:.0%}, "
          f"finished by {s.finish_reason}]", file=sys.stderr)
    return 0


def _profile(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="specdec profile",
                                     description="Print (measuring once, then cached) the verify-cost profile.")
    parser.add_argument("--target", default=None, help="hub id or local path (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--verifier", default=registry.REFERENCE_VERIFIER, help=" | ".join(registry.VERIFIERS))
    parser.add_argument("--remeasure", action="store_true", help="measure again even when a profile is cached")
    args = parser.parse_args(argv)

    import torch

    from specdec import models
    from specdec.bench import profiler

    torch.set_num_threads(args.threads)
    model, _ = models.load_target(args.target, dtype=args.dtype)
    profile, path, measured = profiler.load_or_measure(model, args.verifier, remeasure=args.remeasure)
    print(profiler.format_profile(profile))
    print(f"\n{'measured now, written to' if measured else 'cached in'} {path}")
    return 0


def _export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="specdec export",
        description="Write a drafter checkpoint in a layout vLLM/SGLang load (specdec.interop.export in Python).")
    parser.add_argument("checkpoint", help="a specdec drafter checkpoint directory (or a public one to convert)")
    parser.add_argument("out_dir")
    parser.add_argument("--to", required=True, choices=["eagle3", "speculators", "medusa"])
    parser.add_argument("--verifier", default=None,
                        help="speculators only: the target's hub id or path (default: the one the training job "
                             "recorded, else specdec's default target for a head of its shape)")
    parser.add_argument("--speculative-tokens", type=int, default=3,
                        help="speculators only: the chain length vLLM drafts (default 3)")
    parser.add_argument("--pad-vocab", action="store_true",
                        help="medusa only: write heads with a reduced draft vocabulary as full-vocabulary heads "
                             "(zero rows elsewhere; vLLM loads a reduced vocabulary only with one shared LM head)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read a public pickle checkpoint as the source (it can run code: trusted files only)")
    args = parser.parse_args(argv)

    from specdec import interop

    options = interop.layout_options(args.to, verifier=args.verifier, speculative_tokens=args.speculative_tokens,
                                     pad_vocab=args.pad_vocab)
    out = interop.export(args.checkpoint, args.to, args.out_dir, allow_pickle=args.allow_pickle, **options)
    print(f"{args.to} drafter written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "generate":
            return _generate(rest)
        if command == "profile":
            return _profile(rest)
        if command == "export":
            return _export(rest)
        if command == "bench":
            from specdec.bench import app as bench

            sys.argv = ["specdec bench", *rest]
            bench.main()
            return 0
    except SpecdecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"unknown command {command!r}; use `specdec generate`, `specdec bench`, `specdec profile` or `specdec export` "
          "(see specdec --help).", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
