"""Training state is never discarded silently, and a run killed anywhere resumes to the same result (issue 23).

The crash test kills a training run at seeded points (during a step, while writing a save, between the two renames
of a save), resumes it each time in the same output directory, and compares the final weights and the logged loss
curve with an uninterrupted run: bitwise on CPU.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from specdec.models.checkpoint import CheckpointError
from tests.test_train_infra import _eagle_setup, two_files  # noqa: F401 - two_files is a fixture
from train import eagle
from train.logger import Logger
from train.trainer import Schedule, Trainer

SCHEDULE = Schedule(steps=7, batch_size=2, lr=1e-2, warmup=1, eval_every=100, save_every=2, log_every=1)


class Killed(Exception):
    """Stands for the process dying."""


def losses(out_dir) -> list[tuple[int, float]]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [(d["step"], d["train/loss"]) for d in map(json.loads, lines) if "train/loss" in d]


def run(make, out_dir, loss_fn=eagle.loss_fn, **kw):
    log = Logger(out_dir, name="none")
    try:
        return Trainer(make(), loss_fn, FS[0], SCHEDULE, out_dir, log, progress=False).run(**kw)
    finally:
        log.finish()


FS: list = []


@pytest.fixture
def setup(tmp_path, two_files):  # noqa: F811
    _, fs, make = _eagle_setup(tmp_path, two_files)
    FS[:] = [fs]
    torch.manual_seed(0)
    straight = run(make, tmp_path / "straight")
    return make, straight, losses(tmp_path / "straight")


def kill_during_step(at: int):
    calls = [0]

    def loss_fn(module, batch):
        calls[0] += 1
        if calls[0] == at:
            raise Killed
        return eagle.loss_fn(module, batch)

    return loss_fn


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_killed_anywhere_resumes_bitwise(setup, tmp_path, monkeypatch, capsys, seed):
    make, straight, curve = setup
    out = tmp_path / f"crashed{seed}"
    g = torch.Generator().manual_seed(seed)
    step_kill = int(torch.randint(2, 6, (1,), generator=g))  # during a step
    save_kill = int(torch.randint(1, 3, (1,), generator=g))  # during the n-th save of the next run
    real_replace = os.replace

    # 1. dies during a step
    torch.manual_seed(0)
    with pytest.raises(Killed):
        run(make, out, loss_fn=kill_during_step(step_kill))
    # 2. dies between the two renames of a save (state/ moved away, the new one not yet in place)
    saves = [0]

    def dying_replace(src, dst):
        if str(dst).endswith("/state") and str(src).endswith(".state.tmp"):
            saves[0] += 1
            if saves[0] == save_kill:
                raise Killed
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    torch.manual_seed(0)  # a fresh start (no state yet) must init as the straight run did
    with pytest.raises(Killed):
        run(make, out, resume=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (out / "state").exists()  # what the crash left: only .state.old / .state.tmp
    capsys.readouterr()
    # 3. dies while writing a save's files
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(Killed))
    torch.manual_seed(0)
    with pytest.raises(Killed):
        run(make, out, resume=True)
    monkeypatch.setattr(torch, "save", real_save)
    assert "recovered the training state" in capsys.readouterr().out  # not a silent restart at step 0
    # 4. finishes
    torch.manual_seed(0)
    resumed = run(make, out, resume=True)
    for (k, v), (k2, v2) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert losses(out) == curve  # every step once, the same loss bit for bit


def test_an_existing_state_is_not_overwritten_silently(setup, tmp_path, capsys):
    make, _, _ = setup
    out = tmp_path / "r"
    torch.manual_seed(0)
    run(make, out)
    with pytest.raises(CheckpointError, match="resume=true continues it, overwrite=true starts over"):
        run(make, out)
    torch.manual_seed(0)
    run(make, out, overwrite=True)
    assert [s for s, _ in losses(out)] == list(range(1, SCHEDULE.steps + 1))  # the old run's metrics replaced
    run(make, tmp_path / "empty", resume=True)
    assert "found no training state" in capsys.readouterr().out
