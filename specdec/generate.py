"""``generate()``: speculative decoding next to transformers, with stopping, streaming and statistics.

>>> out = specdec.generate("HuggingFaceTB/SmolLM2-135M-Instruct", prompt="Hi!", drafter="ngram",
...                        max_new_tokens=64)                                      # doctest: +SKIP
>>> out.text, out.stats.tau                                                        # doctest: +SKIP
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence

import torch

from specdec import checkpoint, cpu_gemm, models, registry
from specdec.acceptance import LOSSY, get_rule
from specdec.errors import PromptError, SpecdecError, VocabularyMismatchError
from specdec.loop import decode
from specdec.protocols import check_capabilities
from specdec.sampling import SamplingParams
from specdec.stopping import Stopper
from specdec.types import GenerationOutput, GenerationStats

DEFAULT_MAX_NODES = 16


class SpecDecoder:
    """A target, a drafter, a verifier and an acceptance rule, ready to generate many times.

    target: a transformers causal LM, a hub id, a local path, or None for the default target.
    drafter: a config name (``none``, ``ngram``, ``draft_model``, ``eagle``, ``medusa``, ``layerskip``), the
    directory of a checkpoint a ``train/`` job wrote (its kind is read from it), or a Drafter object;
    ``drafter_kwargs`` go to the drafter's constructor. small_batch_linear: route the target's few-row float32 matmuls through the
    faster CPU kernel (:mod:`specdec.cpu_gemm`); None = on for a float32 model on CPU.
    """

    def __init__(self, target=None, tokenizer=None, *, drafter="ngram", verifier: str = "hf",
                 acceptance: str | None = None, max_nodes: int = DEFAULT_MAX_NODES, dtype=None,
                 drafter_kwargs: dict | None = None, small_batch_linear: bool | None = None) -> None:
        if target is None or isinstance(target, str):
            target, loaded_tok = models.load_target(target, dtype=dtype or "float32")
            tokenizer = tokenizer or loaded_tok
        self.target = target
        self.tokenizer = tokenizer
        if drafter is None:
            drafter = "none"
        if isinstance(drafter, str) and checkpoint.is_checkpoint(drafter):  # a trained drafter's directory
            kind = checkpoint.read_meta(drafter)["kind"]
            drafter = registry.build_drafter(kind, target, tokenizer, **{"path": drafter, **(drafter_kwargs or {})})
        elif isinstance(drafter, str):
            drafter = registry.build_drafter(drafter, target, tokenizer, **(drafter_kwargs or {}))
        elif drafter_kwargs:
            raise SpecdecError("drafter_kwargs apply to a drafter given by name; configure the object directly.")
        self.drafter = drafter
        self.verifier = registry.build_verifier(verifier, target)
        if acceptance is not None:
            get_rule(acceptance)  # an unknown name fails now, not at the first generate()
        self.acceptance = acceptance  # None: greedy, or rejection when sampling
        if max_nodes < 1:
            raise SpecdecError(f"max_nodes must be >= 1 (the root); got {max_nodes}.")
        self.max_nodes = max_nodes
        self.small_batch_linear = cpu_gemm.wanted(target) if small_batch_linear is None else small_batch_linear
        check_capabilities(self.drafter, verifier_gives_hidden=getattr(self.verifier, "gives_hidden", False),
                           rule_needs_probs=False)
        check_vocabulary(self.drafter, target)

    def generate(self, input_ids=None, *, prompt=None, chat: bool = True, max_new_tokens: int = 128,
                 eos_token_id="default", stop_strings: str | Sequence[str] | None = None, streamer=None,
                 do_sample: bool = False, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None) -> GenerationOutput:
        """Generate up to ``max_new_tokens`` tokens after ``input_ids [1, T]`` (or ``prompt`` text).

        Stops like ``model.generate``: at EOS (kept), at a stop string (the completing token kept), or at exactly
        ``max_new_tokens``. ``streamer`` (e.g. a ``TextStreamer``) gets the prompt, then each token, then ``end()``.
        Sampling (``do_sample=True``) warps like transformers (temperature, top_k, top_p; unset values come from the
        target's generation config) and is reproducible for a fixed ``seed``.
        """
        sampling = self._sampling(do_sample, temperature, top_k, top_p)
        rule = get_rule(self._rule_name(do_sample))
        ids = self._input_ids(input_ids, prompt, chat)
        self._check_lengths(ids, max_new_tokens)
        if eos_token_id == "default":
            eos_token_id = getattr(self.target.generation_config, "eos_token_id", None)
        stopper = Stopper(ids[0].tolist(), max_new_tokens, eos_token_id, stop_strings, self.tokenizer)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        stats = GenerationStats()
        new_tokens: list[int] = []
        if streamer is not None:
            streamer.put(ids.cpu())
        start = time.perf_counter()
        steps = decode(self.verifier, self.drafter, rule, ids, max_new_tokens=max_new_tokens,
                       max_nodes=self.max_nodes, sampling=sampling, generator=generator)
        with cpu_gemm.small_batch_linear(self.target, enabled=self.small_batch_linear):
            for step in steps:
                kept, reason = stopper.cut(step.new_tokens)
                stats.record(drafted=int(step.tree.num_draft_nodes[0]),
                             accepted=int(step.acceptance.num_accepted[0]))
                new_tokens.extend(kept)
                if streamer is not None:
                    for t in kept:
                        streamer.put(torch.tensor([t]))
                if reason is not None:
                    stats.finish_reason = reason
                    break
            steps.close()
        stats.wall_time_s = time.perf_counter() - start
        stats.new_tokens = len(new_tokens)
        if streamer is not None:
            streamer.end()
        sequences = torch.cat([ids, torch.tensor([new_tokens], dtype=ids.dtype, device=ids.device)], dim=1)
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=True) if self.tokenizer is not None else None
        return GenerationOutput(sequences=sequences, new_tokens=new_tokens, stats=stats, text=text)

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
            return models.encode_prompt(self.tokenizer, prompt, chat=chat)
        ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(input_ids)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise PromptError(
                f"input_ids must be [1, T] (one request); got shape {tuple(ids.shape)}. Batched requests come "
                "with the paged verifier; call generate() once per prompt for now."
            )
        if ids.shape[1] == 0:
            raise PromptError("the prompt is empty (0 tokens); pass at least one token.")
        return ids.long()

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
             drafter_kwargs: dict | None = None, small_batch_linear: bool | None = None,
             **generation_kwargs) -> GenerationOutput:
    """Speculatively decode one request; output identical to ``target.generate`` (greedy: token for token;
    sampling: in distribution).

    target: a transformers causal LM, a hub id, a local path, or None (default target). ``tokenizer`` is needed
    for text prompts and stop strings (loaded automatically for a hub id or path). ``generation_kwargs`` are those
    of :meth:`SpecDecoder.generate`: ``prompt``, ``chat``, ``max_new_tokens``, ``eos_token_id``, ``stop_strings``,
    ``streamer``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``seed``. Returns a
    :class:`~specdec.types.GenerationOutput` with ``sequences [1, T + new]``, ``new_tokens``, ``text`` and ``stats``
    (verify steps, drafted/accepted per step, tau, acceptance by depth, wall time).
    """
    decoder = SpecDecoder(target, tokenizer, drafter=drafter, verifier=verifier, acceptance=acceptance,
                          max_nodes=max_nodes, dtype=dtype, drafter_kwargs=drafter_kwargs,
                          small_batch_linear=small_batch_linear)
    return decoder.generate(input_ids, **generation_kwargs)
