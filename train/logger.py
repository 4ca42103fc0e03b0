"""Metric logging: wandb (offline by default: run files on disk, nothing sent) or none; always ``metrics.jsonl``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from specdec.errors import ConfigError


class Logger:
    """``log(metrics, step)`` to ``<out_dir>/metrics.jsonl`` and, with ``name=wandb``, to a wandb run.

    name: ``wandb`` or ``none``. mode: wandb's ``offline`` (default; ``wandb sync <dir>`` uploads later), ``online``
    or ``disabled``. Only the main process logs when training on several devices.
    """

    def __init__(self, out_dir: str | Path, name: str = "wandb", mode: str = "offline", project: str = "specdec",
                 run_name: str | None = None, config: dict | None = None, enabled: bool = True) -> None:
        if name not in ("wandb", "none"):
            raise ConfigError(f"unknown logger {name!r}; use logger=wandb or logger=none.")
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.run = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._file = (self.out_dir / "metrics.jsonl").open("a", encoding="utf-8")
        if name == "wandb":
            if mode not in ("offline", "online", "disabled"):
                raise ConfigError(f"logger.mode must be offline, online or disabled; got {mode!r}.")
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.run = wandb.init(project=project, name=run_name, dir=str(self.out_dir), mode=mode,
                                  config=config or {}, reinit="finish_previous")

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        if self.run is not None:
            self.run.log(metrics, step=step)

    def truncate_after(self, step: int) -> None:
        """Drop the lines of ``metrics.jsonl`` logged after ``step`` (a resumed run logs them again; a fresh run,
        ``step`` 0, starts an empty file), so no step appears twice."""
        if not self.enabled:
            return
        path = self.out_dir / "metrics.jsonl"
        self._file.close()
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self._file = path.open("a", encoding="utf-8")

    def finish(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self.run is not None:
            self.run.finish()
            self.run = None
