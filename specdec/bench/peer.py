"""vLLM's CPU engine as bench methods (``vllm``, ``vllm:ngram``, ...), run interleaved with ours prompt by prompt.

vLLM pins its own transformers, so it lives in its own virtual environment (``bash scripts/vllm_env.sh`` makes
``.venv-vllm``). :class:`PeerServer` starts ``scripts/peer_vllm.py --serve`` there as a child process that builds one
engine per vLLM method and then answers one request per JSON line; each vLLM method becomes an ordinary bench
runner. Between requests the child waits on its stdin (no spinning threads), so the two engines never run at once,
and every prompt is decoded by every method within seconds of each other: the machine's drift cancels in the ratios,
unlike two sittings minutes apart. The generate call is timed in the child (``time_s``), so the pipe costs nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from specdec.errors import ConfigError

PREFIX = "vllm"  # bench methods "vllm" and "vllm:<speculation>" run on the peer engine
REPO = Path(__file__).resolve().parents[2]


def is_peer(method: str) -> bool:
    return method == PREFIX or method.startswith(PREFIX + ":")


class PeerServer:
    """``scripts/peer_vllm.py --serve`` in vLLM's environment, for ``methods`` on the target at ``target_path``.

    python: that environment's interpreter (relative paths from the repository root); max_model_len: the longest
    prompt plus new tokens any request will need.
    """

    def __init__(self, python: str, methods: list[str], target_path: str, dtype: str, max_model_len: int,
                 script: str = "scripts/peer_vllm.py", log: str | None = None) -> None:
        exe, path = (REPO / python if not Path(python).is_absolute() else Path(python)), REPO / script
        if not exe.exists():
            raise ConfigError(f"no peer interpreter at {exe}: make vLLM's environment with `bash scripts/vllm_env.sh` "
                              "(or set bench.peer_python), or drop the vllm methods from bench.methods.")
        self.log = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - kept open as the child's stderr
        self.proc = subprocess.Popen([str(exe), str(path), "--serve", "--target", target_path, "--dtype", dtype,
                                      "--max-model-len", str(max_model_len), "--methods", ",".join(methods)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
        print(f"starting vLLM for {methods} ...", file=sys.stderr)
        self.info = self._read()
        if not self.info.get("ready"):
            raise RuntimeError(f"the peer engine did not start: {self.info}")

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.close()
                raise RuntimeError(f"the peer engine exited (code {self.proc.poll()}); see its log "
                                   f"({getattr(self.log, 'name', 'set bench.peer_log to keep it')}).")
            if line.startswith("{"):  # anything else a library prints to stdout is not ours
                return json.loads(line)

    def generate(self, method: str, ids: list[int], max_new_tokens: int) -> dict:
        """Greedy tokens for ``ids``: ``{"tokens", "accepted", "drafted", "time_s"}``."""
        self.proc.stdin.write(json.dumps({"method": method, "ids": ids, "max_new_tokens": max_new_tokens}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def runner(self, method: str, max_new_tokens: int):
        """A bench runner ``(ids [1, T], seed) -> (tokens, counts, time_s)`` for ``method`` (greedy only)."""

        def run(ids: torch.Tensor, seed: int):
            got = self.generate(method, ids[0].tolist(), max_new_tokens)
            tokens = got["tokens"]
            counts = None
            if method != PREFIX and got["accepted"] is not None:  # speculative: a step commits its accepted drafts + 1
                counts = (len(tokens) - got["accepted"], got["drafted"], got["accepted"], ())
            return tokens, counts, got["time_s"]

        return run

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        if self.log is not subprocess.DEVNULL:
            self.log.close()
