"""Medusa heads in vLLM's layout (``MedusaModel``) and FasterDecoding's, both ways.

vLLM (``model_executor/models/medusa.py``, ``transformers_utils/configs/medusa.py``) reads ``config.json`` with
``architectures: ["MedusaModel"]``, ``model_type: medusa``, ``hidden_size``, ``vocab_size``, ``num_heads``,
``num_hidden_layers`` (blocks per head), ``medusa_fc_bias`` (the blocks' linear layers have a bias; default
false), ``truncated_vocab_size`` and ``original_lm_head``, and these weights::

    ours (drafters.medusa.MedusaHeads)       vLLM                                FasterDecoding (medusa_lm_head.*)
    blocks.{h}.{l}.linear.weight / .bias  <-> blocks.{h}.layers.{l}.weight / .bias  {h}.{l}.linear.weight / .bias
    lm_heads.{h}.weight [V_draft, H]      <-> lm_heads.{h}.weight                   {h}.{num_layers}.weight
                                              (original_lm_head: one lm_head.weight for every head)
    d2t [V_draft] (target ids, ascending) <-> token_map (when truncated_vocab_size < vocab_size)

(FasterDecoding's keys may carry a ``medusa_head.``/``medusa_heads.`` prefix; vLLM strips the latter and remaps
the bare ones, as we do.) The math is the same: a block is ``x + SiLU(W x + b)``, a head's logits
``lm_head(blocks(h))``, and ``h`` is the target's last hidden state after its final norm, at the last accepted
token, in both (vLLM's Medusa proposer reads the target model's output hidden states). Head ``k`` (0-based)
guesses the token ``k + 2`` places after ``h``'s position, in both. With a token map vLLM scatters a head's
``V_draft`` logits into the target vocabulary (-inf elsewhere), as our ``d2t`` does.

What does not translate one to one:

- vLLM creates block biases only with ``medusa_fc_bias: true`` and silently drops biases otherwise. We import the
  biases the weights hold (FasterDecoding's blocks always have one; its configs never set the flag), and zeros
  when there are none or the config sets ``medusa_fc_bias: false``; we export with ``medusa_fc_bias: true``.
- vLLM builds a per-head LM head over the full vocabulary and its loader asserts the full row count, so a
  truncated vocabulary loads only with one shared head (``original_lm_head: true``). Export therefore writes a
  reduced vocabulary exactly when all our heads' LM heads are equal, and otherwise refuses, unless asked for
  ``pad_vocab=True``: full-vocabulary heads whose rows outside the draft vocabulary are zero (logit 0 instead of
  -inf; vLLM's top-1 then differs from ours where every draft-vocabulary logit of a head is negative. Outputs stay
  lossless: vLLM verifies every draft token).
- ``logit_scale`` other than 1 is refused (we do not scale head logits).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from specdec.interop.files import read_weights, write_dir
from specdec.models.checkpoint import CheckpointError

ARCHITECTURE = "MedusaModel"
_BLOCK = re.compile(r"blocks\.(\d+)\.layers\.(\d+)\.(weight|bias)$")
_HEAD = re.compile(r"lm_heads\.(\d+)\.weight$")


def detect(config: dict) -> bool:
    archs = config.get("architectures") or []
    if "speculators_model_type" in config or any("eagle" in a.lower() for a in archs):
        return False
    return ARCHITECTURE in archs or config.get("model_type") == "medusa" or "medusa_num_heads" in config


def vllm_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any accepted key spelling -> vLLM's (``blocks.{h}.layers.{l}.*``, ``lm_heads.{h}.weight``,
    ``lm_head.weight``, ``token_map``), as vLLM's ``Medusa.load_weights`` remaps FasterDecoding's
    ``{h}.{l}.linear.*`` and ``{h}.{N}.weight``."""
    out = {}
    for name, v in state.items():
        for prefix in ("medusa_heads.", "medusa_head."):
            if name.startswith(prefix):
                name = name[len(prefix):]
        parts = name.split(".")
        if len(parts) >= 3 and parts[0].isdigit() and parts[1].isdigit():
            head, layer, rest = parts[0], parts[1], parts[2:]
            name = (f"blocks.{head}.layers.{layer}.{'.'.join(rest[rest.index('linear') + 1:])}" if "linear" in rest
                    else f"lm_heads.{head}.{'.'.join(rest)}")
        out[name] = v
    return out


def _count(config: dict, keys: tuple[str, ...], found: int) -> int:
    """A head/layer count from the config (vLLM maps any ``*num*heads*``/``*num*layers*`` key), else the weights'."""
    for k in keys:
        if config.get(k) is not None:
            return int(config[k])
    return found


def _draft_vocab(config: dict, weights: dict, rows: int, where: Path) -> tuple[int, torch.Tensor, torch.Tensor | None]:
    """``(V, d2t ascending, order)``: the target vocabulary, the draft vocabulary's target ids, and the permutation
    that sorts ``token_map`` (None: rows are the target vocabulary, or already in order)."""
    vocab = int(config.get("vocab_size") or rows)
    truncated = int(config.get("truncated_vocab_size") or vocab)
    if truncated >= vocab:  # vLLM ignores a token_map then
        if rows != vocab:
            raise CheckpointError(f"{where}: LM heads have {rows} rows but the vocabulary is {vocab} tokens and "
                                  "no truncated_vocab_size says otherwise.")
        return vocab, torch.arange(vocab), None
    if "token_map" not in weights:
        raise CheckpointError(f"{where}: truncated_vocab_size {truncated} < vocab_size {vocab} but the weights hold "
                              "no token_map (the target id of each draft row).")
    token_map = weights["token_map"].long().flatten()
    if len(token_map) != truncated or len(set(token_map.tolist())) != truncated or \
            int(token_map.min()) < 0 or int(token_map.max()) >= vocab:
        raise CheckpointError(f"{where}: token_map must hold {truncated} distinct target ids below {vocab}.")
    d2t, order = torch.sort(token_map)
    return vocab, d2t, order


def _draft_rows(rows: torch.Tensor, vocab: int, d2t: torch.Tensor, order: torch.Tensor | None, what: str
                ) -> torch.Tensor:
    """``[V_draft, H]`` LM-head rows in ``d2t`` order from full rows ``[V, H]`` (the token map's, as vLLM takes
    them) or from draft rows in ``token_map`` order (sorted by ``order``)."""
    if order is None or rows.shape[0] not in (vocab, len(d2t)):
        if rows.shape[0] != len(d2t):
            raise CheckpointError(f"{what} has {rows.shape[0]} rows, neither the vocabulary ({vocab}) nor the "
                                  f"draft vocabulary ({len(d2t)}).")
        return rows
    return rows[d2t] if rows.shape[0] == vocab else rows[order]


def load(path: Path, config: dict, allow_pickle: bool) -> tuple[dict, dict]:
    weights = vllm_names(read_weights(path, allow_pickle))
    if float(config.get("logit_scale", 1.0)) != 1.0:
        raise CheckpointError(f"{path}: logit_scale {config['logit_scale']} is not implemented by specdec's medusa "
                              "heads; these heads cannot be run exactly here.")
    blocks = [tuple(map(int, m.groups()[:2])) for k in weights if (m := _BLOCK.match(k))]
    heads_found = 1 + max([h for h, _ in blocks] + [int(m.group(1)) for k in weights if (m := _HEAD.match(k))],
                          default=-1)
    num_heads = _count(config, ("num_heads", "medusa_num_heads"), heads_found)
    num_layers = _count(config, ("num_hidden_layers", "medusa_num_layers"), 1 + max([l for _, l in blocks], default=-1))
    shared = config.get("original_lm_head", False)
    shared_rows = weights.get("lm_head.weight", weights.get("lm_heads.0.weight"))
    lm = [shared_rows if shared else weights.get(f"lm_heads.{h}.weight") for h in range(num_heads)]
    missing = [f"lm_heads.{h}.weight" for h, w in enumerate(lm) if w is None]
    if missing or num_heads < 1:
        raise CheckpointError(f"{path}: {num_heads} Medusa heads but no LM head weights {missing[:3]}; is this a "
                              "Medusa checkpoint (config.json num_heads / medusa_num_heads)?")
    hidden = int(lm[0].shape[1])
    vocab, d2t, order = _draft_vocab(config, weights, int(lm[0].shape[0]), path)
    bias = config.get("medusa_fc_bias", True)  # FasterDecoding's blocks have a bias; only an explicit false drops it
    state: dict[str, torch.Tensor] = {"d2t": d2t}
    for h in range(num_heads):
        for layer in range(num_layers):
            w = weights.get(f"blocks.{h}.layers.{layer}.weight")
            if w is None:
                raise CheckpointError(f"{path}: no weight for block {layer} of head {h} (blocks.{h}.layers.{layer}"
                                      f".weight or {h}.{layer}.linear.weight); num_hidden_layers is {num_layers}.")
            b = weights.get(f"blocks.{h}.layers.{layer}.bias")
            state[f"blocks.{h}.{layer}.linear.weight"] = w
            if b is None or not bias:  # no bias: zeros compute the same function
                b = torch.zeros(hidden, dtype=w.dtype)
            state[f"blocks.{h}.{layer}.linear.bias"] = b
        state[f"lm_heads.{h}.weight"] = _draft_rows(lm[h], vocab, d2t, order, f"{path}: LM head {h}")
    cfg = {"num_heads": num_heads, "num_layers": num_layers, "hidden_size": hidden, "vocab_size": vocab,
           "draft_vocab_size": len(d2t)}
    return state, {"format": 1, "kind": "medusa", "config": cfg, "target": None, "source": "medusa"}


def _vocab_size(state: dict, meta: dict) -> int:
    """The target vocabulary: from the fingerprint, an imported config, or an identity ``d2t``."""
    d2t = state["d2t"].long()
    for known in ((meta.get("target") or {}).get("vocab_size"), meta["config"].get("vocab_size")):
        if known is not None:
            return int(known)
    if torch.equal(d2t, torch.arange(len(d2t))):
        return len(d2t)
    raise CheckpointError("this medusa checkpoint has a reduced draft vocabulary but records no target vocabulary "
                          "size; re-save it with its target (checkpoint.save(..., target=...)).")


def export(state: dict, meta: dict, out_dir: Path, pad_vocab: bool = False) -> Path:
    """Write our ``medusa`` checkpoint as a vLLM ``MedusaModel`` directory (``pad_vocab``: see the module doc)."""
    if meta.get("kind") != "medusa":
        raise CheckpointError(f"the medusa layout holds medusa heads, not a {meta.get('kind')!r} drafter.")
    num_heads, num_layers = int(meta["config"]["num_heads"]), int(meta["config"]["num_layers"])
    d2t = state["d2t"].long().cpu()
    vocab = _vocab_size(state, meta)
    lm = [state[f"lm_heads.{h}.weight"] for h in range(num_heads)]
    hidden = int(lm[0].shape[1])
    out = {f"blocks.{h}.layers.{layer}.{p}": state[f"blocks.{h}.{layer}.linear.{p}"]
           for h in range(num_heads) for layer in range(num_layers) for p in ("weight", "bias")}
    config = {"architectures": [ARCHITECTURE], "model_type": "medusa", "hidden_size": hidden, "vocab_size": vocab,
              "num_heads": num_heads, "num_hidden_layers": num_layers, "medusa_fc_bias": True,
              "truncated_vocab_size": vocab, "torch_dtype": str(lm[0].dtype).removeprefix("torch.")}
    if torch.equal(d2t, torch.arange(vocab)):
        out |= {f"lm_heads.{h}.weight": w for h, w in enumerate(lm)}
    elif all(torch.equal(lm[0], w) for w in lm[1:]):  # one shared head: vLLM's only truncated layout
        out |= {"lm_head.weight": lm[0], "token_map": d2t}
        config |= {"truncated_vocab_size": len(d2t), "original_lm_head": True}
    elif pad_vocab:
        for h, w in enumerate(lm):
            full = w.new_zeros(vocab, hidden)
            full[d2t] = w
            out[f"lm_heads.{h}.weight"] = full
    else:
        raise CheckpointError(
            f"these heads have a reduced draft vocabulary ({len(d2t)} of {vocab} tokens) and distinct LM heads: vLLM "
            "loads a truncated vocabulary only with one shared LM head (original_lm_head), so no exact export "
            "exists. Pass --pad-vocab (specdec export) or pad_vocab=True (specdec.interop.export) for full-vocabulary heads "
            "with zero rows outside the draft vocabulary (vLLM's proposals then differ from ours where every "
            "draft-vocabulary logit of a head is negative; outputs stay lossless).")
    return write_dir(out_dir, config, out)
