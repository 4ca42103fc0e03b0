"""Train Medusa heads: ``python -m train.medusa [train=smoke|cpu|gpu] [drafter.num_heads=4] output_dir=...``.

Loss of head ``k`` (k = 1..K) at position ``i``: head ``k`` reads ``h_i`` and guesses ``x_{i+k+1}``, whose
distribution is the target's at position ``i + k``, ``softmax(h_{i+k} W^T)`` restricted to the draft vocabulary; so
``CE_k(i) = CE(softmax(h_{i+k} W_d^T), head_k(h_i))``, averaged over positions ``i`` whose ``i + k`` is a loss
position. Heads are weighted ``head_decay^(k-1)`` (deeper guesses are harder and count less, as in Medusa).
The exported tree comes from each head's validation top-k accuracy (Medusa's way of choosing the tree).
"""

from __future__ import annotations

import torch
from torch import nn

from drafters.medusa import KIND, MedusaDrafter, MedusaHeads
from drafters.tree_shape import choices_from_accuracy
from train.features import Batch, FeatureSet
from train.job import (
    JobSpec,
    accuracy_metrics,
    check_keys,
    draft_vocabulary,
    hydra_main,
    shipping_state,
)

OPTIONS = {"save_dtype", "num_heads", "num_layers", "draft_vocab_size", "head_decay", "tree_nodes", "ranks"}


class MedusaTrainModule(nn.Module):
    """The trainable heads plus frozen views of the target's LM-head rows for the draft vocab (not saved).

    ``teacher_w [V_draft, H]``: the target's LM-head rows of the draft vocabulary; ``t2d [V]``: target id -> draft id
    (-1 outside the draft vocabulary).
    """

    def __init__(self, heads: MedusaHeads, target, opts: dict) -> None:
        super().__init__()
        self.heads = heads
        self.opts = opts
        w = target.get_output_embeddings().weight.detach()
        self.register_buffer("teacher_w", w[heads.d2t.to(w.device)].float(), persistent=False)
        t2d = torch.full((w.shape[0],), -1, dtype=torch.long)
        t2d[heads.d2t] = torch.arange(len(heads.d2t))
        self.register_buffer("t2d", t2d, persistent=False)


def make_module(target, data, cfg: dict) -> MedusaTrainModule:
    opts = dict(cfg["drafter"])
    check_keys(opts, OPTIONS, "drafter (medusa training)")
    d2t = draft_vocabulary(target, data, int(opts["draft_vocab_size"]))
    heads = MedusaHeads.for_target(target, int(opts["num_heads"]), int(opts["num_layers"]), d2t)
    heads.init_from_target(target)
    return MedusaTrainModule(heads.float(), target, opts)


def teacher_probs(module: MedusaTrainModule, hidden: torch.Tensor) -> torch.Tensor:
    """``[B, L, V_draft]`` the target's next-token distribution at every position, restricted to the draft vocab."""
    return torch.softmax(hidden.float() @ module.teacher_w.T, dim=-1)


def head_terms(module: MedusaTrainModule, batch: Batch, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Head ``k`` (1-based) lined up with its targets: ``(logits [B, L-k, V_draft], mask [B, L-k], top1 [B, L-k])``.

    Row ``i`` pairs head ``k``'s guess from ``h_i`` with position ``i + k``: its mask (loss position, not padding)
    and the target's greedy token there in draft ids (-1 outside the draft vocabulary).
    """
    logits = module.heads.head_logits(batch.hidden[:, :-k], k - 1).float()
    mask = batch.loss_mask[:, k:] & batch.valid[:, k:]
    top1 = module.t2d[batch.target_top1[:, k:]]
    return logits, mask, top1


def loss_fn(module: MedusaTrainModule, batch: Batch) -> tuple[torch.Tensor, dict]:
    """Weighted mean over heads of the masked cross-entropy to the target's shifted distribution."""
    decay = float(module.opts.get("head_decay", 0.8))
    teacher = teacher_probs(module, batch.hidden)
    total, weights, metrics = 0.0, 0.0, {}
    for k in range(1, module.heads.num_heads + 1):
        logits, mask, top1 = head_terms(module, batch, k)
        m = mask.float()
        denom = m.sum().clamp_min(1.0)
        logp = torch.log_softmax(logits, dim=-1)
        ce = (-(teacher[:, k:] * logp).sum(-1) * m).sum() / denom
        w = decay ** (k - 1)
        total, weights = total + w * ce, weights + w
        metrics[f"head{k}_ce"] = float(ce.detach())
        metrics[f"head{k}_top1"] = float(((logp.argmax(-1) == top1).float() * m).sum() / denom)
    return total / weights, metrics


@torch.no_grad()
def rank_accuracy(module: MedusaTrainModule, val: FeatureSet, ranks: int = 4, batch_size: int = 8) -> list[list[float]]:
    """``acc[k][r]``: how often head ``k + 1``'s rank-``r`` candidate is the target's greedy token (validation)."""
    device = module.teacher_w.device
    num_heads = module.heads.num_heads
    hits = torch.zeros(num_heads, ranks)
    counts = torch.zeros(num_heads, 1)
    for s in range(0, len(val), batch_size):
        batch = val.batch(list(range(s, min(len(val), s + batch_size))))
        batch = batch.to(device)
        for k in range(1, num_heads + 1):
            logits, mask, top1 = head_terms(module, batch, k)
            cand = logits.topk(min(ranks, logits.shape[-1]), dim=-1).indices  # [B, L-k, R]
            hit = ((cand == top1[..., None]) & mask[..., None]).flatten(0, 1).sum(0).float().cpu()
            hits[k - 1, :len(hit)] += hit
            counts[k - 1] += mask.sum().cpu()
    return (hits / counts.clamp_min(1)).tolist()


def metrics(module: MedusaTrainModule, val: FeatureSet) -> dict:
    return accuracy_metrics(rank_accuracy(module, val, int(module.opts.get("ranks", 4))), "head")


def choices_for(module: MedusaTrainModule, val: FeatureSet) -> list[list[int]]:
    """The tree with the most expected accepted tokens within ``tree_nodes``, from per-head validation accuracy."""
    acc = rank_accuracy(module, val, int(module.opts.get("ranks", 4)))
    return choices_from_accuracy(acc, int(module.opts["tree_nodes"]))


def copy_heads(module: MedusaTrainModule) -> MedusaHeads:
    """A CPU copy of the trained heads (the drafter converts its copy to the target's dtype)."""
    src = module.heads
    heads = MedusaHeads(src.lm_heads[0].in_features, src.num_heads, len(src.blocks[0]), src.d2t.cpu())
    heads.load_state_dict({k: v.detach().cpu() for k, v in src.state_dict().items()})
    return heads


def make_drafter(target, tokenizer, module: MedusaTrainModule, data) -> MedusaDrafter:
    """The drafter as it would ship now: a copy of the heads, with the tree chosen from validation accuracy."""
    return MedusaDrafter(target, tokenizer, heads=copy_heads(module), choices=choices_for(module, data.val))


def export(module: MedusaTrainModule, target, data, val_metrics: dict, cfg: dict) -> tuple[dict, dict]:
    config = {"choices": choices_for(module, data.val), **module.opts, "draft_vocab_size": len(module.heads.d2t)}
    return shipping_state(module.heads, module.opts), config


SPEC = JobSpec(kind=KIND, make_module=make_module, loss_fn=loss_fn, metrics=metrics, make_drafter=make_drafter,
               export=export)
main = hydra_main(SPEC, "medusa")

if __name__ == "__main__":
    main()
