"""Train an EAGLE-3 head: ``python -m train.eagle3 [train=smoke|cpu|gpu] [drafter.aux_layers=[2,15,27]] output_dir=...``.

The head (:mod:`drafters.eagle3`) reads the target's feature layers at pair ``i`` (``aux_layers``, concatenated)
and the embedding of ``x_{i+1}``, and is trained on tokens only: cross-entropy to the target's distribution of
``x_{i+2}`` restricted to the draft vocabulary. ``unroll = K > 1`` is EAGLE-3's training-time test: block ``k``
reads block ``k-1``'s outputs in place of target features and attends as drafting does
(:func:`train.eagle.unrolled_mask`), so depth-``k`` drafts are trained as they are used. The data step records the
feature layers beside the last hidden state (their own feature directories, sharing the cached answers).
"""

from __future__ import annotations

import torch

from drafters.eagle3 import KIND, Eagle3Arch, Eagle3Drafter, Eagle3Head, head_copy, load_head
from specdec.models import checkpoint
from train.eagle import EagleTrainModule, choices_for, forward_blocks, loss_fn, metrics
from train.features import Batch
from train.job import JobSpec, check_keys, draft_vocabulary, hydra_main, shipping_state

OPTIONS = {"save_dtype", "draft_vocab_size", "aux_layers", "unroll", "unroll_decay", "token_weight", "init_from",
           "warm_start", "tree_nodes", "max_depth", "ranks"}


class Eagle3TrainModule(EagleTrainModule):
    """The trainable EAGLE-3 head plus frozen views of the target's embedding and LM-head rows (not saved)."""

    def blocks(self, batch: Batch) -> tuple[list[torch.Tensor], torch.Tensor]:
        if self.head.arch.aux_layers and batch.aux is None:
            raise ValueError("an EAGLE-3 head with feature layers trains on feature sets that recorded them")
        feats = batch.aux[:, :-1] if self.head.arch.aux_layers else None
        return forward_blocks(self, batch, feats)


def feature_layers(target, cfg: dict) -> tuple[int, ...]:
    """The target layers the data step records: the head's ``aux_layers`` (vLLM's default when null)."""
    opts = cfg["drafter"]
    if opts.get("init_from"):
        return tuple(Eagle3Arch.from_dict(checkpoint.read_meta(opts["init_from"])["config"]["arch"]).aux_layers)
    aux = opts.get("aux_layers")
    return Eagle3Arch.for_target(target.config, 1, None if aux is None else tuple(aux)).aux_layers


def make_module(target, data, cfg: dict) -> Eagle3TrainModule:
    opts = dict(cfg["drafter"])
    check_keys(opts, OPTIONS, "drafter (eagle3 training)")
    if opts.get("init_from"):  # fine-tune a trained head (its draft vocabulary and feature layers are kept)
        head, _ = load_head(opts["init_from"], target=target)
        return Eagle3TrainModule(head.float(), target, opts)
    d2t = draft_vocabulary(target, data, int(opts["draft_vocab_size"]))
    aux = opts.get("aux_layers")
    arch = Eagle3Arch.for_target(target.config, len(d2t), None if aux is None else tuple(aux))
    head = Eagle3Head(arch, d2t)
    if opts.get("warm_start", True):
        head.init_from_target(target)
    return Eagle3TrainModule(head.float(), target, opts)


def make_drafter(target, tokenizer, module: Eagle3TrainModule, data) -> Eagle3Drafter:
    """The drafter as it would ship now: a copy of the head, with the tree chosen from validation accuracy."""
    return Eagle3Drafter(target, tokenizer, head=head_copy(module.head), choices=choices_for(module, data.val))


def export(module: Eagle3TrainModule, target, data, val_metrics: dict, cfg: dict) -> tuple[dict, dict]:
    config = {"choices": choices_for(module, data.val), **module.opts, "arch": module.head.arch.to_dict(),
              "draft_vocab_size": len(module.head.d2t)}
    return shipping_state(module.head, module.opts), config


SPEC = JobSpec(kind=KIND, make_module=make_module, loss_fn=loss_fn, metrics=metrics, make_drafter=make_drafter,
               export=export, feature_layers=feature_layers)
main = hydra_main(SPEC, "eagle3")

if __name__ == "__main__":
    main()
