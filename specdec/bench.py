"""``python -m specdec.bench``: speculative decoding vs the target's own ``generate``, side by side in one run.

    python -m specdec.bench                                   # default target, n-gram drafter, MT-Bench prompts
    python -m specdec.bench bench=demo drafter=none           # a quick look
    python -m specdec.bench bench.limit=10 bench.categories=[coding,math] tree=large bench.output=out.json
    python -m specdec.bench drafter=draft_model drafter.path=<small LM> target=custom target.name=<LM>

Methods (``bench.methods``): ``hf`` (``model.generate``, greedy: the reference every other method is timed and
token-compared against), ``hf_pld`` (with ``prompt_lookup_num_tokens``), ``hf_assisted`` (with ``assistant_model`` =
the draft model of ``drafter.path``), ``specdec:<drafter>`` (a :class:`specdec.SpecDecoder` with that drafter's
``conf/drafter/<drafter>.yaml`` options, or the chosen ``drafter`` group's with its overrides).
For each prompt every method runs in turn (so slow drift of the machine hits all alike); only the generate call
is timed. Results: a progress bar, tables, and JSON at ``bench.output``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from specdec import config, models, report
from specdec.acceptance import LOSSY
from specdec.errors import ConfigError, PromptError, SpecdecError
from specdec.generate import SpecDecoder
from specdec.prompts import DEFAULT_PROMPTS, Prompt, load_prompts

CONF_PATH = str(Path(__file__).resolve().parent.parent / "conf")
HF_METHODS = ("hf", "hf_pld", "hf_assisted")

# a method: (input ids [1, T], seed) -> (new tokens, (verify steps, drafted, accepted) or None for HF methods)
Runner = Callable[[torch.Tensor, int], tuple[list[int], "tuple[int, int, int] | None"]]


def default_methods(drafter: str) -> list[str]:
    """``[hf, hf_pld, (hf_assisted), specdec:none, specdec:<drafter>]``; hf_assisted only for a draft model."""
    methods = ["hf", "hf_pld"] + (["hf_assisted"] if drafter == "draft_model" else []) + ["specdec:none"]
    return methods + ([f"specdec:{drafter}"] if drafter != "none" else [])


def method_drafters(cfg: DictConfig) -> dict[str, DictConfig]:
    """The methods to run, each with its drafter config (None for HF methods), checked before any model loads."""
    methods = list(cfg.bench.methods) if cfg.bench.methods is not None else default_methods(cfg.drafter.name)
    if len(set(methods)) != len(methods):
        raise ConfigError(f"bench.methods lists a method twice: {methods}.")
    if report.REFERENCE not in methods:
        raise ConfigError(f"bench.methods must include {report.REFERENCE!r}: speedups and token-for-token checks are "
                          f"measured against it. Add it, e.g. bench.methods=[hf,{','.join(methods)}].")
    out = {}
    for m in methods:
        kind, _, drafter = m.partition(":")
        if m in HF_METHODS:
            out[m] = None
        elif kind == "specdec" and drafter:
            node = cfg.drafter if drafter == cfg.drafter.name else config.load_drafter_config(drafter)
            config.check_drafter(node)
            out[m] = node
        else:
            raise ConfigError(f"unknown bench method {m!r}; use {list(HF_METHODS)} or specdec:<drafter> with a "
                              f"drafter from {config.group_options('drafter')}.")
    if "hf_assisted" in out and cfg.drafter.name != "draft_model":
        raise ConfigError("hf_assisted needs a draft model: set drafter=draft_model drafter.path=<hub id or path>.")
    return out


def sampling_kwargs(b: DictConfig) -> dict:
    """``model.generate`` / ``SpecDecoder.generate`` sampling options; empty for greedy (temperature 0)."""
    if not b.temperature:
        return {}
    return {"do_sample": True, "temperature": float(b.temperature), "top_k": int(b.top_k), "top_p": float(b.top_p)}


def hf_runner(model, max_new_tokens: int, sampling: dict, **extra) -> Runner:
    """``model.generate``, greedy or sampled (extra: ``prompt_lookup_num_tokens`` or ``assistant_model``)."""
    gen = model.generation_config
    eos = gen.eos_token_id
    pad = gen.pad_token_id if gen.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    options = sampling or {"do_sample": False}

    def run(ids: torch.Tensor, seed: int):
        torch.manual_seed(seed)  # transformers samples from the global RNG
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             eos_token_id=eos, pad_token_id=pad, **options, **extra)
        return out[0, ids.shape[1]:].tolist(), None

    return run


def specdec_runner(decoder: SpecDecoder, max_new_tokens: int, sampling: dict) -> Runner:
    """A :class:`SpecDecoder` built once and reused for every prompt."""

    def run(ids: torch.Tensor, seed: int):
        out = decoder.generate(ids, max_new_tokens=max_new_tokens, seed=seed, **sampling)
        s = out.stats
        return list(out.new_tokens), (s.verify_steps, sum(s.drafted), sum(s.accepted))

    return run


def build_runners(cfg: DictConfig, model, tokenizer, drafters: dict) -> dict[str, Runner]:
    """One runner per method, all sharing the loaded target."""
    n = cfg.bench.max_new_tokens
    sampling = sampling_kwargs(cfg.bench)
    runners: dict[str, Runner] = {}
    for method, node in drafters.items():
        if method == "hf":
            runners[method] = hf_runner(model, n, sampling)
        elif method == "hf_pld":
            runners[method] = hf_runner(model, n, sampling, prompt_lookup_num_tokens=cfg.bench.pld_tokens)
        elif method == "hf_assisted":
            draft, _ = models.load_target(cfg.drafter.path, dtype=cfg.drafter.dtype, device=cfg.target.device)
            runners[method] = hf_runner(model, n, sampling, assistant_model=draft)
        else:
            decoder = SpecDecoder(model, tokenizer, drafter=node.name, drafter_kwargs=config.drafter_kwargs(node),
                                  verifier=cfg.verifier.name, acceptance=cfg.acceptance.name,
                                  max_nodes=cfg.tree.max_nodes)
            runners[method] = specdec_runner(decoder, n, sampling)
    return runners


def encode(prompts: list[Prompt], tokenizer, model, chat: bool, max_new_tokens: int) -> list[torch.Tensor]:
    """``[1, T]`` input ids per prompt (chat template for turns when ``chat``), checked against the context size."""
    ctx = models.context_length(model)
    out = []
    for p in prompts:
        ids = models.encode_prompt(tokenizer, p.text, chat=chat and not p.raw).to(model.device)
        if ctx is not None and ids.shape[1] + max_new_tokens > ctx:
            raise PromptError(f"prompt {p.question_id!r} has {ids.shape[1]} tokens; with bench.max_new_tokens="
                              f"{max_new_tokens} it exceeds the target's context of {ctx}. Lower "
                              "bench.max_new_tokens or drop the prompt (bench.categories / bench.limit).")
        out.append(ids)
    return out


def run_interleaved(runners: dict[str, Runner], prompts: list[Prompt], inputs: list[torch.Tensor],
                    warmup: int = 1, seed: int = 0) -> list[report.Measurement]:
    """Warm every method up on the first prompt, then for each prompt run every method in turn, timing generate.

    Prompt i is generated with seed ``seed + i`` by every method (it matters only when sampling).
    """
    for run in runners.values():
        for _ in range(warmup):
            run(inputs[0], seed)
    measurements = []
    sums = {m: [0, 0.0] for m in runners}  # running new tokens, seconds
    bar = tqdm(list(zip(prompts, inputs)), desc="prompts (tokens/s)", unit="prompt", file=sys.stderr)
    for i, (p, ids) in enumerate(bar):
        for method, run in runners.items():
            start = time.perf_counter()
            tokens, counts = run(ids, seed + i)
            elapsed = time.perf_counter() - start
            steps, drafted, accepted = counts if counts is not None else (None, 0, 0)
            measurements.append(report.Measurement(method, i, p.category, tuple(tokens), elapsed, steps,
                                                   drafted, accepted))
            sums[method][0] += len(tokens)
            sums[method][1] += elapsed
        bar.set_postfix({m: f"{t / s:.1f}" for m, (t, s) in sums.items() if s > 0})
    bar.close()
    return measurements


def bench_prompts(b: DictConfig) -> tuple[list[Prompt], str]:
    """The selected prompts and their source; a note when the default file is absent and built-ins stand in."""
    prompts, source = load_prompts(b.prompts, b.categories, b.limit, b.all_turns)
    if source == "built-in":
        print(f"note: {DEFAULT_PROMPTS} not found; using {len(prompts)} built-in prompts. "
              "Set bench.prompts=<file.jsonl> for a real benchmark.", file=sys.stderr)
    return prompts, source


def run_bench(cfg: DictConfig) -> dict:
    """Run the benchmark a composed ``conf/config.yaml`` describes; print tables, write and return the JSON."""
    cfg = config.validate(cfg)
    b = cfg.bench
    drafters = method_drafters(cfg)  # every config check before the (slow) model load
    prompts, source = bench_prompts(b)
    torch.set_num_threads(b.threads)
    model, tokenizer = models.load_target(cfg.target.name, dtype=cfg.target.dtype, device=cfg.target.device)
    runners = build_runners(cfg, model, tokenizer, drafters)
    inputs = encode(prompts, tokenizer, model, b.chat, b.max_new_tokens)
    with torch.inference_mode():
        measurements = run_interleaved(runners, prompts, inputs, b.warmup, b.seed)
    sampling = sampling_kwargs(b)
    runs = report.summarize(measurements, list(runners), sampled=bool(sampling))
    for run in runs:  # which drafter options and rule each speculative method ran with
        if drafters[run["method"]] is not None:
            run["drafter"] = OmegaConf.to_container(drafters[run["method"]], resolve=True)
            run["acceptance"] = cfg.acceptance.name
            run["lossy"] = cfg.acceptance.name in LOSSY
    result = {
        "target": cfg.target.name or models.DEFAULT_TARGET, "dtype": cfg.target.dtype,
        "device": cfg.target.device, "threads": b.threads, "prompts": len(prompts), "prompts_file": source,
        "max_new_tokens": b.max_new_tokens, "sampling": sampling or None, "runs": runs, "config": OmegaConf.to_container(cfg, resolve=True),
    }
    path = report.write_json(b.output, result)
    print(report.text_report(result) + f"\n\nwrote {path}")
    return result


def _fail(e: SpecdecError) -> None:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


@hydra.main(config_path=CONF_PATH, config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run_bench(cfg)
    except SpecdecError as e:
        _fail(e)


def main() -> None:
    """Console entry: check the command line's keys first (a clear message naming the valid keys), then Hydra."""
    try:
        config.check_overrides(sys.argv[1:])
    except SpecdecError as e:
        _fail(e)
    _hydra_main()


if __name__ == "__main__":
    main()
