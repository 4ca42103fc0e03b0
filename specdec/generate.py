"""``generate()`` and :class:`SpecDecoder`: speculative decoding next to transformers, with stopping, streaming,
statistics and batches.

>>> out = specdec.generate("HuggingFaceTB/SmolLM2-135M-Instruct", prompt="Hi!", drafter="ngram",
...                        max_new_tokens=64)                                      # doctest: +SKIP
>>> out.text, out.stats.tau                                                        # doctest: +SKIP
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from contextlib import ExitStack

import torch
from tqdm import tqdm

from specdec import inputs, interop, models, profiler, registry
from specdec.algorithms.acceptance import LOSSY, get_rule
from specdec.algorithms.adaptive import AdaptiveBudget, Calibrator
from specdec.algorithms.cost import CostProfile
from specdec.algorithms.stopping import Stopper
from specdec.errors import ConfigError, SpecdecError, VocabularyMismatchError
from specdec.kernels import cpu_gemm
from specdec.models import checkpoint
from specdec.models.families import check_servable
from specdec.params import GenerationParams
from specdec.protocols import BatchDrafter, check_capabilities, check_drafter, check_verifier, successors_wanted
from specdec.serving.engine import BatchEngine, DrafterPool
from specdec.serving.scheduler import POLICIES
from specdec.types import GenerationOutput, GenerationStats

DEFAULT_MAX_NODES = 16


class SpecDecoder:
    """A target, a drafter, a verifier and an acceptance rule, ready to generate many times.

    target: a transformers causal LM, a hub id, a local path, or None for the default target.
    drafter: a registered name (``specdec.registry.DRAFTERS``: ``none``, ``ngram``, ``draft_model``, ``eagle``,
    ``medusa``, ``layerskip``, ``hybrid``), the directory of a checkpoint a ``train/`` job wrote (its kind is read
    from it), or an object implementing :class:`specdec.protocols.Drafter`; ``drafter_kwargs`` go to the drafter's
    constructor. verifier: a registered name (``hf``, the reference; ``paged``, which also serves batches), with
    ``verifier_kwargs``. acceptance: ``greedy``, ``rejection`` or ``typical`` (LOSSY); None: greedy, or rejection
    when sampling. max_nodes: the node budget of a draft tree, root included. quantization: ``int8`` / ``int4``
    linears for a target loaded by name (:mod:`specdec.models.quantize`; a ``.gguf`` target is served
    with its own quantized tensors).
    adaptive: re-decide each request's node budget (up to ``max_nodes``) before every step from the measured cost
    profile (``cost_profile``, or the cached / freshly measured one for this target and machine, see
    :mod:`specdec.profiler`) and the request's acceptance so far (:mod:`specdec.algorithms.adaptive`); a
    drafter that scores its nodes gets each step's tree cut to the nodes worth their verify cost. Outputs are
    unchanged, only speed. fast_linears: run the target's (and the drafter's) float32 linear layers on the faster
    CPU kernel of :mod:`specdec.kernels.cpu_gemm` (oneDNN on reordered weights, a second copy of them in memory);
    None = on for a float32 model on CPU. max_batch_size and preemption: how batches are served (requests per
    verify step; ``recompute`` or ``refuse`` when KV blocks run out, see :mod:`specdec.serving.scheduler`; a
    ``preemption`` in ``verifier_kwargs`` is read as this).
    """

    def __init__(self, target=None, tokenizer=None, *, drafter=registry.DEFAULT_DRAFTER,
                 verifier: str = registry.REFERENCE_VERIFIER,
                 acceptance: str | None = None, max_nodes: int = DEFAULT_MAX_NODES, dtype=None,
                 drafter_kwargs: dict | None = None, fast_linears: bool | None = None,
                 verifier_kwargs: dict | None = None, max_batch_size: int = 8, adaptive: bool = False,
                 cost_profile: CostProfile | None = None, preemption: str | None = None,
                 quantization: str | None = None) -> None:
        if target is None or isinstance(target, str):
            target, loaded_tok = models.load_target(target, dtype=dtype or "float32", quantization=quantization)
            tokenizer = tokenizer or loaded_tok
        elif quantization is not None:
            raise ConfigError("quantization applies when specdec loads the target: pass its name or path as target, "
                              "or quantize your model first with specdec.models.quantize.quantize_model(model, "
                              f"{quantization!r}).")
        check_servable(target)  # an encoder-decoder, recurrent or headless model: one clear error, before anything
        self.target = target
        self.tokenizer = tokenizer
        self._drafter_spec = drafter_spec(drafter, drafter_kwargs)  # (kind, kwargs): how to build one more
        self._spares: list = []  # drafters built for earlier batches' requests, reused by later ones
        self.drafter = check_drafter(drafter if self._drafter_spec is None else self._build_drafter())
        if not isinstance(verifier, str):
            raise ConfigError(f"verifier must be a registered name ({sorted(registry.VERIFIERS)}); got "
                              f"{type(verifier).__name__}. Register your own with specdec.registry.register_verifier.")
        verifier_opts, engine_opts = registry.split_verifier_options(verifier, verifier_kwargs or {})
        self.verifier = check_verifier(registry.build_verifier(verifier, target, **verifier_opts))
        self.preemption = preemption or engine_opts.get("preemption", "recompute")
        if self.preemption not in POLICIES:
            raise ConfigError(f"unknown preemption policy {self.preemption!r}; choose one of {list(POLICIES)}.")
        self.max_batch_size = max_batch_size
        self.fast_linears = cpu_gemm.wanted(target) if fast_linears is None else fast_linears
        self.adaptive = adaptive
        self.cost_profile = cost_profile
        self.calibrator = Calibrator()  # the drafter's confidence calibration, shared by this decoder's requests
        self._lock = threading.RLock()  # one request (or batch) at a time: the verifier and drafter hold its state
        if adaptive and cost_profile is None:
            self.cost_profile, _, _ = profiler.load_or_measure(target, verifier, verifier_opts,
                                                               fast_linears=self.fast_linears)
        if acceptance is not None:
            get_rule(acceptance)  # an unknown name fails now, not at the first generate()
        self.acceptance = acceptance  # None: greedy, or rejection when sampling
        if max_nodes < 1:
            raise SpecdecError(f"max_nodes must be >= 1 (the root); got {max_nodes}.")
        self.max_nodes = max_nodes
        check_capabilities(self.drafter, self.verifier.capabilities)
        check_vocabulary(self.drafter, target)

    def generate(self, input_ids=None, *, prompt=None, attention_mask=None, chat: bool = True, streamer=None,
                 generation_config=None, max_batch_size: int | None = None, progress: bool = False,
                 **params) -> GenerationOutput | list[GenerationOutput]:
        """Generate after ``input_ids [1, T]`` (or ``prompt``: text, or chat messages with ``chat=True``).

        ``params``: the fields of :class:`specdec.params.GenerationParams` (``max_new_tokens``, ``eos_token_id``,
        ``stop_strings``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``seed``), on top of
        ``generation_config`` (a :class:`~specdec.params.GenerationParams` or a transformers ``GenerationConfig``).
        Stops like ``model.generate``: at EOS (kept), at a stop string (the completing token kept), or at exactly
        ``max_new_tokens``. ``streamer`` (e.g. a ``TextStreamer``) gets the prompt, then each token, then ``end()``.
        Sampling warps like transformers and is reproducible for a fixed ``seed`` (an adaptive decoder calibrates a
        seeded sampled request afresh, so what it served before does not change its tokens).
        ``attention_mask [B, T]`` (1 = token, 0 = padding, left or right), as ``model.generate`` takes it: pads
        are dropped and each row is decoded as the prompt it holds. A request on the paged verifier that runs out
        of KV blocks ends with ``stats.finish_reason == "kv_exhausted"`` and ``error`` set, keeping its tokens.

        A batch of prompts (see :func:`specdec.inputs.is_batch`) goes to :meth:`generate_batch` and returns a list.
        Calls from several threads are served one at a time (each decoder holds one lock): never mixed.
        """
        with self._lock:
            request = GenerationParams.resolve(generation_config, params)
            input_ids = inputs.unpad(input_ids, attention_mask, self.target)
            if inputs.is_batch(input_ids, prompt):
                if streamer is not None:
                    raise SpecdecError("streamer works with one request; for a batch, drive "
                                       "specdec.serving.engine.BatchEngine and read the tokens each step() emits.")
                return self._generate_batch(input_ids, prompt, chat, request, max_batch_size, progress)
            return self._generate_one(input_ids, prompt, chat, streamer, request)

    def _generate_one(self, input_ids, prompt, chat: bool, streamer, request: GenerationParams) -> GenerationOutput:
        request.check()
        ids = inputs.request_ids(input_ids, prompt, tokenizer=self.tokenizer, chat=chat, device=self.device)
        inputs.check_ids(self.target, ids)
        inputs.check_length(self.target, ids, request.max_new_tokens)
        fast = ExitStack()
        engine = self._engine(request, max_batch_size=1, fast=fast)
        engine.fits(ids)  # a prompt that cannot fit even alone fails now, losing nothing
        self._add(engine, ids, request, seed=request.seed)
        if streamer is not None:
            streamer.put(ids.cpu())
        with fast, self._fast_linears(), engine:
            while not engine.done:
                for event in engine.step():
                    for t in event.new_tokens if streamer is not None else ():
                        streamer.put(torch.tensor([t], device="cpu"))
        if streamer is not None:
            streamer.end()
        (r,) = engine.requests.values()
        return self._output(r.prompt, r.tokens, r.stats, r.error)

    def generate_batch(self, input_ids=None, *, prompt=None, attention_mask=None, chat: bool = True,
                       generation_config=None, max_batch_size: int | None = None, progress: bool = False,
                       **params) -> list[GenerationOutput]:
        """Generate for many requests at once (continuous batching); one :class:`GenerationOutput` per request,
        in order. Needs a verifier that serves batches (``verifier="paged"``).

        input_ids: a list of token-id lists / 1-D tensors (any lengths), or a ``[B, T]`` tensor (with
        ``attention_mask`` when padded, as :meth:`generate`); or ``prompt``: a list of texts or of chat-message
        lists; ``params`` / ``generation_config`` as in :meth:`generate`. Up to ``max_batch_size`` requests
        (default: the decoder's) run in each verify step; the rest wait and join as others finish. Request i
        samples with seed ``seed + i``. Each output equals that request generated alone (greedy: token for
        token). A request that runs out of KV blocks under ``preemption="refuse"`` ends with
        ``stats.finish_reason == "kv_exhausted"`` (the tokens it made are kept; the others are unaffected).
        ``progress``: a progress bar over finished requests.
        """
        with self._lock:
            input_ids = inputs.unpad(input_ids, attention_mask, self.target)
            return self._generate_batch(input_ids, prompt, chat, GenerationParams.resolve(generation_config, params),
                                        max_batch_size, progress)

    def _generate_batch(self, input_ids, prompt, chat: bool, request: GenerationParams, max_batch_size: int | None,
                        progress: bool) -> list[GenerationOutput]:
        if not self.verifier.capabilities.batching:
            raise SpecdecError(f"batched generation needs a verifier that serves batches: SpecDecoder(..., "
                               f"verifier='{registry.batching_verifier()}') (or verifier={registry.batching_verifier()}"
                               " in Hydra).")
        request.check()
        requests = inputs.batch_ids(input_ids, prompt, tokenizer=self.tokenizer, chat=chat, device=self.device)
        for ids in requests:  # every request checked before any runs: bad input loses nothing
            inputs.check_ids(self.target, ids)
            inputs.check_length(self.target, ids, request.max_new_tokens)
        max_batch_size = max_batch_size or self.max_batch_size
        if self._drafter_spec is None and not isinstance(self.drafter, BatchDrafter) and len(requests) > 1 \
                and max_batch_size > 1:
            raise SpecdecError("a batch of more than one request needs one drafter per request: pass the drafter "
                               "by name or checkpoint path (not as an object), or max_batch_size=1.")
        fast = ExitStack()  # the fast linear kernel, also in the drafters the pool builds for later requests
        engine = self._engine(request, max_batch_size=max_batch_size, fast=fast)
        for i, ids in enumerate(requests):
            self._add(engine, ids, request, seed=None if request.seed is None else request.seed + i)
        bar = tqdm(total=len(requests), desc=f"requests (batch {max_batch_size})", unit="request",
                   file=sys.stderr, disable=not progress)
        with fast, self._fast_linears(), bar, engine:
            finished = engine.run(on_finish=lambda r: bar.update(1))
        return [self._output(r.prompt, r.tokens, r.stats, r.error) for r in finished]

    def _engine(self, request: GenerationParams, *, max_batch_size: int, fast: ExitStack) -> BatchEngine:
        """The driver for this call's requests (one, or a batch): the rule for ``request``, a drafter per request
        (see :meth:`_drafter_pool`), this decoder's verifier, node budget and preemption policy."""
        return BatchEngine(self.verifier, self._drafter_pool(fast), get_rule(self._rule_name(request.do_sample)),
                           max_nodes=self.max_nodes, max_batch_size=max_batch_size,
                           sampling=request.sampling(self.target), needs_hidden=self.drafter.needs_hidden_states,
                           preemption=self.preemption, successors=successors_wanted(self.drafter))

    def _add(self, engine: BatchEngine, ids: torch.Tensor, request: GenerationParams, seed: int | None) -> int:
        """Queue ``ids [1, T]`` with its stopping rule, its adaptive budget and its RNG (seeded with ``seed``)."""
        stopper = Stopper(ids[0].tolist(), request.max_new_tokens, request.eos(self.target), request.stop_strings,
                          self.tokenizer)
        return engine.add(ids, max_new_tokens=request.max_new_tokens, stopper=stopper, budget=self._budget(request),
                          generator=self._generator(seed))

    @property
    def device(self) -> torch.device:
        """The target's device (of its first parameter: where its input ids go); CPU for a target without any."""
        return models.device_of(self.target)

    def _build_drafter(self):
        kind, kwargs = self._drafter_spec
        return registry.build_drafter(kind, self.target, self.tokenizer, **kwargs)

    def _generator(self, seed: int | None) -> torch.Generator | None:
        """A request's RNG seeded with ``seed`` (None: none, torch's global RNG), on the target's device: the
        distributions it samples from live there, and torch draws only with a generator of their device."""
        return None if seed is None else torch.Generator(device=self.device).manual_seed(seed)

    def _fast_linears(self):
        """The fast CPU linear kernel (:mod:`specdec.kernels.cpu_gemm`) in the target's and the drafter's linears."""
        return cpu_gemm.fast_linears(self.target, *self.drafter.modules(), enabled=self.fast_linears)

    def _budget(self, request: GenerationParams) -> AdaptiveBudget | None:
        """A fresh per-request budget controller when adaptive (None: every tree gets ``max_nodes``). It learns in
        the decoder's shared calibrator, except a seeded sampled request, which starts from a fresh one: its trees,
        and so its sampled tokens, then depend on its seed alone (greedy output never depends on the trees)."""
        if not self.adaptive:
            return None
        kind = self._drafter_spec[0] if self._drafter_spec is not None else type(self.drafter).__name__
        calibrator = Calibrator() if request.do_sample and request.seed is not None else self.calibrator
        return AdaptiveBudget(self.cost_profile, kind, max_nodes=self.max_nodes, calibrator=calibrator)

    def _drafter_pool(self, fast: ExitStack) -> DrafterPool:
        """One drafter per running request: the decoder's own first, then the ones earlier calls built (kept: a
        drafter with a model, e.g. the hybrid's EAGLE-style head, took 20-50 ms to build, for every request of
        every batch), then new ones built from its spec; each with the fast linear kernel until ``fast`` closes,
        when the extra drafters go back to the decoder's spares."""

        if isinstance(self.drafter, BatchDrafter):  # the requests' drafters share its weights: they draft together
            return DrafterPool(self.drafter.spawn, first=self.drafter)

        built: list = []

        def build():
            d = self._spares.pop() if self._spares else self._build_drafter()
            fast.enter_context(cpu_gemm.fast_linears(*d.modules(), enabled=self.fast_linears))
            built.append(d)
            return d

        fast.callback(lambda: self._spares.extend(built))  # after the call, however it ended
        return DrafterPool(build, first=self.drafter)

    def _output(self, ids: torch.Tensor, new_tokens: list[int], stats: GenerationStats,
                error: str | None = None) -> GenerationOutput:
        sequences = torch.cat([ids, torch.tensor([new_tokens], dtype=ids.dtype, device=ids.device)], dim=1)
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=True) if self.tokenizer is not None else None
        return GenerationOutput(sequences=sequences, new_tokens=new_tokens, stats=stats, text=text, error=error)

    def _rule_name(self, do_sample: bool) -> str:
        name = self.acceptance or ("rejection" if do_sample else "greedy")
        if name == "greedy" and do_sample:
            raise SpecdecError("acceptance=greedy keeps only argmax tokens; with do_sample=True use "
                               "acceptance=rejection (lossless) or leave acceptance unset.")
        if name in LOSSY:
            warnings.warn(f"acceptance={name} is LOSSY: the output distribution is not the target's.", stacklevel=3)
        return name


def drafter_spec(drafter, drafter_kwargs: dict | None) -> tuple[str, dict] | None:
    """``(registered kind, constructor options)`` for a drafter given by name or checkpoint directory; None for a
    drafter object (used as it is)."""
    if drafter is None:
        drafter = registry.NO_DRAFTER
    if isinstance(drafter, str) and drafter not in registry.DRAFTERS and \
            (os.sep in drafter or drafter.startswith((".", "~"))) and not os.path.isdir(os.path.expanduser(drafter)):
        raise ConfigError(f"drafter={drafter!r}: no such directory. Pass a train/ checkpoint directory that "
                          f"exists, or a drafter name ({', '.join(registry.DRAFTERS)}).")
    if isinstance(drafter, str) and checkpoint.is_checkpoint(drafter):  # a trained drafter's directory
        return checkpoint.read_meta(drafter)["kind"], {"path": drafter, **(drafter_kwargs or {})}
    if isinstance(drafter, str) and interop.is_public(drafter):  # a public EAGLE-1/EAGLE-3/Medusa directory
        return interop.detect(os.path.expanduser(drafter))[0], {"path": drafter, **(drafter_kwargs or {})}
    if isinstance(drafter, str):
        return drafter, dict(drafter_kwargs or {})
    if drafter_kwargs:
        raise SpecdecError("drafter_kwargs apply to a drafter given by name; configure the object directly.")
    return None


def check_vocabulary(drafter, target) -> None:
    """Refuse a drafter whose token ids mean something else than the target's."""
    if drafter.vocab_size is None:
        return
    target_vocab = models.vocab_size(target)
    if drafter.vocab_size != target_vocab:
        raise VocabularyMismatchError(
            f"{type(drafter).__name__} has a vocabulary of {drafter.vocab_size} tokens but the target has "
            f"{target_vocab}; use a drafter that shares the target's tokenizer (or train one from the target with "
            "train/)."
        )


def generate(target=None, input_ids=None, *, tokenizer=None, drafter=registry.DEFAULT_DRAFTER,
             verifier: str = registry.REFERENCE_VERIFIER, acceptance: str | None = None,
             max_nodes: int = DEFAULT_MAX_NODES, dtype=None, drafter_kwargs: dict | None = None,
             fast_linears: bool | None = None, verifier_kwargs: dict | None = None, max_batch_size: int = 8,
             adaptive: bool = False, cost_profile: CostProfile | None = None, preemption: str | None = None,
             quantization: str | None = None, **generate_kwargs) -> GenerationOutput | list[GenerationOutput]:
    """Speculatively decode; output identical to ``target.generate`` (greedy: token for token; sampling: in
    distribution).

    The decoder's options are :class:`SpecDecoder`'s; ``generate_kwargs`` are :meth:`SpecDecoder.generate`'s
    (``prompt``, ``chat``, ``streamer``, ``generation_config`` and the :class:`~specdec.params.GenerationParams`
    fields: ``max_new_tokens``, ``eos_token_id``, ``stop_strings``, ``do_sample``, ``temperature``, ``top_k``,
    ``top_p``, ``seed``). ``tokenizer`` is needed for text prompts and stop strings (loaded automatically for a
    hub id or path). Returns a :class:`~specdec.types.GenerationOutput` with ``sequences [1, T + new]``,
    ``new_tokens``, ``text`` and ``stats`` (verify steps, drafted/accepted per step, tau, acceptance by depth,
    wall time).

    A batch (a list of prompts or of id lists, any lengths) returns a list of outputs, one per request, decoded with
    continuous batching (``max_batch_size`` at a time) over the paged KV cache (a verifier that serves batches, the
    default for a batch); ``verifier_kwargs`` configure it (``num_blocks``, ``block_size``, ``kernel``, ...).
    """
    if inputs.is_batch(input_ids, generate_kwargs.get("prompt")) and \
            not registry.verifier_class(verifier).capabilities.batching:
        verifier = registry.batching_verifier()
    decoder = SpecDecoder(target, tokenizer, drafter=drafter, verifier=verifier, acceptance=acceptance,
                          max_nodes=max_nodes, dtype=dtype, drafter_kwargs=drafter_kwargs,
                          fast_linears=fast_linears, verifier_kwargs=verifier_kwargs,
                          max_batch_size=max_batch_size, adaptive=adaptive, cost_profile=cost_profile,
                          preemption=preemption, quantization=quantization)
    return decoder.generate(input_ids, **generate_kwargs)
