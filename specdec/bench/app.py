"""``python -m specdec.bench``: speculative decoding vs the target's own ``generate``, side by side in one run.

    python -m specdec.bench                                   # default target, n-gram drafter, MT-Bench prompts
    python -m specdec.bench bench=demo drafter=none           # a quick look
    python -m specdec.bench bench.limit=10 bench.categories=[coding,math] tree=large bench.output=out.json
    python -m specdec.bench drafter=draft_model drafter.path=<small LM> target=custom target.name=<LM>

    python -m specdec.bench verifier=paged bench.batch_size=8 "bench.methods=[hf,specdec:ngram]"   # batched
    python -m specdec.bench "bench.methods=[hf,specdec:ngram,specdec:ngram@paged]"        # verifiers side by side

Methods (``bench.methods``): ``hf`` (``model.generate``, greedy: the reference every other method is timed and
token-compared against), ``hf_pld`` (with ``prompt_lookup_num_tokens``), ``hf_assisted`` (with ``assistant_model`` =
the draft model of ``drafter.path``), each optionally ``+fast`` (e.g. ``hf+fast``: the same ``model.generate`` with
specdec's float32 CPU linear kernel, :mod:`specdec.kernels.cpu_gemm`, which every ``specdec:*`` method uses: it shows how
much of a speedup is the kernel and how much is drafting), ``specdec:<drafter>`` (a :class:`specdec.SpecDecoder` with
that drafter's ``conf/drafter/<drafter>.yaml`` options, or the chosen ``drafter`` group's with its overrides), optionally
``specdec:<drafter>@<verifier>`` to use another verifier than the ``verifier`` group's, and ``+adaptive`` to
re-decide each request's node budget (up to ``tree.max_nodes``) every step from the measured cost profile and its
acceptance so far (e.g. ``specdec:ngram+adaptive``, ``specdec:ngram@paged+adaptive``). ``specdec:adaptive`` is
the recommended setting: ``specdec:hybrid+adaptive`` (n-gram + the EAGLE-style head's dynamic trees in one tree,
with the adaptive budget; ``conf/drafter/hybrid.yaml``).
For each prompt every method runs in turn (so slow drift of the machine hits all alike); only the generate call
is timed. Results: a progress bar, tables, and JSON at ``bench.output``. Greedy runs also record, for every output
that differs from ``hf``'s, the target's top-2 logit gap at the first differing token (``divergences``; see
:mod:`specdec.bench.divergence`): in bfloat16/float16 a near-tie the dtype cannot resolve, not a bug.

With ``bench.batch_size`` B > 1 the prompts are served as a batch: ``hf`` is ``model.generate`` on B prompts at a
time (left-padded), ``specdec:<drafter>`` is continuous batching over all prompts with up to B running at once
(``verifier=paged``), ``vllm*`` is vLLM's engine with ``max_num_seqs`` B, ``llamacpp*`` llama.cpp's
``llama-server`` with ``--parallel`` B (:mod:`specdec.bench.peer_llamacpp`). Each method's whole run is timed and
throughput is total new tokens / total time; per-category timing does not exist in a batch, so the category table
shows tau only. ``bench.rounds`` R splits the prompts into R groups and runs every method on a group before the
next, so methods alternate as they do prompt by prompt at batch 1:

    python -m specdec.bench verifier=paged bench.batch_size=8 bench.limit=32 bench.rounds=4 \
        "bench.methods=[hf,specdec:none,vllm,vllm:ngram]"
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextlib import ExitStack, closing
from dataclasses import dataclass

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from specdec import models, registry
from specdec.algorithms.acceptance import LOSSY
from specdec.bench import config, divergence, peer, peer_llamacpp, quality, report
from specdec.bench import plots as plots_mod
from specdec.bench.prompts import DEFAULT_PROMPTS, Prompt, load_prompts
from specdec.errors import ConfigError, PromptError, SpecdecError
from specdec.generate import SpecDecoder
from specdec.kernels import cpu_gemm
from specdec.models import families, quantize

CONF_PATH = str(config.CONF_DIR)
HF_METHODS = ("hf", "hf_pld", "hf_assisted")

# a method: (input ids [1, T], seed) -> (new tokens, (verify steps, drafted, accepted, accepted by depth) or None
# for HF methods)
# (tokens, counts) or, for a runner that times its own generate call (the peer engine), (tokens, counts, time_s)
Runner = Callable[[torch.Tensor, int], tuple]
# a batched method: (every prompt's input ids, seed) -> one (new tokens, counts) per prompt, or (new tokens, counts,
# time share) from a runner that times its own batch (the peer engine)
BatchRunner = Callable[[list[torch.Tensor], int], list[tuple]]


def default_methods(drafter: str) -> list[str]:
    """``[hf, hf+fast, hf_pld, (hf_assisted), specdec:none, specdec:<drafter>]``; hf_assisted only for a draft
    model."""
    assisted = ["hf_assisted"] if drafter == registry.ASSISTANT_DRAFTER else []
    methods = ["hf", "hf+fast", "hf_pld", *assisted, f"specdec:{registry.NO_DRAFTER}"]
    return methods + ([f"specdec:{drafter}"] if drafter != registry.NO_DRAFTER else [])


@dataclass(frozen=True)
class MethodSpec:
    """A bench method's drafter and verifier configs (both None for HF methods)."""

    drafter: DictConfig | None
    verifier: DictConfig | None
    adaptive: bool = False  # "+adaptive": node budgets re-decided per step from the cost profile
    fast_linears: bool = False  # "+fast" on an HF method: model.generate with specdec's linear kernel (cpu_gemm)
    peer: bool = False  # "vllm[:<speculation>]" (vLLM's CPU engine, bench.peer_*) or "llamacpp[:<spec type>]"


def method_drafters(cfg: DictConfig) -> dict[str, MethodSpec]:
    """The methods to run, each with its drafter and verifier config, checked before any model loads."""
    methods = list(cfg.bench.methods) if cfg.bench.methods is not None else default_methods(cfg.drafter.name)
    if len(set(methods)) != len(methods):
        raise ConfigError(f"bench.methods lists a method twice: {methods}.")
    if report.REFERENCE not in methods:
        raise ConfigError(f"bench.methods must include {report.REFERENCE!r}: speedups and token-for-token checks are "
                          f"measured against it. Add it, e.g. bench.methods=[hf,{','.join(methods)}].")
    out = {}
    for m in methods:
        if peer.is_peer(m) or peer_llamacpp.is_llamacpp(m):
            if sampling_kwargs(cfg.bench):
                raise ConfigError(f"{m} runs greedy only; drop it from bench.methods for a sampled run.")
            out[m] = MethodSpec(None, None, peer=True)
            continue
        if hf_method(m):
            plus, modifier = m.partition("+")[1:]
            if plus and modifier != "fast":
                raise ConfigError(f"unknown modifier +{modifier} in bench method {m!r}; HF methods take +fast "
                                  "(model.generate with specdec's CPU linear kernel).")
            out[m] = MethodSpec(None, None, fast_linears=bool(plus))
            continue
        kind, _, rest = m.partition(":")
        name = rest.split("@")[0]
        if name in registry.METHODS:  # a named method, e.g. adaptive = the recommended drafter + the adaptive budget
            named = registry.METHODS[name]
            rest = rest.replace(name, named.drafter, 1) + ("+adaptive" if named.adaptive else "")
        rest, plus, modifier = rest.partition("+")
        if plus and modifier != "adaptive":
            raise ConfigError(f"unknown modifier +{modifier} in bench method {m!r}; the only one is +adaptive.")
        drafter, _, verifier = rest.partition("@")
        if kind == "specdec" and drafter:
            node = cfg.drafter if drafter == cfg.drafter.name else config.load_drafter_config(drafter)
            config.check_drafter(node)
            verifier = verifier or cfg.verifier.name
            vnode = cfg.verifier if verifier == cfg.verifier.name else config.load_verifier_config(verifier)
            out[m] = MethodSpec(node, vnode, adaptive=bool(plus))
        else:
            raise ConfigError(f"unknown bench method {m!r}; use {list(HF_METHODS)} (optionally +fast) or "
                              f"specdec:<drafter>[@<verifier>][+adaptive] with a drafter from "
                              f"{config.group_options('drafter')} (or a named method: {sorted(registry.METHODS)}), "
                              f"or a peer engine's: vllm[:<speculation>], llamacpp[:<spec type>].")
    b = cfg.bench
    peer_llamacpp.check([m for m in out if peer_llamacpp.is_llamacpp(m)], b.llamacpp_dir, b.llamacpp_gguf,
                        b.llamacpp_draft)
    if any(peer.is_peer(m) for m in out):
        peer.engine_dtype(cfg.target.dtype, cfg.target.get("quantization"))  # refuses int8 / int4 before the load
    if any(hf_method(m) == "hf_assisted" for m in out) and cfg.drafter.name != registry.ASSISTANT_DRAFTER:
        raise ConfigError(f"hf_assisted needs a draft model: set drafter={registry.ASSISTANT_DRAFTER} "
                          "drafter.path=<hub id or path>.")
    if cfg.bench.batch_size > 1:
        check_batched(out)
    return out


def hf_method(method: str) -> str | None:
    """The transformers method a bench method runs (``hf_pld+fast`` -> ``hf_pld``), or None for specdec ones."""
    base = method.partition("+")[0]
    return base if base in HF_METHODS else None


def check_batched(methods: dict[str, MethodSpec]) -> None:
    """With bench.batch_size > 1: only ``hf``, paged ``specdec:*``, ``vllm*`` and ``llamacpp*`` methods can serve a
    batch."""
    for m, spec in methods.items():
        if spec.peer:  # the peer engines batch too (max_num_seqs / --parallel = bench.batch_size)
            continue
        if hf_method(m) not in (None, "hf"):
            raise ConfigError(f"{m} runs one request at a time in transformers; with bench.batch_size > 1 use "
                              "bench.methods=[hf,specdec:<drafter>].")
        if spec.verifier is not None and not registry.verifier_class(spec.verifier.name).capabilities.batching:
            batching = registry.batching_verifier()
            raise ConfigError(f"{m} uses verifier={spec.verifier.name}, which serves one request at a time; "
                              f"batched runs need verifier={batching} (or the method specdec:<drafter>@{batching}).")


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


def hf_batch_runner(model, max_new_tokens: int, sampling: dict, batch_size: int) -> BatchRunner:
    """``model.generate`` on ``batch_size`` prompts at a time, left-padded; each row cut after its first EOS."""
    gen = model.generation_config
    eos = gen.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    pad = gen.pad_token_id if gen.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    options = sampling or {"do_sample": False}

    def run(inputs: list[torch.Tensor], seed: int):
        torch.manual_seed(seed)
        results = []
        starts = range(0, len(inputs), batch_size)
        for start in tqdm(starts, desc=f"hf batches of {batch_size}", unit="batch", file=sys.stderr,
                          disable=len(starts) < 2):
            chunk = inputs[start:start + batch_size]
            width = max(ids.shape[1] for ids in chunk)
            ids = torch.full((len(chunk), width), pad if pad is not None else 0, dtype=torch.long,
                             device=chunk[0].device)
            mask = torch.zeros_like(ids)
            for row, x in enumerate(chunk):
                ids[row, width - x.shape[1]:] = x[0]
                mask[row, width - x.shape[1]:] = 1
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                 pad_token_id=pad, **options)
            for row in out[:, width:].tolist():
                cut = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
                results.append((row[:cut], None))
        return results

    return run


def specdec_batch_runner(decoder: SpecDecoder, max_new_tokens: int, sampling: dict,
                         batch_size: int) -> BatchRunner:
    """Continuous batching over all the prompts, ``batch_size`` running at once."""

    def run(inputs: list[torch.Tensor], seed: int):
        outs = decoder.generate_batch(inputs, max_new_tokens=max_new_tokens, seed=seed,
                                      max_batch_size=batch_size, progress=len(inputs) > batch_size, **sampling)
        return [(list(o.new_tokens), (o.stats.verify_steps, sum(o.stats.drafted), sum(o.stats.accepted),
                                      tuple(o.stats.accepted_by_depth))) for o in outs]

    return run


def specdec_runner(decoder: SpecDecoder, max_new_tokens: int, sampling: dict) -> Runner:
    """A :class:`SpecDecoder` built once and reused for every prompt."""

    def run(ids: torch.Tensor, seed: int):
        out = decoder.generate(ids, max_new_tokens=max_new_tokens, seed=seed, **sampling)
        s = out.stats
        return list(out.new_tokens), (s.verify_steps, sum(s.drafted), sum(s.accepted), tuple(s.accepted_by_depth))

    return run


def build_runners(cfg: DictConfig, model, tokenizer, drafters: dict[str, MethodSpec]) -> dict[str, Runner]:
    """One runner per method, all sharing the loaded target (batched runners when bench.batch_size > 1)."""
    n = cfg.bench.max_new_tokens
    sampling = sampling_kwargs(cfg.bench)
    batch = cfg.bench.batch_size
    runners: dict[str, Runner] = {}
    for method, spec in drafters.items():
        if spec.peer:  # added by run_bench, once the prompts' lengths are known
            continue
        node = spec.drafter
        base = hf_method(method)
        fast_modules = [model]  # "+fast": the modules whose linears take specdec's kernel
        if base == "hf" and batch > 1:
            runners[method] = hf_batch_runner(model, n, sampling, batch)
        elif base == "hf":
            runners[method] = hf_runner(model, n, sampling)
        elif base == "hf_pld":
            runners[method] = hf_runner(model, n, sampling, prompt_lookup_num_tokens=cfg.bench.pld_tokens)
        elif base == "hf_assisted":
            draft, _ = models.load_target(cfg.drafter.path, dtype=cfg.drafter.dtype, device=cfg.target.device)
            runners[method] = hf_runner(model, n, sampling, assistant_model=draft)
            fast_modules.append(draft)
        else:
            kwargs = config.isolate_caches(node.name, config.drafter_kwargs(node), method)
            decoder = SpecDecoder(model, tokenizer, drafter=node.name, drafter_kwargs=kwargs,
                                  verifier=spec.verifier.name, verifier_kwargs=config.verifier_kwargs(spec.verifier),
                                  acceptance=cfg.acceptance.name, max_nodes=cfg.tree.max_nodes, max_batch_size=batch,
                                  adaptive=spec.adaptive)
            runners[method] = (specdec_batch_runner(decoder, n, sampling, batch) if batch > 1
                               else specdec_runner(decoder, n, sampling))
        if spec.fast_linears:
            runners[method] = with_fast_linears(runners[method], *fast_modules)
    return runners


def with_fast_linears(run: Runner, *modules) -> Runner:
    """``run`` with specdec's CPU linear kernel (:mod:`specdec.kernels.cpu_gemm`) in ``modules``: the ``+fast`` HF
    methods, which show how much of specdec's speed comes from the kernel rather than from drafting."""

    def wrapped(*args):
        with cpu_gemm.fast_linears(*modules, enabled=all(cpu_gemm.wanted(m) for m in modules)):
            return run(*args)

    return wrapped


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


def warmup_ids(ids: torch.Tensor) -> torch.Tensor:
    """What methods warm up on instead of the prompt ``ids [1, T]``: its first 8 tokens (with a chat template, its
    header), not a measured prompt itself: a drafter that learns from earlier requests (a suffix cache) would
    otherwise have seen that prompt's answer before it is measured."""
    return ids[:, :8]


def run_interleaved(runners: dict[str, Runner], prompts: list[Prompt], inputs: list[torch.Tensor],
                    warmup: int = 1, seed: int = 0) -> list[report.Measurement]:
    """Warm every method up (:func:`warmup_ids`), then for each prompt run every method in turn, timing generate.

    Prompt i is generated with seed ``seed + i`` by every method (it matters only when sampling).
    """
    for run in runners.values():
        for _ in range(warmup):
            run(warmup_ids(inputs[0]), seed)
    measurements = []
    sums = {m: [0, 0.0] for m in runners}  # running new tokens, seconds
    bar = tqdm(list(zip(prompts, inputs)), desc="prompts (tokens/s)", unit="prompt", file=sys.stderr)
    for i, (p, ids) in enumerate(bar):
        for method, run in runners.items():
            start = time.perf_counter()
            got = run(ids, seed + i)
            elapsed = time.perf_counter() - start
            tokens, counts = got[:2]
            elapsed = got[2] if len(got) > 2 else elapsed  # a peer engine times its own call
            steps, drafted, accepted, depth = counts if counts is not None else (None, 0, 0, ())
            measurements.append(report.Measurement(method, i, p.category, tuple(tokens), elapsed, steps,
                                                   drafted, accepted, depth))
            sums[method][0] += len(tokens)
            sums[method][1] += elapsed
        bar.set_postfix({m: f"{t / s:.1f}" for m, (t, s) in sums.items() if s > 0})
    bar.close()
    return measurements


def run_batched(runners: dict[str, BatchRunner], prompts: list[Prompt], inputs: list[torch.Tensor],
                batch_size: int, warmup: int = 1, seed: int = 0, rounds: int = 1) -> list[report.Measurement]:
    """Warm each method up on one small batch, then time each method's run over the prompts: in ``rounds``
    consecutive groups of them, every method running a group before the next group starts (methods alternate, so
    the machine's drift hits all alike; ``rounds=1``: each method's whole run at once).

    A request's measurement carries its group's time divided evenly (a batch has no per-request time), or the share
    a peer engine timed itself; totals give the throughput. Request i samples with seed ``seed + i`` in specdec;
    HF samples from one stream.
    """
    for run in runners.values():
        for _ in range(warmup):
            run([warmup_ids(ids) for ids in inputs[:min(2, batch_size)]], seed)
    measurements = []
    size = -(-len(inputs) // max(1, min(rounds, len(inputs))))
    groups = [range(lo, min(lo + size, len(inputs))) for lo in range(0, len(inputs), size)]
    for g, group in enumerate(groups):
        for method, run in runners.items():
            where = f", group {g + 1} of {len(groups)}" if len(groups) > 1 else ""
            print(f"{method}: {len(group)} requests, batch size {batch_size}{where}", file=sys.stderr)
            start = time.perf_counter()
            results = run([inputs[i] for i in group], seed + group.start)
            share = (time.perf_counter() - start) / len(group)
            for i, got in zip(group, results):
                tokens, counts = got[:2]
                steps, drafted, accepted, depth = counts if counts is not None else (None, 0, 0, ())
                measurements.append(report.Measurement(method, i, prompts[i].category, tuple(tokens),
                                                       got[2] if len(got) > 2 else share, steps, drafted, accepted,
                                                       depth))
    return measurements


def bench_prompts(b: DictConfig) -> tuple[list[Prompt], str]:
    """The selected prompts and their source; a note when the default file is absent and built-ins stand in."""
    prompts, source = load_prompts(b.prompts, b.categories, b.limit, b.all_turns)
    if source == "built-in":
        print(f"note: {DEFAULT_PROMPTS} not found; using {len(prompts)} built-in prompts. "
              "Set bench.prompts=<file.jsonl> for a real benchmark.", file=sys.stderr)
    return prompts, source


def start_peers(cfg: DictConfig, drafters: dict[str, MethodSpec], inputs: list[torch.Tensor],
                stack: ExitStack) -> dict[str, peer.PeerEngine]:
    """The peer engines of the ``vllm*`` and ``llamacpp*`` methods, method -> engine, closed with ``stack``."""
    b = cfg.bench
    max_len = max(x.shape[1] for x in inputs) + b.max_new_tokens + 16
    vllm = [m for m, spec in drafters.items() if spec.peer and peer.is_peer(m)]
    llama = [m for m, spec in drafters.items() if spec.peer and peer_llamacpp.is_llamacpp(m)]
    engines: dict[str, peer.PeerEngine] = {}
    if vllm:
        server = stack.enter_context(closing(peer.PeerServer(
            b.peer_python, vllm, models.resolve_target_path(cfg.target.name),
            peer.engine_dtype(cfg.target.dtype, cfg.target.get("quantization")), max_len,
            script=b.peer_script, log=b.peer_log, max_num_seqs=b.batch_size)))
        engines.update(dict.fromkeys(vllm, server))
    if llama:
        target = models.resolve_target_path(cfg.target.name)
        gguf = peer_llamacpp.gguf_type(b.llamacpp_gguf, cfg.target.dtype, cfg.target.get("quantization"), target)
        servers = stack.enter_context(closing(peer_llamacpp.LlamaCppPeer(
            llama, target, gguf, max_len, root=b.llamacpp_dir, threads=b.threads, batch_size=b.batch_size,
            draft=b.llamacpp_draft, target_name=cfg.target.name)))
        engines.update(dict.fromkeys(llama, servers))
    return engines


def run_bench(cfg: DictConfig) -> dict:
    """Run the benchmark a composed ``conf/config.yaml`` describes; print tables, write and return the JSON."""
    cfg = config.validate(cfg)
    b = cfg.bench
    drafters = method_drafters(cfg)  # every config check before the (slow) model load
    prompts, source = bench_prompts(b)
    torch.set_num_threads(b.threads)
    model, tokenizer = models.load_target(cfg.target.name, dtype=cfg.target.dtype, device=cfg.target.device,
                                          quantization=cfg.target.quantization)
    if cfg.target.declare_family:  # checking a family outside the support matrix: the mismatches column says
        families.register_family(model.config.model_type, paged=True)
    runners = build_runners(cfg, model, tokenizer, drafters)
    inputs = encode(prompts, tokenizer, model, b.chat, b.max_new_tokens)
    with ExitStack() as stack:
        for m, engine in start_peers(cfg, drafters, inputs, stack).items():
            runners[m] = (engine.batch_runner if b.batch_size > 1 else engine.runner)(m, b.max_new_tokens)
        runners = {m: runners[m] for m in drafters}  # every method in bench.methods order
        with torch.inference_mode():
            if b.batch_size > 1:
                measurements = run_batched(runners, prompts, inputs, b.batch_size, b.warmup, b.seed, b.rounds)
            else:
                measurements = run_interleaved(runners, prompts, inputs, b.warmup, b.seed)
    sampling = sampling_kwargs(b)
    runs = report.summarize(measurements, list(runners), sampled=bool(sampling), batch_size=b.batch_size)
    if not sampling:  # greedy: where each mismatch starts and how near a tie the target was there
        divergence.add_divergences(runs, measurements, model, inputs, [p.question_id for p in prompts])
    else:  # sampled outputs differ by design, as mismatches says
        for run in runs:
            run["divergences"] = run["max_divergence_gap"] = None
    for run in runs:  # which drafter options, verifier and rule each speculative method ran with
        spec = drafters[run["method"]]
        if spec.drafter is not None:
            run["drafter"] = OmegaConf.to_container(spec.drafter, resolve=True)
            run["verifier"] = OmegaConf.to_container(spec.verifier, resolve=True)
            run["acceptance"] = cfg.acceptance.name
            run["adaptive"] = spec.adaptive
            run["lossy"] = cfg.acceptance.name in LOSSY
    variant = quantize.quantization_of(model) or cfg.target.dtype
    result = {
        "quality": quality.for_bench(cfg.target.name, model, variant) if b.quality and variant != "float32"
        else None,
        "target": cfg.target.name or models.DEFAULT_TARGET, "dtype": cfg.target.dtype,
        "quantization": quantize.quantization_of(model),
        "device": cfg.target.device, "threads": b.threads, "prompts": len(prompts), "prompts_file": source,
        "max_new_tokens": b.max_new_tokens, "batch_size": b.batch_size, "sampling": sampling or None, "runs": runs,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if b.save_tokens:
        result.update(report.tokens_record(measurements, prompts, inputs, runs))
        result["target_path"] = models.resolve_target_path(cfg.target.name)
    path = report.write_json(b.output, result)
    plots = plots_mod.write_plots(result, path) if b.plots else []
    print(report.text_report(result) + f"\n\nwrote {path}" + "".join(f"\nwrote {p}" for p in plots))
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
