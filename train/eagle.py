"""Train an EAGLE-style head: ``python -m train.eagle [train=smoke|cpu|gpu] [drafter.unroll=2] output_dir=...``.

Loss per position ``i`` (pair ``(f_i, x_{i+1})`` predicts ``f_{i+1}`` and the target's distribution of ``x_{i+2}``):
``feature_weight * smooth_l1(g_i, f_{i+1}) + token_weight * CE(target's distribution restricted to the draft
vocabulary, head's distribution)``. With ``unroll = K > 1`` the head also trains on its own predictions
(training-time test): block ``k`` feeds the features block ``k-1`` predicted, and attends the way drafting does,
to true pairs up to ``i-k`` and to its own predicted ancestors, so depth-``k`` drafts are trained as they are used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from drafters.eagle import KIND, EagleDrafter, EagleHead
from drafters.tree_shape import choices_from_accuracy
from specdec.models import checkpoint, hf_cache
from train.features import Batch, FeatureSet
from train.job import (
    JobSpec,
    accuracy_metrics,
    check_keys,
    draft_vocabulary,
    hydra_main,
    shipping_state,
)

OPTIONS = {"save_dtype", "draft_vocab_size", "unroll", "unroll_decay", "feature_weight", "token_weight",
           "init_layer", "init_from", "tree_nodes", "max_depth", "ranks"}


class EagleTrainModule(nn.Module):
    """The trainable head plus frozen views of the target's embedding and LM-head rows (not saved)."""

    def __init__(self, head: EagleHead, target, opts: dict) -> None:
        super().__init__()
        self.head = head
        self.opts = opts
        self.register_buffer("embed_w", target.get_input_embeddings().weight.detach(), persistent=False)
        self.register_buffer("teacher_w", target.get_output_embeddings().weight.detach()[head.d2t], persistent=False)
        t2d = torch.full((self.embed_w.shape[0],), -1, dtype=torch.long)
        t2d[head.d2t] = torch.arange(len(head.d2t))
        self.register_buffer("t2d", t2d, persistent=False)

    def blocks(self, batch: Batch) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The unrolled blocks' outputs ``[B, L-1, H]`` and the next features ``[B, L-1, H]`` (see
        :func:`forward_blocks`)."""
        return forward_blocks(self, batch)


def make_module(target, data, cfg: dict) -> EagleTrainModule:
    opts = dict(cfg["drafter"])
    check_keys(opts, OPTIONS, "drafter (eagle training)")
    if opts.get("init_from"):  # fine-tune a trained head (its draft vocabulary is kept)
        state, _ = checkpoint.load(opts["init_from"], kind=KIND, target=target)
        head = EagleHead.for_target(target, state["d2t"])
        checkpoint.load_into(head, state, opts["init_from"])
        return EagleTrainModule(head.float(), target, opts)
    head = EagleHead.for_target(target, draft_vocabulary(target, data, int(opts["draft_vocab_size"])))
    if opts.get("init_layer") is not None:
        head.init_from_target(target, int(opts["init_layer"]))
    return EagleTrainModule(head.float(), target, opts)


def unrolled_mask(valid_len: int, k: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Additive ``[1, 1, L, (k+1) L]`` mask for block ``k`` of the training-time test.

    Query ``i`` of block ``k`` sees block 0 (true pairs) at ``j <= i - k`` and block ``n`` (1..k) at ``i - k + n``:
    what a depth-``k + 1`` draft sees in the head's cache during drafting.
    """
    n = valid_len
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None]
    blocks = [j <= i - k]
    for b in range(1, k + 1):
        blocks.append(j == i - k + b)
    allowed = torch.cat(blocks, dim=1)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def forward_blocks(module: EagleTrainModule, batch: Batch, feats_in: torch.Tensor | None = None
                   ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Outputs of each unrolled block ``[B, L-1, H]`` and the pair positions' feature targets ``f_{i+1}``.

    ``feats_in [B, L-1, F]``: what block 0 reads at pair ``i`` (default the last hidden state ``f_i``; an EAGLE-3
    head reads its feature layers); later blocks read the previous block's outputs (``from_target=False``)."""
    head = module.head
    f = batch.hidden
    feats, tgt = (f[:, :-1] if feats_in is None else feats_in), f[:, 1:]
    emb = F.embedding(batch.tokens[:, 1:], module.embed_w).to(head.lm_head.weight.dtype)
    b, n, _ = feats.shape
    pos = torch.arange(n, device=f.device)[None].expand(b, n)
    cache = hf_cache.new_cache()
    outs: list[torch.Tensor] = []
    for k in range(int(module.opts.get("unroll", 1))):
        mask = unrolled_mask(n, k, emb.dtype, f.device)
        g = head(feats, emb, pos, mask, cache, from_target=k == 0)
        outs.append(g)
        feats = torch.cat([torch.zeros_like(g[:, :1]), g[:, :-1]], dim=1)  # block k+1 at i reads g_k[i-1]
    return outs, tgt


def predicted_mask(batch: Batch) -> torch.Tensor:
    """``[B, L-1]``: pair ``i`` is trained when the token it drafts, ``x_{i+2}``, is a training token."""
    m = torch.zeros_like(batch.loss_mask[:, 1:])
    m[:, :-1] = batch.loss_mask[:, 2:] & batch.valid[:, 2:]
    return m


def loss_fn(module: EagleTrainModule, batch: Batch) -> tuple[torch.Tensor, dict]:
    opts = module.opts
    outs, tgt = module.blocks(batch)
    mask = predicted_mask(batch).float()
    teacher = torch.softmax(tgt.float() @ module.teacher_w.float().T, dim=-1)  # [B, L-1, Vd]
    top1 = module.t2d[batch.target_top1[:, 1:]]  # target's argmax in draft ids (-1: outside the draft vocab)
    total, weights, metrics = 0.0, 0.0, {}
    for k, g in enumerate(outs):
        m = mask.clone()
        m[:, :k] = 0
        denom = m.sum().clamp_min(1.0)
        logp = torch.log_softmax(module.head.logits(g).float(), dim=-1)
        ce = (-(teacher * logp).sum(-1) * m).sum() / denom
        w = float(opts.get("unroll_decay", 0.8)) ** k
        term = float(opts.get("token_weight", 1.0)) * ce
        if float(opts.get("feature_weight", 0.0)):  # an EAGLE-3 head's outputs are not target features: no term
            reg = (F.smooth_l1_loss(g.float(), tgt.float(), reduction="none").mean(-1) * m).sum() / denom
            term = term + float(opts["feature_weight"]) * reg
            metrics[f"depth{k + 1}_feature_l1"] = float(reg.detach())
        total = total + w * term
        weights += w
        metrics[f"depth{k + 1}_top1"] = float(((logp.argmax(-1) == top1).float() * m).sum() / denom)
        metrics[f"depth{k + 1}_ce"] = float(ce.detach())
    return total / weights, metrics


@torch.no_grad()
def rank_accuracy(module: EagleTrainModule, val: FeatureSet, ranks: int = 4, batch_size: int = 8) -> list[list[float]]:
    """``acc[d][r]``: how often the head's rank-``r`` draft at depth ``d + 1`` is the target's greedy token."""
    hits = None
    count = torch.zeros(())
    for s in range(0, len(val), batch_size):
        batch = val.batch(list(range(s, min(len(val), s + batch_size))))
        batch = batch.to(module.embed_w.device)
        outs, _ = module.blocks(batch)
        top1 = module.t2d[batch.target_top1[:, 1:]]
        base = predicted_mask(batch)
        rows = []
        for k, g in enumerate(outs):
            m = base.clone()
            m[:, :k] = False
            cand = module.head.logits(g).topk(ranks, dim=-1).indices  # [B, L-1, R]
            rows.append(((cand == top1[..., None]) & m[..., None]).flatten(0, 1).sum(0).float().cpu())
        h = torch.stack(rows)
        hits = h if hits is None else hits + h
        count = count + base.sum().cpu()
    return (hits / count.clamp_min(1)).tolist()


def metrics(module: EagleTrainModule, val: FeatureSet) -> dict:
    return accuracy_metrics(rank_accuracy(module, val, int(module.opts.get("ranks", 4))), "depth")


def choices_for(module: EagleTrainModule, val: FeatureSet) -> list[list[int]]:
    """The tree with the most expected accepted tokens within ``tree_nodes``, from validation rank accuracies
    (depths beyond the unrolled ones reuse the deepest measured row)."""
    opts = module.opts
    acc = rank_accuracy(module, val, int(opts.get("ranks", 4)))
    while len(acc) < int(opts["max_depth"]):
        acc.append(acc[-1])
    return choices_from_accuracy(acc[: int(opts["max_depth"])], int(opts["tree_nodes"]))


def make_drafter(target, tokenizer, module: EagleTrainModule, data) -> EagleDrafter:
    """The drafter as it would ship now: a copy of the head, with the tree chosen from validation accuracy."""
    head = EagleHead.for_target(target, module.head.d2t.cpu())
    head.load_state_dict({k: v.detach().cpu() for k, v in module.head.state_dict().items()})
    return EagleDrafter(target, tokenizer, head=head, choices=choices_for(module, data.val))


def export(module: EagleTrainModule, target, data, val_metrics: dict, cfg: dict) -> tuple[dict, dict]:
    choices = choices_for(module, data.val)
    config = {"choices": choices, **{k: v for k, v in module.opts.items()},
              "draft_vocab_size": len(module.head.d2t)}
    return shipping_state(module.head, module.opts), config


SPEC = JobSpec(kind=KIND, make_module=make_module, loss_fn=loss_fn, metrics=metrics, make_drafter=make_drafter,
               export=export)
main = hydra_main(SPEC, "eagle")

if __name__ == "__main__":
    main()
