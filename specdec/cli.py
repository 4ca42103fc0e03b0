"""The ``specdec`` command.

    specdec generate "Write a haiku about caches" [--drafter ngram|adaptive|eagle|...|DIR] [--draft-path PATH]
                     [--verifier hf|paged] [--adaptive] [--max-nodes 16] [--max-new-tokens 128]
                     [--temperature 0.7 [--top-p 0.9] [--top-k 50] [--seed 0]] [--dtype float32|bfloat16]
                     [--target PATH_OR_ID] [--raw]   # examples: specdec generate --help
    specdec bench [hydra overrides ...]          # same as python -m specdec.bench
    specdec profile [--target PATH_OR_ID] [--dtype float32] [--threads 2] [--verifier hf] [--remeasure]
    specdec export CHECKPOINT OUT_DIR --to eagle3|speculators|medusa [--verifier ID] [--speculative-tokens 3] [--pad-vocab]
    specdec kernels [--verbose]                  # build the C++ kernels now; say which serve this machine
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from specdec import registry
from specdec.errors import SpecdecError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # the Hydra configs of a source checkout (the bench's too)

GENERATE_EXAMPLES = """\
examples:
  specdec generate "Write a limerick"                                # n-gram drafter, greedy, hf verifier
  specdec generate "Write a limerick" --drafter adaptive             # the recommended method (bench: specdec:adaptive)
  specdec generate "Write a limerick" --drafter eagle                # any drafter the bench knows (conf/drafter/*.yaml)
  specdec generate "Write a limerick" --drafter runs/eagle/final     # a train/ checkpoint (or public EAGLE) directory
  specdec generate "Write a limerick" --drafter draft_model --draft-path checkpoints/smollm2-135m-draft_model
  specdec generate "Write a limerick" --verifier paged               # the paged KV cache verifier
  specdec generate "Write a limerick" --drafter ngram --adaptive     # re-decide the node budget every step
  specdec generate "Write a limerick" --max-nodes 8 --max-new-tokens 64
  specdec generate "Write a limerick" --temperature 0.7 --seed 0     # sample (lossless in distribution)
  specdec generate "Write a limerick" --temperature 0.7 --top-p 0.9 --top-k 50 --seed 0
  specdec generate "Once upon a time" --raw                          # completion text, no chat template
  specdec generate "Write a limerick" --target HuggingFaceTB/SmolLM2-360M-Instruct --dtype bfloat16

Greedy output (no --temperature) is token for token the target's own greedy decoding; sampled output has the
target's distribution, and the same --seed gives the same text. --top-p / --top-k / --seed need --temperature > 0;
unset, top-p and top-k come from the target's generation config, as in model.generate.
"""


def _conf_drafters() -> dict[str, Path]:
    """The drafter configs of a source checkout, ``conf/drafter/<name>.yaml`` by name (the bench's drafter names)."""
    return {p.stem: p for p in sorted((CONF_DIR / "drafter").glob("*.yaml"))}


def drafter_names() -> list[str]:
    """Every name ``--drafter`` takes (besides a checkpoint directory): the bench's ``specdec:<name>`` names."""
    return sorted({*registry.METHODS, *registry.DRAFTERS, *_conf_drafters()})


def resolve_drafter(name: str, draft_path: str | None) -> tuple[str, dict | None, bool]:
    """``(drafter, drafter_kwargs, adaptive)`` for ``--drafter name``, as the bench's ``specdec:<name>`` runs it: a
    named method (:data:`specdec.registry.METHODS`) is its drafter, with its budget; a drafter config
    (``conf/drafter/<name>.yaml``) gives its kind and options; a registered drafter takes its constructor's defaults;
    anything else is a checkpoint directory, as ``SpecDecoder(drafter=...)`` takes it."""
    named = registry.named_method(name)
    kind, options = named.drafter, {}
    config = _conf_drafters().get(kind)
    if config is not None:
        import yaml  # a dependency of transformers; the configs are plain YAML (no interpolation)

        options = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        kind = options.pop("name", kind)
    if draft_path:
        options["path"] = draft_path
    return kind, options or None, named.adaptive


def _check_generate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse combinations that cannot mean what was asked, naming the fix."""
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0 (0 = greedy); got {args.temperature}.")
    if not args.temperature > 0:
        given = [flag for flag, value in (("--top-p", args.top_p), ("--top-k", args.top_k), ("--seed", args.seed))
                 if value is not None]
        if given:
            flags = " / ".join(given)
            parser.error(f"{flags} {'is' if len(given) == 1 else 'are'} for sampling only; add --temperature > 0 "
                         f"(e.g. --temperature 0.7) to sample, or drop {flags} for greedy decoding.")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1] (1 = off); got {args.top_p}.")
    if args.top_k is not None and args.top_k < 0:
        parser.error(f"--top-k must be >= 0 (0 = off); got {args.top_k}.")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1; got {args.max_new_tokens}.")
    if args.max_nodes < 1:
        parser.error(f"--max-nodes must be >= 1 (the root; 1 = no draft tokens); got {args.max_nodes}.")
    names = drafter_names()
    if args.drafter not in names and not os.path.isdir(os.path.expanduser(args.drafter)):
        parser.error(f"--drafter {args.drafter}: not a drafter name or a directory; use one of {', '.join(names)}, "
                     "or a train/ checkpoint directory.")
    kind = registry.named_method(args.drafter).drafter
    if kind == registry.ASSISTANT_DRAFTER and not args.draft_path:
        parser.error(f"--drafter {registry.ASSISTANT_DRAFTER} needs --draft-path <hub id or local path of a causal LM "
                     "sharing the target's tokenizer, or a train/ checkpoint>.")


def _generate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="specdec generate", description="Stream one speculative generation.",
                                     epilog=GENERATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", help="user message (the chat template is applied when the tokenizer has one)")
    parser.add_argument("--target", default=None, help="hub id or local path (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--drafter", default=registry.DEFAULT_DRAFTER,
                        help=f"{' | '.join(drafter_names())} (as the bench's specdec:<name>; adaptive = "
                             f"{registry.RECOMMENDED_DRAFTER} with --adaptive), or a train/ checkpoint directory "
                             f"(default: {registry.DEFAULT_DRAFTER})")
    parser.add_argument("--draft-path", default=None,
                        help=f"the drafter's checkpoint or model (hub id or path); required by --drafter "
                             f"{registry.ASSISTANT_DRAFTER}")
    parser.add_argument("--verifier", default=registry.REFERENCE_VERIFIER, choices=list(registry.VERIFIERS),
                        help=f"{registry.REFERENCE_VERIFIER}: transformers' forward with a Cache and a 4D mask (the "
                             "reference, default); paged: the paged KV cache and its own attention kernels")
    parser.add_argument("--adaptive", action="store_true",
                        help="re-decide the node budget (up to --max-nodes) every step from the measured verify cost "
                             "(measured once per target and machine, then cached)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-nodes", type=int, default=16, help="draft tree node budget, root included")
    parser.add_argument("--temperature", type=float, default=0.0, help="> 0: sample at this temperature (default 0: "
                                                                       "greedy)")
    parser.add_argument("--top-p", type=float, default=None, help="sampling: nucleus mass (1 = off)")
    parser.add_argument("--top-k", type=int, default=None, help="sampling: keep the k most likely tokens (0 = off)")
    parser.add_argument("--seed", type=int, default=None, help="sampling: the RNG seed (same seed, same output)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--quantization", default=None, choices=["int8", "int4", "bf16"],
                        help="int8 / int4 linears (GGUF Q8_0 / Q4_1, their inputs quantized to 8 bits as llama.cpp "
                             "does), or bf16 (bfloat16 weights, float32 activations: the fast bfloat16 on a CPU); "
                             "a .gguf --target is served with its own quantized tensors")
    parser.add_argument("--raw", action="store_true", help="treat the prompt as raw completion text (no template)")
    args = parser.parse_args(argv)
    _check_generate_args(parser, args)

    from transformers import TextStreamer

    from specdec import SpecDecoder, models

    drafter, drafter_kwargs, adaptive = resolve_drafter(args.drafter, args.draft_path)
    model, tokenizer = models.load_target(args.target, dtype=args.dtype, quantization=args.quantization)
    decoder = SpecDecoder(model, tokenizer, drafter=drafter, drafter_kwargs=drafter_kwargs, verifier=args.verifier,
                          max_nodes=args.max_nodes, adaptive=adaptive or args.adaptive)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
                "seed": args.seed} if args.temperature > 0 else {}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = decoder.generate(prompt=args.prompt, chat=not args.raw, max_new_tokens=args.max_new_tokens,
                           streamer=streamer, **sampling)
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
    parser.add_argument("--quantization", default=None, choices=["int8", "int4", "bf16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--verifier", default=registry.REFERENCE_VERIFIER, help=" | ".join(registry.VERIFIERS))
    parser.add_argument("--remeasure", action="store_true", help="measure again even when a profile is cached")
    args = parser.parse_args(argv)

    import torch

    from specdec import models, profiler

    torch.set_num_threads(args.threads)
    model, _ = models.load_target(args.target, dtype=args.dtype, quantization=args.quantization)
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


def _kernels(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="specdec kernels",
        description="Build every C++ kernel now (a changed source builds anew) and say which serve this machine. "
                    "Sources: specdec/kernels/csrc/.")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
    args = parser.parse_args(argv)

    import os
    import time

    from specdec.kernels import build, cpu_gemm, greedy_head  # noqa: F401 - importing them makes their kernels

    if args.verbose:
        os.environ["SPECDEC_VERBOSE_BUILD"] = "1"
    os.environ.pop(build.REQUIRE_ENV, None)  # report every failure instead of stopping at the first
    for name in registry.VERIFIERS:  # the verifiers' own kernels (the paged one's attention)
        registry.verifier_class(name)
    print(f"sources: {build.CSRC}\nflags: {' '.join(build.CppKernel.flags())}\ncompiler: {build.compiler() or '-'}\n")
    unit = build.shipped()
    start = time.perf_counter()
    ok = unit.available()
    status = f"built ({time.perf_counter() - start:.1f} s)" if ok else f"FAILED: {unit.failure() or 'turned off'}"
    print(f"{unit.source}: {status}\n{unit.build_dir()}\n")
    for part in build.PARTS:
        print(f"  {part.part:<18} {part.purpose:<46} {'built' if ok else '-'}")
    return 0 if ok else 1


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
        if command == "kernels":
            return _kernels(rest)
        if command == "bench":
            from specdec import extras

            extras.require("bench", "specdec bench")
            from specdec.bench import app as bench

            sys.argv = ["specdec bench", *rest]
            bench.main()
            return 0
    except SpecdecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"unknown command {command!r}; use `specdec generate`, `specdec bench`, `specdec profile`, `specdec export` "
          "or `specdec kernels` (see specdec --help).", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
