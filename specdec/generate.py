"""``generate()``: speculative decoding next to transformers, with stopping, streaming and statistics.

>>> out = specdec.generate("HuggingFaceTB/SmolLM2-135M-Instruct", prompt="Hi!", drafter="ngram",
...                        max_new_tokens=64)                                      # doctest: +SKIP
>>> out.text, out.stats.tau                                                        # doctest: +SKIP
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Sequence
from contextlib import ExitStack

import torch
from tqdm import tqdm

from specdec import models, registry
from specdec.algorithms.acceptance import LOSSY, get_rule
from specdec.algorithms.adaptive import AdaptiveBudget, Calibrator
from specdec.algorithms.cost import CostProfile
from specdec.algorithms.loop import decode
from specdec.algorithms.sampling import SamplingParams
from specdec.algorithms.stopping import Stopper
from specdec.bench import profiler
from specdec.errors import PromptError, SpecdecError, VocabularyMismatchError
from specdec.models import checkpoint, cpu_gemm
from specdec.protocols import check_capabilities
from specdec.serving.engine import BatchEngine, DrafterPool
from specdec.types import GenerationOutput, GenerationStats

DEFAULT_MAX_NODES = 16


class SpecDecoder:
    """A target, a drafter, a verifier and an acceptance rule, ready to generate many times.

    target: a transformers causal LM, a hub id, a local path, or None for the default target.
    drafter: a config name (``none``, ``ngram``, ``draft_model``, ``eagle``, ``medusa``, ``layerskip``), the
    directory of a checkpoint a ``train/`` job wrote (its kind is read from it), or a Drafter object;
    ``drafter_kwargs`` go to the drafter's constructor. adaptive: re-decide each request's node budget (up to
    ``max_nodes``) before every step from the measured cost profile (``cost_profile``, or the cached / freshly
    measured one for this target and machine, see :mod:`specdec.bench.profiler`) and the request's acceptance so far
    (:mod:`specdec.algorithms.adaptive`); a drafter that scores its nodes gets each step's tree cut to the nodes worth their
    verify cost. Outputs are unchanged, only speed. fast_linears: run the target's (and the drafter's) float32
    linear layers on the faster CPU kernel of :mod:`specdec.models.cpu_gemm` (oneDNN on reordered weights, a second
    copy of them in memory); None = on for a float32 model on CPU.
    """

    def __init__(self, target=None, tokenizer=None, *, drafter="ngram", verifier: str = "hf",
                 acceptance: str | None = None, max_nodes: int = DEFAULT_MAX_NODES, dtype=None,
                 drafter_kwargs: dict | None = None, fast_linears: bool | None = None,
                 verifier_kwargs: dict | None = None, max_batch_size: int = 8, adaptive: bool = False,
                 cost_profile: CostProfile | None = None) -> None:
        if target is None or isinstance(target, str):
            target, loaded_tok = models.load_target(target, dtype=dtype or "float32")
            tokenizer = tokenizer or loaded_tok
        self.target = target
        self.tokenizer = tokenizer
        if drafter is None:
            drafter = "none"
        self._drafter_spec = None  # (kind, kwargs): how to build one more drafter for batched requests
        if isinstance(drafter, str) and checkpoint.is_checkpoint(drafter):  # a trained drafter's directory
            kind = checkpoint.read_meta(drafter)["kind"]
            self._drafter_spec = (kind, {"path": drafter, **(drafter_kwargs or {})})
        elif isinstance(drafter, str):
            self._drafter_spec = (drafter, dict(drafter_kwargs or {}))
        elif drafter_kwargs:
            raise SpecdecError("drafter_kwargs apply to a drafter given by name; configure the object directly.")
        if self._drafter_spec is not None:
            drafter = registry.build_drafter(self._drafter_spec[0], target, tokenizer, **self._drafter_spec[1])
        self.drafter = drafter
        self.verifier = registry.build_verifier(verifier, target, **(verifier_kwargs or {}))
        self.max_batch_size = max_batch_size
        self.adaptive = adaptive
        self.cost_profile = cost_profile
        self.calibrator = Calibrator()  # the drafter's confidence calibration, shared by this decoder's requests
        self.fast_linears = cpu_gemm.wanted(target) if fast_linears is None else fast_linears
        if adaptive and cost_profile is None:
            self.cost_profile, _, _ = profiler.load_or_measure(
                target, verifier if isinstance(verifier, str) else "hf", fast_linears=self.fast_linears,
                screen_greedy=getattr(self.verifier, "greedy_head", None) is not None)
        if acceptance is not None:
            get_rule(acceptance)  # an unknown name fails now, not at the first generate()
        self.acceptance = acceptance  # None: greedy, or rejection when sampling
        if max_nodes < 1:
            raise SpecdecError(f"max_nodes must be >= 1 (the root); got {max_nodes}.")
        self.max_nodes = max_nodes
        check_capabilities(self.drafter, verifier_gives_hidden=getattr(self.verifier, "gives_hidden", False),
                           rule_needs_probs=False)
        check_vocabulary(self.drafter, target)

    def generate(self, input_ids=None, *, prompt=None, chat: bool = True, max_new_tokens: int = 128,
                 eos_token_id="default", stop_strings: str | Sequence[str] | None = None, streamer=None,
                 do_sample: bool = False, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None,
                 max_batch_size: int | None = None) -> GenerationOutput | list[GenerationOutput]:
        """Generate up to ``max_new_tokens`` tokens after ``input_ids [1, T]`` (or ``prompt`` text).

        Stops like ``model.generate``: at EOS (kept), at a stop string (the completing token kept), or at exactly
        ``max_new_tokens``. ``streamer`` (e.g. a ``TextStreamer``) gets the prompt, then each token, then ``end()``.
        Sampling (``do_sample=True``) warps like transformers (temperature, top_k, top_p; unset values come from the
        target's generation config) and is reproducible for a fixed ``seed``.

        A batch of prompts (see :func:`is_batch`) goes to :meth:`generate_batch` and returns a list.
        """
        if is_batch(input_ids, prompt):
            if streamer is not None:
                raise SpecdecError("streamer works with one request; for a batch, drive specdec.serving.engine.BatchEngine "
                                   "and read the tokens each step() emits.")
            return self.generate_batch(input_ids, prompt=prompt, chat=chat, max_new_tokens=max_new_tokens,
                                       eos_token_id=eos_token_id, stop_strings=stop_strings, do_sample=do_sample,
                                       temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                       max_batch_size=max_batch_size)
        sampling = self._sampling(do_sample, temperature, top_k, top_p)
        rule = get_rule(self._rule_name(do_sample))
        ids = self._input_ids(input_ids, prompt, chat)
        self._check_lengths(ids, max_new_tokens)
        if eos_token_id == "default":
            eos_token_id = getattr(self.target.generation_config, "eos_token_id", None)
        stopper = Stopper(ids[0].tolist(), max_new_tokens, eos_token_id, stop_strings, self.tokenizer)
        generator = self._generator(seed)
        stats = GenerationStats()
        new_tokens: list[int] = []
        if streamer is not None:
            streamer.put(ids.cpu())
        start = time.perf_counter()
        steps = decode(self.verifier, self.drafter, rule, ids, max_new_tokens=max_new_tokens,
                       max_nodes=self.max_nodes, sampling=sampling, generator=generator, budget=self._budget())
        with self._fast_linears():
            for step in steps:
                kept, reason = stopper.cut(step.new_tokens)
                stats.record(drafted=int(step.tree.num_draft_nodes[0]),
                             accepted=int(step.acceptance.num_accepted[0]))
                new_tokens.extend(kept)
                if streamer is not None:
                    for t in kept:
                        streamer.put(torch.tensor([t], device="cpu"))
                if reason is not None:
                    stats.finish_reason = reason
                    break
            steps.close()
        stats.wall_time_s = time.perf_counter() - start
        stats.new_tokens = len(new_tokens)
        if streamer is not None:
            streamer.end()
        return self._output(ids, new_tokens, stats)

    def generate_batch(self, input_ids=None, *, prompt=None, chat: bool = True, max_new_tokens: int = 128,
                       eos_token_id="default", stop_strings: str | Sequence[str] | None = None,
                       do_sample: bool = False, temperature: float | None = None, top_k: int | None = None,
                       top_p: float | None = None, seed: int | None = None,
                       max_batch_size: int | None = None, progress: bool = False) -> list[GenerationOutput]:
        """Generate for many requests at once (continuous batching); one :class:`GenerationOutput` per request,
        in order. Needs ``verifier="paged"``.

        input_ids: a list of token-id lists / 1-D tensors (any lengths), or a ``[B, T]`` tensor; or ``prompt``: a
        list of texts or of chat-message lists. Up to ``max_batch_size`` requests (default: the decoder's) run in
        each verify step; the rest wait and join as others finish. Request i samples with seed ``seed + i``. Each
        output equals that request generated alone (greedy: token for token). A request that runs out of KV
        blocks under ``preemption="refuse"`` ends with ``stats.finish_reason == "kv_exhausted"`` (the tokens it
        made are kept; the others are unaffected). ``progress``: a progress bar over finished requests.
        """
        if not hasattr(self.verifier, "score_batch"):
            raise SpecdecError("batched generation needs the paged verifier: SpecDecoder(..., verifier='paged') "
                               "(or verifier=paged in Hydra).")
        sampling = self._sampling(do_sample, temperature, top_k, top_p)
        rule = get_rule(self._rule_name(do_sample))
        requests = self._batch_input_ids(input_ids, prompt, chat)
        for ids in requests:  # every request checked before any runs: bad input loses nothing
            self._check_lengths(ids, max_new_tokens)
        max_batch_size = max_batch_size or self.max_batch_size
        if self._drafter_spec is None and len(requests) > 1 and max_batch_size > 1:
            raise SpecdecError("a batch of more than one request needs one drafter per request: pass the drafter "
                               "by name or checkpoint path (not as an object), or max_batch_size=1.")
        if eos_token_id == "default":
            eos_token_id = getattr(self.target.generation_config, "eos_token_id", None)
        fast = ExitStack()  # the fast linear kernel, also in the drafters the pool builds for later requests
        engine = BatchEngine(self.verifier, self._drafter_pool(fast), rule, max_nodes=self.max_nodes,
                             max_batch_size=max_batch_size, sampling=sampling,
                             needs_hidden=bool(getattr(self.drafter, "needs_hidden_states", False)))
        for i, ids in enumerate(requests):
            stopper = Stopper(ids[0].tolist(), max_new_tokens, eos_token_id, stop_strings, self.tokenizer)
            generator = self._generator(None if seed is None else seed + i)
            engine.add(ids, max_new_tokens=max_new_tokens, stopper=stopper, generator=generator,
                       budget=self._budget())
        bar = tqdm(total=len(requests), desc=f"requests (batch {max_batch_size})", unit="request",
                   file=sys.stderr, disable=not progress)
        with fast, self._fast_linears(), bar:
            finished = engine.run(on_finish=lambda r: bar.update(1))
        return [self._output(r.prompt, r.tokens, r.stats, r.error) for r in finished]

    @property
    def device(self) -> torch.device:
        """The target's device (of its first parameter: where its input ids go); CPU for a target without any."""
        return models.device_of(self.target)

    def _generator(self, seed: int | None) -> torch.Generator | None:
        """A request's RNG seeded with ``seed`` (None: none, torch's global RNG), on the target's device: the
        distributions it samples from live there, and torch draws only with a generator of their device."""
        return None if seed is None else torch.Generator(device=self.device).manual_seed(seed)

    def _fast_linears(self):
        """The fast CPU linear kernel (:mod:`specdec.models.cpu_gemm`) in the target's and the drafter's linear layers."""
        return cpu_gemm.fast_linears(self.target, *cpu_gemm.drafter_modules(self.drafter),
                                     enabled=self.fast_linears)

    def _budget(self) -> AdaptiveBudget | None:
        """A fresh per-request budget controller when adaptive (None: every tree gets ``max_nodes``)."""
        if not self.adaptive:
            return None
        kind = self._drafter_spec[0] if self._drafter_spec is not None else type(self.drafter).__name__
        return AdaptiveBudget(self.cost_profile, kind, max_nodes=self.max_nodes, calibrator=self.calibrator)

    def _drafter_pool(self, fast: ExitStack) -> DrafterPool:
        """One drafter per running request: the decoder's own first, then new ones built from its spec, each with
        the fast linear kernel until ``fast`` closes."""

        def build():
            d = registry.build_drafter(self._drafter_spec[0], self.target, self.tokenizer, **self._drafter_spec[1])
            fast.enter_context(cpu_gemm.fast_linears(*cpu_gemm.drafter_modules(d), enabled=self.fast_linears))
            return d

        return DrafterPool(build, first=self.drafter)

    def _output(self, ids: torch.Tensor, new_tokens: list[int], stats: GenerationStats,
                error: str | None = None) -> GenerationOutput:
        sequences = torch.cat([ids, torch.tensor([new_tokens], dtype=ids.dtype, device=ids.device)], dim=1)
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=True) if self.tokenizer is not None else None
        return GenerationOutput(sequences=sequences, new_tokens=new_tokens, stats=stats, text=text, error=error)

    def _batch_input_ids(self, input_ids, prompt, chat: bool) -> list[torch.Tensor]:
        if (input_ids is None) == (prompt is None):
            raise PromptError("pass exactly one of input_ids (token ids) or prompt (texts or chats).")
        if prompt is not None:
            return [self._input_ids(None, p, chat) for p in prompt]
        if isinstance(input_ids, torch.Tensor):
            input_ids = list(input_ids) if input_ids.dim() == 2 else [input_ids]
        if not input_ids:
            raise PromptError("the batch is empty; pass at least one prompt.")
        return [self._input_ids(ids, None, chat) for ids in input_ids]

    def _sampling(self, do_sample: bool, temperature, top_k, top_p) -> SamplingParams:
        if not do_sample:
            return SamplingParams()
        gen = getattr(self.target, "generation_config", None)

        def pick(value, name, default):
            value = getattr(gen, name, None) if value is None else value
            return default if value is None else value

        return SamplingParams(do_sample=True, temperature=float(pick(temperature, "temperature", 1.0)),
                              top_k=int(pick(top_k, "top_k", 0)), top_p=float(pick(top_p, "top_p", 1.0)))

    def _rule_name(self, do_sample: bool) -> str:
        name = self.acceptance or ("rejection" if do_sample else "greedy")
        if name == "greedy" and do_sample:
            raise SpecdecError("acceptance=greedy keeps only argmax tokens; with do_sample=True use "
                               "acceptance=rejection (lossless) or leave acceptance unset.")
        if name in LOSSY:
            warnings.warn(f"acceptance={name} is LOSSY: the output distribution is not the target's.", stacklevel=3)
        return name

    def _input_ids(self, input_ids, prompt, chat: bool) -> torch.Tensor:
        if (input_ids is None) == (prompt is None):
            raise PromptError("pass exactly one of input_ids (token ids) or prompt (text or chat messages).")
        if prompt is not None:
            if self.tokenizer is None:
                raise PromptError("a text prompt needs a tokenizer: pass tokenizer=... or input_ids instead.")
            if isinstance(prompt, str) and not prompt.strip():
                raise PromptError("the prompt is empty; pass some text.")
            return models.encode_prompt(self.tokenizer, prompt, chat=chat).to(self.device)
        ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(input_ids, device="cpu")
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise PromptError(
                f"input_ids must be [1, T] for one request; got shape {tuple(ids.shape)}. For a batch pass a list "
                "of id lists (any lengths) or a [B, T] tensor with verifier='paged'."
            )
        if ids.shape[1] == 0:
            raise PromptError("the prompt is empty (0 tokens); pass at least one token.")
        return ids.long().to(self.device)  # the target's device: every tensor the loop makes follows these ids

    def _check_lengths(self, ids: torch.Tensor, max_new_tokens: int) -> None:
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise SpecdecError(f"max_new_tokens must be a positive integer; got {max_new_tokens!r}.")
        ctx = models.context_length(self.target)
        if ctx is not None and ids.shape[1] + max_new_tokens > ctx:
            if ids.shape[1] >= ctx:
                raise PromptError(
                    f"the prompt has {ids.shape[1]} tokens but the target's context holds {ctx}; shorten the prompt."
                )
            raise PromptError(
                f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the target's context "
                f"of {ctx} tokens; lower max_new_tokens to at most {ctx - ids.shape[1]} or shorten the prompt."
            )


def is_batch(input_ids, prompt) -> bool:
    """True for several requests: a list of texts, of chats (lists of messages), of id lists or 1-D tensors, or a
    ``[B, T]`` tensor with B > 1 (a single chat is a list of message dicts, not a batch)."""
    if prompt is not None:
        return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and \
            all(isinstance(p, (str, list, tuple)) for p in prompt)
    if isinstance(input_ids, torch.Tensor):
        return input_ids.dim() == 2 and input_ids.shape[0] > 1
    return isinstance(input_ids, (list, tuple)) and len(input_ids) > 0 and \
        all(isinstance(x, (list, tuple, torch.Tensor)) for x in input_ids)


def check_vocabulary(drafter, target) -> None:
    """Refuse a drafter whose token ids mean something else than the target's."""
    draft_vocab = getattr(drafter, "vocab_size", None)
    if draft_vocab is None:
        return
    target_vocab = models.vocab_size(target)
    if draft_vocab != target_vocab:
        raise VocabularyMismatchError(
            f"{type(drafter).__name__} has a vocabulary of {draft_vocab} tokens but the target has {target_vocab}; "
            "use a drafter that shares the target's tokenizer (or train one from the target with train/)."
        )


def generate(target=None, input_ids=None, *, tokenizer=None, drafter="ngram", verifier: str = "hf",
             acceptance: str | None = None, max_nodes: int = DEFAULT_MAX_NODES, dtype=None,
             drafter_kwargs: dict | None = None, fast_linears: bool | None = None,
             verifier_kwargs: dict | None = None, max_batch_size: int = 8, adaptive: bool = False,
             cost_profile: CostProfile | None = None, **generation_kwargs) -> GenerationOutput | list[GenerationOutput]:
    """Speculatively decode one request; output identical to ``target.generate`` (greedy: token for token;
    sampling: in distribution).

    target: a transformers causal LM, a hub id, a local path, or None (default target). ``tokenizer`` is needed
    for text prompts and stop strings (loaded automatically for a hub id or path). ``generation_kwargs`` are those
    of :meth:`SpecDecoder.generate`: ``prompt``, ``chat``, ``max_new_tokens``, ``eos_token_id``, ``stop_strings``,
    ``streamer``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``seed``. Returns a
    :class:`~specdec.types.GenerationOutput` with ``sequences [1, T + new]``, ``new_tokens``, ``text`` and ``stats``
    (verify steps, drafted/accepted per step, tau, acceptance by depth, wall time).

    A batch (a list of prompts or of id lists, any lengths) returns a list of outputs, one per request, decoded with
    continuous batching (``max_batch_size`` at a time) over the paged KV cache (``verifier="paged"``, the default
    for a batch); ``verifier_kwargs`` configure it (``num_blocks``, ``block_size``, ``kernel``, ``preemption``).
    """
    if is_batch(input_ids, generation_kwargs.get("prompt")) and verifier == "hf":
        verifier = "paged"
    decoder = SpecDecoder(target, tokenizer, drafter=drafter, verifier=verifier, acceptance=acceptance,
                          max_nodes=max_nodes, dtype=dtype, drafter_kwargs=drafter_kwargs,
                          fast_linears=fast_linears, verifier_kwargs=verifier_kwargs,
                          max_batch_size=max_batch_size, adaptive=adaptive, cost_profile=cost_profile)
    return decoder.generate(input_ids, **generation_kwargs)
