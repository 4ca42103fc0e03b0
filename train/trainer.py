"""The training loop every drafter job shares: accelerate, AdamW + warmup/cosine, evaluation, exact resume.

A job supplies a trainable module, a loss function ``loss_fn(module, batch) -> (loss, metrics)`` and an evaluation
function; the loop does the rest. The same code runs on one CPU, one GPU or many (``accelerate launch``): each
process takes its slice of every global batch. Data order is a pure function of ``(seed, step)``, so the training
state (module, optimizer, scheduler, step, RNG) is all a resume needs to continue exactly where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm

from specdec.models.checkpoint import CheckpointError
from train.features import Batch, FeatureSet

STATE_DIR = "state"


@dataclass
class Schedule:
    """The ``train`` config section."""

    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 250
    save_every: int = 250
    log_every: int = 25
    mixed_precision: str = "no"
    seed: int = 0


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Sequence indices of global batch ``step``: epoch-wise seeded permutations, consumed in order."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    return perm[pos * batch_size:(pos + 1) * batch_size]


def lr_lambda(warmup: int, steps: int) -> Callable[[int], float]:
    """Linear warmup then cosine decay to 10%."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


class Trainer:
    """Runs ``schedule.steps`` optimizer steps of ``module`` on ``train_set``.

    out_dir/state/ holds the latest training state (written atomically every ``save_every`` steps and at the end);
    ``resume=True`` loads it and continues. ``evaluate(module) -> metrics`` runs every ``eval_every`` steps.
    """

    def __init__(self, module: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Batch], tuple],
                 train_set: FeatureSet, schedule: Schedule, out_dir: str | Path, logger,
                 evaluate: Callable[[torch.nn.Module], dict] | None = None, progress: bool = True) -> None:
        self.schedule = schedule
        self.out_dir = Path(out_dir)
        self.accelerator = Accelerator(mixed_precision=schedule.mixed_precision if torch.cuda.is_available() else "no")
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise CheckpointError("the drafter has no trainable parameters; check the job's configuration.")
        opt = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=schedule.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(schedule.warmup, schedule.steps))
        self.module, self.opt, self.sched = self.accelerator.prepare(module, opt, sched)
        self.loss_fn, self.train_set, self.logger, self.evaluate = loss_fn, train_set, logger, evaluate
        self.progress = progress
        self.step = 0
        self.resumed_from: int | None = None

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.module)

    # ------------------------------------------------------------------ state

    def save_state(self) -> None:
        """Module, optimizer, scheduler, step and RNG states, atomically (a crash keeps the previous state)."""
        if not self.accelerator.is_main_process:
            return
        final = self.out_dir / STATE_DIR
        tmp = self.out_dir / f".{STATE_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(self.unwrapped, str(tmp / "module.safetensors"))  # tied weights (shared storage) saved once
        torch.save({"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                    "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                   tmp / "optimizer.pt")
        (tmp / "trainer.json").write_text(json.dumps({"step": self.step, "schedule": vars(self.schedule)}, indent=2))
        old = self.out_dir / f".{STATE_DIR}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    def _recover(self) -> None:
        """A crash between the two renames of :meth:`save_state` leaves no ``state/`` but a complete new state in
        ``.state.tmp`` and the previous one in ``.state.old``: put the newest complete one back as ``state/``."""
        final = self.out_dir / STATE_DIR
        if final.exists():
            return
        for name in (f".{STATE_DIR}.tmp", f".{STATE_DIR}.old"):
            candidate = self.out_dir / name
            if all((candidate / f).exists() for f in ("module.safetensors", "optimizer.pt", "trainer.json")):
                os.replace(candidate, final)
                print(f"recovered the training state from {candidate} (a save was interrupted)")
                return

    def existing_state(self) -> Path | None:
        """The training state in ``out_dir`` a fresh run would overwrite (after any recovery), or None."""
        self._recover()
        path = self.out_dir / STATE_DIR
        return path if path.exists() else None

    def load_state(self) -> bool:
        """Continue from ``out_dir/state`` if it exists (recovering an interrupted save first); returns whether it
        did."""
        path = self.existing_state()
        if path is None:
            return False
        try:
            meta = json.loads((path / "trainer.json").read_text())
            safe_open(str(path / "module.safetensors"), "pt").keys()
            rest = torch.load(path / "optimizer.pt", weights_only=False)
        except Exception as e:  # any unreadable piece: refuse, never train on from a half state
            raise CheckpointError(f"training state in {path} is corrupt ({type(e).__name__}: {e}); delete it to "
                                  "start over, or restore it.") from None
        if meta["schedule"].get("batch_size") != self.schedule.batch_size or \
                meta["schedule"].get("seed") != self.schedule.seed:
            raise CheckpointError(f"training state in {path} used batch_size/seed {meta['schedule'].get('batch_size')}"
                                  f"/{meta['schedule'].get('seed')}; resume with the same train settings.")
        try:
            missing, unexpected = load_model(self.unwrapped, str(path / "module.safetensors"), strict=False)
        except RuntimeError as e:  # shape mismatches
            missing, unexpected = [str(e).splitlines()[-1].strip()], []
        if missing or unexpected:
            raise CheckpointError(f"training state in {path} does not fit this drafter (e.g. {[*missing, *unexpected][:3]}); "
                                  "it was saved with another configuration or target.")
        self.opt.load_state_dict(rest["optimizer"])
        self.sched.load_state_dict(rest["scheduler"])
        torch.set_rng_state(rest["torch_rng"])
        random.setstate(rest["python_rng"])
        if rest.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rest["cuda_rng"])
        self.step = int(meta["step"])
        return True

    # ------------------------------------------------------------------ loop

    def _local_batch(self, step: int) -> Batch:
        idx = batch_indices(len(self.train_set), self.schedule.batch_size, step, self.schedule.seed)
        idx = idx[self.accelerator.process_index::self.accelerator.num_processes] or idx[:1]
        b = self.train_set.batch(idx)
        dev = self.accelerator.device
        return b.to(dev)

    def run(self, resume: bool = False, overwrite: bool = False) -> torch.nn.Module:
        """Train to ``schedule.steps``. ``resume``: continue from the saved state (saying so, or that there was
        none); without it an existing state is refused unless ``overwrite`` (then training starts over and the
        state and metrics are replaced at the first save)."""
        if resume:
            if self.load_state():
                self.resumed_from = self.step
                print(f"resumed from {self.out_dir / STATE_DIR} at step {self.step}")
            else:
                print(f"resume=true found no training state in {self.out_dir}; starting at step 0")
        elif (found := self.existing_state()) is not None and not overwrite:
            step = json.loads((found / "trainer.json").read_text()).get("step") \
                if (found / "trainer.json").exists() else "?"
            raise CheckpointError(f"{found} holds a training state at step {step}: resume=true continues it, "
                                  "overwrite=true starts over and replaces it (or choose another output_dir).")
        self.logger.truncate_after(self.step)  # metrics past the state's step belong to the run that crashed
        s = self.schedule
        bar = tqdm(total=s.steps, initial=self.step, desc="train", unit="step", disable=not self.progress)
        tic, positions = time.perf_counter(), 0
        while self.step < s.steps:
            self.module.train()
            batch = self._local_batch(self.step)
            with self.accelerator.autocast():
                loss, metrics = self.loss_fn(self.module, batch)
            self.accelerator.backward(loss)
            if s.grad_clip > 0:
                self.accelerator.clip_grad_norm_(self.module.parameters(), s.grad_clip)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            positions += int(batch.valid.sum())
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            if self.step % s.log_every == 0 or self.step == s.steps:
                elapsed = time.perf_counter() - tic
                self.logger.log({"train/loss": float(loss.detach()), **{f"train/{k}": float(v) for k, v in metrics.items()},
                                 "train/lr": self.sched.get_last_lr()[0],
                                 "train/positions_per_s": positions / max(elapsed, 1e-9)}, self.step)
                tic, positions = time.perf_counter(), 0
            if self.evaluate is not None and (self.step % s.eval_every == 0 or self.step == s.steps):
                self.module.eval()
                with torch.no_grad():
                    self.logger.log({f"val/{k}": v for k, v in self.evaluate(self.unwrapped).items()}, self.step)
            if self.step % s.save_every == 0 or self.step == s.steps:
                self.save_state()
        bar.close()
        return self.unwrapped
