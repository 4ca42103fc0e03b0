"""``target=<file>.gguf``: a GGUF checkpoint's own tensors, served without dequantizing its linear layers.

The config and tokenizer come from transformers' GGUF reader; the tensors from the ``gguf`` package's memory-mapped
reader. Q8_0 linears become int8 :class:`~specdec.models.quantize.QuantLinear` panels and Q4_0 / Q4_1 ones int4
panels, bit for bit the file's values (Q4_0's ``d (q - 8)`` is ``d q + m`` with ``m = -8 d``), and BF16 linears
bfloat16 panels (``target.quantization=bf16``'s); F32 / F16 tensors and the other BF16 ones load as float32.
Embeddings are dequantized (one row read per token). An LM head tied to the embedding (no ``output.weight``) is
served from the embedding's quantized blocks. llama.cpp stores the q and k projections'
rows permuted for its rotary layout; they are put back in transformers' order.

Architectures: ``llama`` (SmolLM2, Llama 2/3 and their fine-tunes) and ``mistral``; another is refused with its
name, as is a tensor type outside F32 / F16 / BF16 / Q8_0 / Q4_0 / Q4_1 (requantize with llama.cpp's
``llama-quantize`` to Q8_0 or Q4_1, or load a safetensors checkpoint with ``target.quantization``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from specdec.errors import ConfigError
from specdec.models.checkpoint import CheckpointError
from specdec.kernels import quant_gemm
from specdec.models.quantize import QuantLinear, set_module

ARCHITECTURES = ("llama", "mistral")
FLOAT_TYPES = ("F32", "F16", "BF16")
QUANT_TYPES = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4}
_LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def is_gguf(name: str | None) -> bool:
    return name is not None and str(name).lower().endswith(".gguf")


def hf_name(gguf_name: str) -> str:
    """The transformers parameter a GGUF tensor fills (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj
    .weight``)."""
    parts = gguf_name.split(".")
    if parts[0] == "token_embd":
        return "model.embed_tokens.weight"
    if parts[0] == "output_norm":
        return "model.norm.weight"
    if parts[0] == "output":
        return "lm_head.weight"
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER:
        return f"model.layers.{parts[1]}.{_LAYER[parts[2]]}.{parts[3]}"
    raise CheckpointError(f"the GGUF tensor {gguf_name!r} has no place in a llama model")


def _unpermute(n_head: int, rows: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation: W_hf = W_gguf[index]."""
    half = rows // n_head // 2
    return torch.arange(rows).view(n_head, half, 2).transpose(1, 2).reshape(-1)


def quant_blocks(kind: str, raw: np.ndarray, rows: int, cols: int) -> quant_gemm.QuantPanels:
    """Panels holding a Q8_0 / Q4_0 / Q4_1 tensor's values exactly: ``raw`` its blocks, ``[rows, bytes per row]``."""
    blocks = raw.reshape(rows, cols // quant_gemm.GROUP, -1)
    d = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0])
    if kind == "Q8_0":
        q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8)).reshape(rows, cols)
        return quant_gemm.pack(8, q, d)
    start = 4 if kind == "Q4_1" else 2
    nib = torch.from_numpy(blocks[..., start:].copy()).to(torch.int16)
    q = torch.cat([nib & 0x0F, nib >> 4], dim=-1).reshape(rows, cols)  # value i in low nibble i, i+16 in high
    m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0]) if kind == "Q4_1" else -8 * d
    return quant_gemm.pack(4, q, d, m)


def _float(t) -> torch.Tensor:
    kind = t.tensor_type.name
    data = np.asarray(t.data)
    if kind == "BF16":
        return torch.from_numpy(data.copy().view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(data.astype(np.float32, copy=True))


def load_gguf(path: str | Path):
    """``(model, tokenizer)`` from a GGUF file: its quantized linears as they are stored (their inputs quantized to 8
    bits per group, as llama.cpp does), float32 elsewhere."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no GGUF file at {path}; pass an existing .gguf file as target.")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - gguf raises ValueError, struct.error, ... on a damaged file
        raise CheckpointError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); download it again.") \
            from None
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{path.name}: GGUF architecture {arch!r} is not served from GGUF (supported: "
                          f"{', '.join(ARCHITECTURES)}); convert it to safetensors and load that directory.")
    unknown = sorted({f"{t.name} ({t.tensor_type.name})" for t in reader.tensors
                      if t.tensor_type.name not in FLOAT_TYPES and t.tensor_type.name not in QUANT_TYPES})
    if unknown:
        raise ConfigError(f"{path.name}: tensor types we do not read: {', '.join(unknown[:4])}"
                          f"{' ...' if len(unknown) > 4 else ''}. We read {', '.join([*FLOAT_TYPES, *QUANT_TYPES])}; "
                          "requantize with llama.cpp's llama-quantize to Q8_0 or Q4_1.")
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    heads = {"self_attn.q_proj": config.num_attention_heads,
             "self_attn.k_proj": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    state, kinds = {}, set()
    names = {t.name for t in reader.tensors}
    for t in reader.tensors:
        name, kind = hf_name(t.name), t.tensor_type.name
        cols, rows = (int(x) for x in (list(t.shape) + [1])[:2])  # GGUF lists dims innermost first
        module = name.rsplit(".", 1)[0]
        order = next((_unpermute(h, rows) for suffix, h in heads.items() if module.endswith(suffix)), None)
        linear = name.endswith("proj.weight") or name == "lm_head.weight"
        if kind in QUANT_TYPES:
            kinds.add(kind)
            panels = quant_blocks(kind, np.asarray(t.data), rows, cols)
            if linear:
                set_module(model, module, QuantLinear(panels if order is None else _reorder(panels, order)))
                continue
            value = quant_gemm.dequantize(panels)
            if name == "model.embed_tokens.weight" and "output.weight" not in names:  # a tied head: the same blocks
                set_module(model, "lm_head", QuantLinear(panels))
        else:
            value = _float(t).reshape(rows, cols) if len(t.shape) > 1 else _float(t).reshape(-1)
            if order is not None:
                value = value[order]
            if kind == "BF16" and cols % quant_gemm.GROUP == 0 and (linear or (
                    name == "model.embed_tokens.weight" and "output.weight" not in names)):
                kinds.add(kind)  # bfloat16 linears stay bfloat16 (exact: the file's values), on the bf16 kernel
                panels = quant_gemm.quantize(value, 16)
                if linear:
                    set_module(model, module, QuantLinear(panels))
                    continue
                set_module(model, "lm_head", QuantLinear(panels))
        state[name] = value
    if "output.weight" not in names and not isinstance(model.lm_head, QuantLinear):
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=False, assign=True)
    _materialize(model, config)
    model.eval()
    model.config.specdec_quantization = ("int4" if kinds & {"Q4_0", "Q4_1"} else "int8" if kinds & {"Q8_0"}
                                         else "bf16" if kinds else None)
    model.config.specdec_gguf = str(path)
    return model, tokenizer


def _reorder(p: quant_gemm.QuantPanels, order: torch.Tensor) -> quant_gemm.QuantPanels:
    q, d, m = quant_gemm.unpacked(p)
    return quant_gemm.pack(p.bits, q[order], d[order], None if m is None else m[order])


def _materialize(model, config) -> None:
    """Buffers the file does not hold (the rotary inverse frequencies) made on the CPU, and a check that no
    parameter was left unfilled."""
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(f"the GGUF file lacks tensors for {', '.join(missing[:4])}"
                              f"{' ...' if len(missing) > 4 else ''}")
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding") and any(b.is_meta for b in module.buffers()):
            set_module(model, name, type(module)(config=config))
    leftover = [n for n, b in model.named_buffers() if b is not None and b.is_meta]
    if leftover:
        raise CheckpointError(f"could not build {', '.join(leftover[:4])} for the GGUF model")
