"""What every drafter job does around its own model and loss: target, data, logger, trainer, validation tau, export.

A job module (``train/eagle.py``, ``train/medusa.py``, ...) defines a :class:`JobSpec` and a thin ``@hydra.main``
that calls :func:`run` with the composed config as a plain dict.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from specdec import extras

extras.require_or_exit("train", "the training jobs (python -m train.<job>)")

from accelerate import PartialState  # noqa: E402 - after the check that names a missing extra

from drafters.eagle import reduced_vocab
from specdec import models
from specdec.errors import ConfigError
from specdec.models import checkpoint
from train import dataset
from train.features import FeatureSet
from train.logger import Logger
from train.trainer import Schedule, Trainer

FINAL = "final"


@dataclass
class JobSpec:
    """A drafter kind's pieces.

    make_module(target, data, cfg) -> trainable module; loss_fn(module, batch) -> (loss, metrics);
    metrics(module, val_set) -> dict of validation agreement metrics; make_drafter(target, tokenizer, module, data)
    -> a Drafter for validation tau (``data``: the job's :class:`train.dataset.Data`); export(module, target, data, val_metrics, cfg) -> (state_dict, drafter config)
    for the final checkpoint (e.g. the tree chosen from validation accuracy). feature_layers(target, cfg) -> the
    target layers whose hidden states the data step records besides the last (EAGLE-3; default none).
    """

    kind: str
    make_module: Callable
    loss_fn: Callable
    metrics: Callable
    make_drafter: Callable
    export: Callable
    feature_layers: Callable = lambda target, cfg: ()


def validation_tau(target, tokenizer, drafter, prompts: list[dict], max_new_tokens: int) -> float:
    """Mean tokens per verify step when decoding held-out prompts greedily with ``drafter`` (real decoding)."""
    from specdec.generate import SpecDecoder
    from train.data import encode_prompt_ids

    if not prompts:
        return float("nan")
    decoder = SpecDecoder(target, tokenizer, drafter=drafter)
    steps = tokens = 0
    for p in prompts:
        ids = torch.tensor([encode_prompt_ids(tokenizer, p["messages"])])  # the decoder moves them to the target
        out = decoder.generate(ids, max_new_tokens=max_new_tokens)
        steps += out.stats.verify_steps
        tokens += out.stats.new_tokens
    return tokens / max(1, steps)


def target_device(device: str | None, state: PartialState | None = None) -> str:
    """Where the frozen target runs (its answers, features and validation decoding): ``auto`` (or None) is this
    process's accelerator device, ``cuda:<i>`` under ``accelerate launch`` on GPUs and ``cpu`` without one."""
    if device in (None, "auto"):
        return str((state or PartialState()).device)
    return str(device)


def run(spec: JobSpec, cfg: dict, progress: bool = True) -> Path:
    """Train a drafter as ``cfg`` says; returns the final checkpoint directory (``<output_dir>/final``)."""
    out_dir = Path(cfg.get("output_dir") or f"runs/{spec.kind}").expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    schedule = Schedule(**cfg["train"])
    torch.manual_seed(schedule.seed)
    tcfg = cfg["target"]
    state = PartialState()
    target, tokenizer = models.load_target(tcfg.get("name"), dtype=tcfg.get("dtype", "float32"),
                                           device=target_device(tcfg.get("device"), state))
    target.requires_grad_(False)
    start = time.perf_counter()
    with state.main_process_first():  # several processes: the main one builds the cache, the others then read it
        data = dataset.build(cfg["data"], target, tokenizer, progress=progress and state.is_main_process,
                             aux_layers=tuple(spec.feature_layers(target, cfg)))
    data_s = time.perf_counter() - start
    module = spec.make_module(target, data, cfg)
    val_cfg = cfg["data"]["val"]
    tau_prompts = data.val_prompts[: int(val_cfg["tau_prompts"])]
    last: dict = {}

    def evaluate(m: torch.nn.Module) -> dict:
        metrics = spec.metrics(m, data.val)
        drafter = spec.make_drafter(target, tokenizer, m, data)
        metrics["tau"] = validation_tau(target, tokenizer, drafter, tau_prompts, int(val_cfg["tau_new_tokens"]))
        last.clear()
        last.update(metrics)
        return metrics

    log_cfg = dict(cfg.get("logger") or {"name": "none"})
    main_process = state.is_main_process  # under `accelerate launch`, only one process logs and exports
    logger = Logger(out_dir, name=log_cfg.pop("name"), run_name=f"{spec.kind}-{out_dir.name}", config=cfg,
                    enabled=main_process, **log_cfg)
    trainer = Trainer(module, spec.loss_fn, data.train, schedule, out_dir, logger, evaluate, progress=progress)
    train_start = time.perf_counter()
    module = trainer.run(resume=bool(cfg.get("resume", False)), overwrite=bool(cfg.get("overwrite", False)))
    train_s = time.perf_counter() - train_start
    if not last:  # resumed at the final step: evaluate once for the card
        module.eval()
        with torch.no_grad():
            evaluate(module)
    logger.finish()
    final = out_dir / FINAL
    if not main_process:
        return final
    state, drafter_cfg = spec.export(module, target, data, last, cfg)
    info = {"val": last, "train_steps": schedule.steps, "train_seconds": round(train_s, 1),
            "data_seconds": round(data_s, 1), "train_positions": data.train.manifest["positions"],
            "train_sequences": len(data.train), "self_distilled_answers": data.num_answers, "resumed_from_step": trainer.resumed_from,
            "command": " ".join(["python -m", f"train.{spec.kind}", *(shlex.quote(a) for a in sys.argv[1:])])}
    # the target's name (None: specdec's default) and classes, for exports that name their verifier (speculators)
    named = {"target_name": tcfg.get("name"), "target_architectures": target.config.architectures}
    final = checkpoint.save(final, spec.kind, state, drafter_cfg, target=target,
                            extra={"training": info, **named}, card=card(spec.kind, cfg, info))
    print(f"{spec.kind} drafter written to {final} (validation tau {last.get('tau', float('nan')):.2f})")
    export_cfg = dict(cfg.get("export") or {})
    for layout in export_cfg.pop("to", None) or []:  # the Hydra equivalent of `specdec export`
        from specdec import interop

        options = interop.layout_options(layout, **export_cfg)
        print(f"{layout} layout written to {interop.export(final, layout, out_dir / f'{FINAL}-{layout}', **options)}")
    return final


def card(kind: str, cfg: dict, info: dict) -> str:
    """The checkpoint's README: how it was made and what it measured."""
    data = cfg["data"]
    val = info["val"]
    lines = [
        f"# {kind} drafter for {cfg['target'].get('name') or 'SmolLM2-135M-Instruct (the default target)'}",
        "",
        f"Made by specdec's own training job (`train/{kind}.py`); no outside weights besides the target's.",
        "",
        "## How it was made",
        "",
        f"- command: `{info['command']}`",
        f"- data: {info['self_distilled_answers']} prompts answered by the target itself (greedy, "
        f"<= {data['self_distill']['max_new_tokens']} tokens) + {data['teacher_forced']['num_rows']} "
        "teacher-forced conversations from `../shared/data/train/`: "
        f"{info['train_sequences']} sequences, {info['train_positions']} positions",
        f"- sources (self-distilled prompts): {json.dumps(data['self_distill']['sources'])}",
        f"- sources (teacher-forced): {json.dumps(data['teacher_forced']['sources'])}",
        f"- steps: {info['train_steps']} x batch {cfg['train']['batch_size']}, lr {cfg['train']['lr']}; "
        f"training took {info['train_seconds']} s" + (f" after resuming at step {info['resumed_from_step']}"
                                                        if info.get("resumed_from_step") else "")
        + f" (data step {info['data_seconds']} s, shared by all jobs)",
        f"- drafter settings: `{json.dumps(cfg.get('drafter', {}))}`",
        "",
        "## Measured on held-out prompts",
        "",
    ]
    lines += [f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in sorted(val.items())]
    lines += ["", "Validation tau = tokens per verify step, greedy decoding of held-out prompts with this drafter.", ""]
    return "\n".join(lines)


def shipping_state(module: torch.nn.Module, opts: dict) -> dict[str, torch.Tensor]:
    """A trained module's state on the CPU, floating tensors in ``opts["save_dtype"]`` (default float32)."""
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    return checkpoint.cast_floats(state, models.resolve_dtype(opts.get("save_dtype") or "float32"))


def accuracy_metrics(acc: list[list[float]], name: str) -> dict:
    """``{name1_top1, name1_topR, ...}`` from rank accuracies ``acc[d][r]`` (per depth or per head)."""
    out = {f"{name}{d + 1}_top1": row[0] for d, row in enumerate(acc)}
    out.update({f"{name}{d + 1}_top{len(row)}": sum(row) for d, row in enumerate(acc)})
    return out


def draft_vocabulary(target, data, size: int) -> torch.Tensor:
    """``d2t``: the ``size`` most frequent answer tokens of the training data (EOS always kept), ascending ids;
    every id when ``size`` is 0 or covers the vocabulary (:func:`drafters.eagle.reduced_vocab`)."""
    vocab = int(target.config.vocab_size)
    always = [t for t in [target.generation_config.eos_token_id] if isinstance(t, int)]
    return reduced_vocab(data.train.token_counts(vocab), size, always)


def check_keys(section: dict, allowed: set[str], name: str) -> None:
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ConfigError(f"{name} has no option(s) {unknown}; its options are {sorted(allowed)}.")


def hydra_main(spec: JobSpec, config_name: str):
    """A ``@hydra.main`` entry point for a job (config ``conf/train/<config_name>.yaml``)."""
    import hydra
    from omegaconf import OmegaConf

    from specdec.errors import SpecdecError

    conf = str(Path(__file__).resolve().parents[1] / "conf")

    @hydra.main(config_path=conf, config_name=f"train/{config_name}", version_base=None)
    def main(cfg) -> None:
        try:
            run(spec, OmegaConf.to_container(cfg, resolve=True))
        except SpecdecError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return main


__all__ = ["FeatureSet", "JobSpec", "hydra_main", "run", "validation_tau"]
