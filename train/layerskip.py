"""Fit the layer-skip self-draft: ``python -m train.layerskip [train=smoke|cpu|gpu] drafter.skip_layers=[...]``.

The draft model is the target with ``skip_layers`` (whole decoder layers) and ``skip_attention`` (attention
sublayers only) left out (:func:`drafters.layerskip.skip_view`); ``skip_layers=auto`` picks ``num_skip`` layers
greedily, each time the one whose removal keeps validation top-1 agreement highest. The only trainable part is
the exit adapter (:class:`drafters.layerskip.ExitAdapter`) on the view's last hidden state. Loss per position on
``loss_mask & valid``: ``KL(p || q)`` with ``p = softmax(lm_head(hidden))`` (the target's distribution, from the
feature shards) and ``q`` the view's distribution, run teacher-forced over the same tokens (no cache).
``adapter_rank=0``: no adapter; the job measures agreement and tau and writes a checkpoint without weights.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from drafters.layerskip import (
    DEFAULT_DEPTH,
    KIND,
    ExitAdapter,
    LayerSkipDrafter,
    check_skips,
    skip_view,
)
from specdec.errors import ConfigError
from specdec.models import vocab_size
from specdec.models.surgery import decoder
from train.features import Batch, FeatureSet
from train.job import JobSpec, check_keys, draft_vocabulary, hydra_main

OPTIONS = {"skip_layers", "skip_attention", "num_skip", "auto_sequences", "adapter_rank", "depth",
           "draft_vocab_size"}
EVAL_BATCH = 8  # validation sequences per forward


class LayerSkipTrainModule(nn.Module):
    """The trainable exit adapter, a frozen copy of the target's final norm, and the target's LM head weight.

    The skip view itself (``self.view``) is deliberately not a registered submodule: it is the frozen target (not
    trained, not saved, never moved or switched to train mode by the trainer). It runs on the target's device;
    its pre-norm hidden states ``[B, L, H]`` move to the adapter's device for the rest.
    """

    def __init__(self, target, skip_layers: list[int], skip_attention: list[int], rank: int, opts: dict) -> None:
        super().__init__()
        self.skip_layers, self.skip_attention = check_skips(len(decoder(target).layers), skip_layers, skip_attention)
        self.opts = opts
        self.rank = rank
        self.adapter = ExitAdapter(int(target.config.hidden_size), rank) if rank > 0 else None
        if rank == 0:  # the trainer needs a parameter; this one only makes the no-op steps well defined
            self.noop = nn.Parameter(torch.zeros(()))
        self.norm = copy.deepcopy(decoder(target).norm).float().requires_grad_(False)
        head = target.get_output_embeddings()
        self.register_buffer("lm_w", head.weight.detach(), persistent=False)
        self.register_buffer("lm_b", None if getattr(head, "bias", None) is None else head.bias.detach(),
                             persistent=False)
        self.__dict__["view"] = skip_view(target, self.skip_layers, self.skip_attention, final_norm=False)
        self.__dict__["val_cache"] = None  # validation exit states: the frozen view's part never changes

    @property
    def device(self) -> torch.device:
        return self.lm_w.device

    def logits(self, h: torch.Tensor, adapter: bool = True) -> torch.Tensor:
        """Draft logits ``[P, V]`` (float32) from the view's pre-norm exit states ``h [P, H]``."""
        h = h.to(self.device).float()
        if adapter and self.adapter is not None:
            h = self.adapter(h)
        bias = None if self.lm_b is None else self.lm_b.float()
        return F.linear(self.norm(h), self.lm_w.float(), bias)


def exit_states(view, batch: Batch) -> torch.Tensor:
    """The skip view's last hidden state before the final norm, ``[B, L, H]``, teacher-forced over ``batch.tokens``
    (right-padded; ``batch.valid`` is the attention mask), on the view's device, without gradients."""
    dev = next(view.parameters()).device
    with torch.no_grad():
        out = decoder(view)(input_ids=batch.tokens.to(dev), attention_mask=batch.valid.to(dev).long(),
                            use_cache=False)
    return out.last_hidden_state


def make_module(target, data, cfg: dict) -> LayerSkipTrainModule:
    opts = dict(cfg["drafter"])
    check_keys(opts, OPTIONS, "drafter (layerskip training)")
    skip_attention = list(opts.get("skip_attention") or [])
    skip_layers = opts.get("skip_layers") or []
    if skip_layers == "auto":
        skip_layers = greedy_skip(target, data.val, int(opts.get("num_skip") or 0), skip_attention,
                                  int(opts.get("auto_sequences") or EVAL_BATCH))
    elif isinstance(skip_layers, str):
        raise ConfigError(f"drafter.skip_layers must be a list of layer indices or 'auto'; got {skip_layers!r}.")
    rank = int(opts.get("adapter_rank") or 0)
    if rank < 0:
        raise ConfigError(f"drafter.adapter_rank must be >= 0 (0 = no adapter); got {rank}.")
    return LayerSkipTrainModule(target, list(skip_layers), skip_attention, rank, opts)


def loss_fn(module: LayerSkipTrainModule, batch: Batch) -> tuple[torch.Tensor, dict]:
    """Mean ``KL(p || q)`` over the positions on ``loss_mask & valid`` (see the module docstring)."""
    if module.adapter is None:
        return module.noop * 0.0, {}
    sel = batch.loss_mask & batch.valid  # [B, L]
    h = exit_states(module.view, batch)[sel.to(module.view.device)]  # [P, H]
    if h.shape[0] == 0:
        return sum(p.sum() for p in module.adapter.parameters()) * 0.0, {}
    logq = torch.log_softmax(module.logits(h), dim=-1)  # [P, V]
    bias = None if module.lm_b is None else module.lm_b.float()
    logp = torch.log_softmax(F.linear(batch.hidden[sel].float(), module.lm_w.float(), bias), dim=-1)
    kl = F.kl_div(logq, logp, log_target=True, reduction="batchmean")
    top1 = (logq.argmax(-1) == batch.target_top1[sel]).float().mean()
    return kl, {"kl": float(kl.detach()), "top1": float(top1)}


@torch.no_grad()
def _val_states(module: LayerSkipTrainModule, val: FeatureSet) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per validation batch: exit states ``[P, H]`` and the target's top-1 ``[P]`` at ``loss_mask & valid``."""
    if module.val_cache is None:
        out = []
        for s in range(0, len(val), EVAL_BATCH):
            batch = val.batch(list(range(s, min(len(val), s + EVAL_BATCH))))
            sel = batch.loss_mask & batch.valid
            out.append((exit_states(module.view, batch)[sel.to(module.view.device)], batch.target_top1[sel]))
        module.__dict__["val_cache"] = out
    return module.val_cache


@torch.no_grad()
def agreement(module: LayerSkipTrainModule, val: FeatureSet, adapter: bool = True) -> float:
    """How often the draft's argmax is the target's greedy next token on validation positions."""
    hits = count = 0
    for h, top1 in _val_states(module, val):
        if h.shape[0]:
            hits += int((module.logits(h, adapter).argmax(-1).cpu() == top1).sum())
            count += h.shape[0]
    return hits / max(1, count)


def metrics(module: LayerSkipTrainModule, val: FeatureSet) -> dict:
    """``top1``: agreement of the drafter as trained; ``top1_skip``: of the plain skip model (before training)."""
    out = {"top1": agreement(module, val)}
    if module.adapter is not None:
        if "top1_skip" not in module.__dict__:
            module.__dict__["top1_skip"] = agreement(module, val, adapter=False)
        out["top1_skip"] = module.top1_skip
    return out


@torch.inference_mode()
def _skip_top1(target, skip_layers: list[int], skip_attention: list[int], batch: Batch) -> float:
    view = skip_view(target, skip_layers, skip_attention, final_norm=False)
    sel = batch.loss_mask & batch.valid
    h = exit_states(view, batch)[sel.to(view.device)]
    logits = target.get_output_embeddings()(decoder(target).norm(h))
    return float((logits.argmax(-1).cpu() == batch.target_top1[sel]).float().mean()) if h.shape[0] else 0.0


def greedy_skip(target, val: FeatureSet, num_skip: int, skip_attention: list[int], sequences: int = 8) -> list[int]:
    """``num_skip`` layers to skip, added one at a time: each round the layer whose removal keeps top-1 agreement
    on the first ``sequences`` validation sequences highest (ties: the later layer).

    Cost: about ``num_skip * num_layers`` forwards of the (shrinking) target over those sequences.
    Example: on a 30-layer target with ``num_skip=8`` -> e.g. ``[14, 17, 19, 21, 23, 24, 26, 27]``.
    """
    n = len(decoder(target).layers)
    check_skips(n, [], skip_attention)
    candidates = [i for i in range(1, n) if i not in skip_attention]
    if not 0 < num_skip <= len(candidates):
        raise ConfigError(f"drafter.skip_layers=auto needs 1 <= drafter.num_skip <= {len(candidates)} for this "
                          f"{n}-layer target; got {num_skip}.")
    batch = val.batch(list(range(min(len(val), max(1, sequences)))))
    chosen: list[int] = []
    for _ in range(num_skip):
        scores = {c: _skip_top1(target, chosen + [c], skip_attention, batch) for c in candidates if c not in chosen}
        best = max(scores, key=lambda c: (scores[c], c))
        chosen.append(best)
        print(f"layerskip auto: skip layer {best} (validation top-1 agreement {scores[best]:.3f})")
    return sorted(chosen)


def _adapter_copy(module: LayerSkipTrainModule, hidden_size: int) -> ExitAdapter | None:
    if module.adapter is None:
        return None
    adapter = ExitAdapter(hidden_size, module.rank)
    adapter.load_state_dict({k: v.detach().cpu() for k, v in module.adapter.state_dict().items()})
    return adapter


def draft_vocab(module: LayerSkipTrainModule, target, data) -> torch.Tensor | None:
    """The draft vocabulary (:func:`train.job.draft_vocabulary`) whose LM-head rows the drafter scores; None when
    ``draft_vocab_size`` is 0 or covers the whole vocabulary."""
    d2t = draft_vocabulary(target, data, int(module.opts.get("draft_vocab_size") or 0))
    return d2t if len(d2t) < vocab_size(target) else None


def make_drafter(target, tokenizer, module: LayerSkipTrainModule, data) -> LayerSkipDrafter:
    """The drafter as it would ship now (a copy of the adapter; the target is only viewed)."""
    return LayerSkipDrafter(target, tokenizer, skip_layers=module.skip_layers, skip_attention=module.skip_attention,
                            adapter=_adapter_copy(module, int(target.config.hidden_size)),
                            depth=int(module.opts.get("depth") or DEFAULT_DEPTH), d2t=draft_vocab(module, target, data))


def export(module: LayerSkipTrainModule, target, data, val_metrics: dict, cfg: dict) -> tuple[dict, dict]:
    """Adapter weights (none when ``adapter_rank=0``), the draft vocabulary (if any) and the drafter config the
    checkpoint carries."""
    state = {} if module.adapter is None else {k: v.detach().cpu() for k, v in module.adapter.state_dict().items()}
    d2t = draft_vocab(module, target, data)
    if d2t is not None:
        state["d2t"] = d2t
    config = {"skip_layers": module.skip_layers, "skip_attention": module.skip_attention,
              "adapter_rank": module.rank, "depth": int(module.opts.get("depth") or DEFAULT_DEPTH),
              "num_layers": len(decoder(target).layers), "draft_vocab_size": int(module.opts.get("draft_vocab_size") or 0)}
    return state, config


SPEC = JobSpec(kind=KIND, make_module=make_module, loss_fn=loss_fn, metrics=metrics, make_drafter=make_drafter,
               export=export)
main = hydra_main(SPEC, "layerskip")

if __name__ == "__main__":
    main()
