"""Distil a small draft model from the target: ``python -m train.draft_model [train=smoke|cpu|gpu] output_dir=...``.

The draft model is the target's own architecture cut to ``num_layers`` decoder layers, initialised from chosen
target layers (``init_layers``: ``spread`` = evenly spaced, first and last included), with the target's embedding,
final norm and LM head (tied or not, as the target's). It shares the target's tokenizer, so its tokens need no
mapping. The embedding and LM head stay frozen (equal to the target's); the layers and the final norm train, fully
(``lora_rank: 0``) or through LoRA adapters on the layers' linear modules (``lora_rank > 0``, peft).

Loss at each position ``i`` whose next token is a training target: a divergence between the target's next-token
distribution ``p = softmax(lm_head(hidden_i))`` (the teacher, from the feature shards) and the draft model's
``q``: ``forward_kl`` = KL(p || q), or ``tv`` = total variation 0.5 * sum |p - q| -- what speculative sampling
pays for directly, since a draft token is accepted with probability 1 - TV(p, q).

The checkpoint keeps only what differs from the target: the layers and the final norm (``save_dtype``, LoRA merged
in); :class:`drafters.draft_model.DraftModelDrafter` rebuilds the model on the target's embedding and LM head.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from drafters.draft_model import KIND, DraftModelDrafter
from specdec import models
from specdec.errors import ConfigError
from specdec.models.surgery import decoder, from_state, init_from_target, own_modules, resolve_init_layers
from train.features import Batch, FeatureSet
from train.job import JobSpec, check_keys, draft_vocabulary, hydra_main

OPTIONS = {"num_layers", "init_layers", "loss", "lora_rank", "lora_alpha", "save_dtype", "depth", "width",
           "draft_vocab_size"}
LOSSES = ("forward_kl", "tv")


# ---------------------------------------------------------------------------------------------- losses (pure)


def forward_kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row: ``[..., V]`` log-probabilities -> ``[...]`` (terms with p = 0 count 0).

    >>> p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    >>> round(float(forward_kl(p.log(), q.log())), 6)  # 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln(4/3)
    0.143841
    """
    p = p_logp.exp()
    return torch.where(p > 0, p * (p_logp - q_logp), torch.zeros_like(p)).sum(-1)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """0.5 * sum |p - q| per row: ``[..., V]`` probabilities -> ``[...]`` in [0, 1]; 1 - TV is the probability
    that speculative sampling accepts a token drawn from q.

    >>> float(total_variation(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0])))
    0.5
    """
    return 0.5 * (p - q).abs().sum(-1)


def distill_loss(draft_logits: torch.Tensor, teacher_logits: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-position loss ``[N]`` from draft and teacher logits ``[N, V]`` (computed in float32)."""
    q_logp = torch.log_softmax(draft_logits.float(), dim=-1)
    p_logp = torch.log_softmax(teacher_logits.float(), dim=-1)
    if loss == "forward_kl":
        return forward_kl(p_logp, q_logp)
    if loss == "tv":
        return total_variation(p_logp.exp(), q_logp.exp())
    raise ConfigError(f"unknown loss {loss!r}; choose one of {LOSSES}.")


# ---------------------------------------------------------------------------------------------- the module


class DraftTrainModule(nn.Module):
    """The draft model being distilled (a peft model when ``lora_rank > 0``); ``layers`` = the target layers its
    own layers started from. Shares no tensor with the target."""

    def __init__(self, draft: nn.Module, layers: list[int], opts: dict) -> None:
        super().__init__()
        self.draft = draft
        self.layers = layers
        self.opts = opts

    @property
    def causal_lm(self) -> nn.Module:
        """The draft causal LM (LoRA layers, if any, injected in place)."""
        return self.draft.get_base_model() if hasattr(self.draft, "get_base_model") else self.draft


def lora_targets(model: nn.Module) -> list[str]:
    """Full names of the linear modules inside the decoder layers (the LoRA targets; the LM head excluded)."""
    prefix = next(n for n, m in model.named_modules() if m is decoder(model).layers)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix + ".")]


def make_module(target, data, cfg: dict) -> DraftTrainModule:
    opts = dict(cfg["drafter"])
    check_keys(opts, OPTIONS, "drafter (draft_model training)")
    if opts.get("loss", "tv") not in LOSSES:
        raise ConfigError(f"drafter.loss must be one of {LOSSES}; got {opts.get('loss')!r}.")
    layers = resolve_init_layers(opts.get("init_layers", "spread"), opts.get("num_layers"),
                                 int(target.config.num_hidden_layers))
    draft = init_from_target(target, layers, torch.float32)
    draft.requires_grad_(False)
    rank = int(opts.get("lora_rank") or 0)
    if rank > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=rank, lora_alpha=int(opts.get("lora_alpha") or 2 * rank), lora_dropout=0.0,
                          target_modules=lora_targets(draft), bias="none")
        draft = get_peft_model(draft, lora)  # base weights frozen, adapters trainable
    else:
        own_modules(draft).requires_grad_(True)  # layers + final norm; embedding and LM head stay frozen
    return DraftTrainModule(draft, layers, opts)


def positions(batch: Batch) -> torch.Tensor:
    """``[B, L]`` bool: positions whose *next* token is a training target (so the draft learns to predict the
    answer's tokens, the first one included, from the context before them)."""
    m = torch.zeros_like(batch.valid)
    m[:, :-1] = batch.loss_mask[:, 1:] & batch.valid[:, 1:]
    return m


def logits_at(module: DraftTrainModule, batch: Batch, where: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draft and teacher logits ``[N, V]`` at the ``N`` positions of ``where [B, L]`` (the LM head is applied there
    only: full ``[B, L, V]`` logits would dominate memory)."""
    lm = module.causal_lm
    # [B, L, H]; no attention mask needed: right padding comes after every valid position (causal attention)
    h = decoder(lm)(input_ids=batch.tokens, use_cache=False).last_hidden_state
    head = lm.get_output_embeddings()
    with torch.no_grad():
        teacher = head(batch.hidden[where].to(head.weight.dtype))
    return head(h[where]), teacher


def loss_fn(module: DraftTrainModule, batch: Batch) -> tuple[torch.Tensor, dict]:
    where = positions(batch)
    draft, teacher = logits_at(module, batch, where)
    per = distill_loss(draft, teacher, module.opts.get("loss", "tv"))
    top1 = batch.target_top1[where]
    return per.mean(), {"top1": float((draft.argmax(-1) == top1).float().mean())}


@torch.no_grad()
def metrics(module: DraftTrainModule, val: FeatureSet, batch_size: int = 8) -> dict:
    """Validation means over predicted positions: ``tv`` (1 - expected acceptance of one sampled draft token),
    ``forward_kl``, ``acceptance`` = 1 - tv, and ``top1`` (the draft's argmax is the target's)."""
    dev = next(module.parameters()).device
    sums = {"tv": 0.0, "forward_kl": 0.0, "top1": 0.0}
    count = 0
    for s in range(0, len(val), batch_size):
        b = val.batch(list(range(s, min(len(val), s + batch_size))))
        b = b.to(dev)
        where = positions(b)
        draft, teacher = logits_at(module, b, where)
        sums["tv"] += float(distill_loss(draft, teacher, "tv").sum())
        sums["forward_kl"] += float(distill_loss(draft, teacher, "forward_kl").sum())
        sums["top1"] += float((draft.argmax(-1) == b.target_top1[where]).sum())
        count += int(where.sum())
    out = {k: v / max(1, count) for k, v in sums.items()}
    out["acceptance"] = 1.0 - out["tv"]
    return out


# ---------------------------------------------------------------------------------------------- export


@torch.no_grad()
def merged(module: DraftTrainModule) -> nn.Module:
    """The draft causal LM with LoRA merged into the layers' weights (a copy; the training module is untouched)."""
    draft = copy.deepcopy(module.draft)
    return draft.merge_and_unload() if hasattr(draft, "merge_and_unload") else draft


def own_state(module: DraftTrainModule, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """What the checkpoint ships: the layers + final norm (keys ``layers.<i>.*``, ``norm.*``), LoRA merged."""
    return {k: v.detach().cpu().to(dtype or v.dtype).contiguous()
            for k, v in own_modules(merged(module)).state_dict().items()}


def drafter_config(module: DraftTrainModule) -> dict:
    opts = module.opts
    return {"num_layers": len(module.layers), "init_layers": list(module.layers), "loss": opts.get("loss", "tv"),
            "lora_rank": int(opts.get("lora_rank") or 0), "depth": int(opts.get("depth") or 4),
            "width": int(opts.get("width") or 1), "draft_vocab_size": int(opts.get("draft_vocab_size") or 0),
            "hf_config": module.causal_lm.config.to_dict()}


def draft_vocab(module: DraftTrainModule, target, data) -> dict[str, torch.Tensor]:
    """``{"d2t": ids}``: the draft vocabulary (:func:`train.job.draft_vocabulary`) whose LM-head rows the shipped
    drafter scores; ``{}`` when ``draft_vocab_size`` is 0 or covers the vocabulary (the full head)."""
    d2t = draft_vocabulary(target, data, int(module.opts.get("draft_vocab_size") or 0))
    return {"d2t": d2t} if len(d2t) < models.vocab_size(target) else {}


def make_drafter(target, tokenizer, module: DraftTrainModule, data) -> DraftModelDrafter:
    """The drafter as it would ship now: the trained layers on the target's embedding and LM head (its draft
    vocabulary's rows)."""
    cfg = drafter_config(module)
    model = from_state(target, cfg["hf_config"], {**own_state(module), **draft_vocab(module, target, data)})
    return DraftModelDrafter(target, tokenizer, model=model, depth=cfg["depth"], width=cfg["width"])


def export(module: DraftTrainModule, target, data, val_metrics: dict, cfg: dict) -> tuple[dict, dict]:
    dtype = models.resolve_dtype(module.opts.get("save_dtype") or "float32")
    return {**own_state(module, dtype), **draft_vocab(module, target, data)}, drafter_config(module)


SPEC = JobSpec(kind=KIND, make_module=make_module, loss_fn=loss_fn, metrics=metrics, make_drafter=make_drafter,
               export=export)
main = hydra_main(SPEC, "draft_model")

if __name__ == "__main__":
    main()
