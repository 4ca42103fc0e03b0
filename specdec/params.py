"""One request's generation parameters, in one place (in the spirit of transformers' ``GenerationConfig``).

``generate()``, :meth:`specdec.SpecDecoder.generate` and the batch path all take these as keyword arguments, or a
:class:`GenerationParams` / a transformers ``GenerationConfig`` as ``generation_config=`` (keywords override its
fields). Unset sampling values come from the target's own generation config, as in ``model.generate``.

>>> p = GenerationParams.resolve(None, {"max_new_tokens": 8, "do_sample": True, "temperature": 0.7})
>>> p.max_new_tokens, p.sampling(None)
(8, SamplingParams(do_sample=True, temperature=0.7, top_k=0, top_p=1.0))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from specdec.algorithms.sampling import SamplingParams
from specdec.errors import ConfigError

DEFAULT = "default"  # eos_token_id: take the target's generation config's


@dataclass(frozen=True)
class GenerationParams:
    """What one request asks for; every field has transformers' meaning.

    max_new_tokens: at most this many new tokens (exactly this many unless a stop comes first).
    eos_token_id: an id or a list of ids that end generation (kept in the output); ``"default"``: the target's
    generation config's; None: no EOS stop. stop_strings: a string or strings that end generation (matched like
    transformers' ``StopStringCriteria``; needs a tokenizer). do_sample / temperature / top_k / top_p: sampling
    (unset values: the target's generation config's, else 1.0 / 0 / 1.0). seed: the request's RNG seed (a batch:
    request i uses ``seed + i``); None: torch's global RNG.
    """

    max_new_tokens: int = 128
    eos_token_id: int | list[int] | str | None = DEFAULT
    stop_strings: str | Sequence[str] | None = None
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def resolve(cls, base, overrides: Mapping[str, Any]) -> GenerationParams:
        """``base`` (None, a :class:`GenerationParams` or a transformers ``GenerationConfig``) with ``overrides``
        (keyword arguments of ``generate``); an unknown keyword fails naming the valid ones."""
        unknown = sorted(set(overrides) - set(cls.names()))
        if unknown:
            raise ConfigError(f"generate() got unknown generation option(s) {unknown}; the options are "
                              f"{cls.names()} (or pass generation_config=GenerationParams(...) / a transformers "
                              "GenerationConfig).")
        if base is None:
            base = cls()
        elif not isinstance(base, GenerationParams):
            base = cls.from_generation_config(base)
        return dataclasses.replace(base, **overrides)

    @classmethod
    def from_generation_config(cls, config) -> GenerationParams:
        """The fields of a transformers ``GenerationConfig`` that specdec honours; a setting it cannot honour
        losslessly (beam search, repetition penalties, ...) is refused rather than ignored."""
        unsupported = {name: getattr(config, name, None) for name, neutral in _NEUTRAL.items()
                       if getattr(config, name, neutral) not in (neutral, None)}
        if unsupported:
            raise ConfigError(f"generation_config sets {unsupported}, which specdec does not support (it decodes "
                              "one sequence per request, greedy or sampled, with temperature / top_k / top_p); unset "
                              "them.")
        sampling = bool(getattr(config, "do_sample", False))
        return cls(
            max_new_tokens=config.max_new_tokens if config.max_new_tokens is not None else cls.max_new_tokens,
            eos_token_id=config.eos_token_id if config.eos_token_id is not None else DEFAULT,
            stop_strings=getattr(config, "stop_strings", None),
            do_sample=sampling,
            temperature=config.temperature if sampling else None,
            top_k=config.top_k if sampling else None,
            top_p=config.top_p if sampling else None,
        )

    def check(self) -> None:
        """Fail early, naming the fix, on values no request can run with."""
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or \
                self.max_new_tokens <= 0:
            raise ConfigError(f"max_new_tokens must be a positive integer; got {self.max_new_tokens!r}.")
        eos = self.eos_token_id
        if isinstance(eos, torch.Tensor):  # transformers takes a tensor of ids too
            if eos.is_floating_point() or eos.dim() > 1:
                raise ConfigError(f"eos_token_id as a tensor must be integer ids ([] or [n]); got {eos.dtype} "
                                  f"{tuple(eos.shape)}.")
            eos = eos.tolist()
            object.__setattr__(self, "eos_token_id", eos)  # normalised once, before anything reads it
        if isinstance(eos, str) and eos != DEFAULT:
            raise ConfigError(f"eos_token_id must be a token id (int), a list of ids, None or 'default'; got the "
                              f"string {eos!r} (for a token's text, pass tokenizer.convert_tokens_to_ids({eos!r})).")
        if eos is not None and eos != DEFAULT:
            ids = [eos] if isinstance(eos, int) else eos
            if not isinstance(ids, (list, tuple)) or any(not isinstance(i, int) or isinstance(i, bool) or i < 0
                                                         for i in ids):
                raise ConfigError(f"eos_token_id must be a non-negative token id or a list of them; got {eos!r}.")
        stops = [self.stop_strings] if isinstance(self.stop_strings, str) else self.stop_strings
        if stops is not None and (not isinstance(stops, (list, tuple))
                                  or any(not isinstance(x, str) or not x for x in stops)):
            raise ConfigError(f"stop_strings must be a non-empty string or a list of them; got {self.stop_strings!r}.")

    def eos(self, target) -> int | list[int] | None:
        """The EOS id(s) to stop at: the target's generation config's for ``"default"``."""
        if self.eos_token_id == DEFAULT:
            return getattr(getattr(target, "generation_config", None), "eos_token_id", None)
        return self.eos_token_id

    def sampling(self, target) -> SamplingParams:
        """The warping the acceptance rule and drafters apply: greedy, or sampled with unset values taken from the
        target's generation config (as ``model.generate`` does)."""
        if not self.do_sample:
            return SamplingParams()
        gen = getattr(target, "generation_config", None)

        def pick(value, name, default):
            value = getattr(gen, name, None) if value is None else value
            return default if value is None else value

        return SamplingParams(do_sample=True, temperature=float(pick(self.temperature, "temperature", 1.0)),
                              top_k=int(pick(self.top_k, "top_k", 0)), top_p=float(pick(self.top_p, "top_p", 1.0)))


# GenerationConfig settings that change what model.generate outputs and that specdec does not implement: their
# neutral values (a config that leaves them there is fine)
_NEUTRAL = {"num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
            "min_new_tokens": 0, "min_length": 0, "bad_words_ids": None, "typical_p": 1.0, "epsilon_cutoff": 0.0,
            "eta_cutoff": 0.0, "min_p": None, "penalty_alpha": None, "diversity_penalty": 0.0,
            "encoder_repetition_penalty": 1.0, "suppress_tokens": None, "begin_suppress_tokens": None,
            "forced_bos_token_id": None, "forced_eos_token_id": None, "sequence_bias": None,
            "guidance_scale": None, "watermarking_config": None}
