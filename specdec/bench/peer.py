"""vLLM's CPU engine as bench methods (``vllm``, ``vllm:ngram``, ...), run interleaved with ours prompt by prompt.

vLLM pins its own transformers, so it lives in its own virtual environment (``bash scripts/vllm_env.sh`` makes
``.venv-vllm``). :class:`PeerServer` starts ``scripts/peer_vllm.py --serve`` there as a child process that builds one
engine per vLLM method and then answers one request per JSON line; each vLLM method becomes an ordinary bench
runner. Between requests the child waits on its stdin (no spinning threads), so the two engines never run at once,
and every prompt is decoded by every method within seconds of each other: the machine's drift cancels in the ratios,
unlike two sittings minutes apart. The generate call is timed in the child (``time_s``), so the pipe costs nothing.
With ``bench.batch_size`` B > 1 the engines run B requests at once (``max_num_seqs=B``) and a bench round hands
vLLM the same group of requests it hands our batched methods (:meth:`PeerServer.batch_runner`).
:class:`PeerEngine` is what every peer engine gives the bench (llama.cpp's: :mod:`specdec.bench.peer_llamacpp`).
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


def engine_dtype(dtype: str, quantization: str | None = None) -> str:
    """The dtype vLLM runs for a bench target: ``target.dtype``, or bfloat16 for ``target.quantization=bf16`` (our
    bfloat16 weights: vLLM's CPU engine in bfloat16 is what a user would pick instead). int8 / int4 are refused: vLLM's
    CPU build has no Q8_0 / Q4_1 weights, and a float32 row beside them would compare other bytes."""
    if quantization == "bf16":
        return "bfloat16"
    if quantization:
        raise ConfigError(f"the vllm methods cannot run target.quantization={quantization}: vLLM's CPU build has no "
                          "int8 / int4 weight-only path for these weights. Compare with llama.cpp (llamacpp methods, "
                          "the same GGUF types) or drop the vllm methods.")
    return dtype


def split_counts(total: int, lengths: list[int]) -> list[int]:
    """``total`` (a batch's accepted or drafted tokens) shared among requests in proportion to their ``lengths``,
    as cumulative floors, so the shares add up to ``total`` exactly: ``split_counts(5, [2, 2]) == [2, 3]``."""
    whole, out, done = sum(lengths), [], 0
    for n in lengths:
        out.append(total * (done + n) // whole - total * done // whole)
        done += n
    return out


class PeerEngine:
    """A peer engine as bench methods: subclasses answer :meth:`generate` (one request) and
    :meth:`generate_batch` (requests at once) greedily and time the call themselves; this class turns those into the
    bench's runners. Methods named exactly ``prefix`` do not speculate; the others report accepted and drafted
    tokens (None where the engine cannot count them)."""

    prefix = ""

    def generate(self, method: str, ids: list[int], max_new_tokens: int) -> dict:
        """``{"tokens", "accepted", "drafted", "time_s"}``."""
        raise NotImplementedError

    def generate_batch(self, method: str, batch: list[list[int]], max_new_tokens: int) -> dict:
        """``{"outputs", "accepted", "drafted", "time_s"}`` (counts for the whole batch), and optionally
        ``"counts"``: one ``(accepted, drafted)`` per request where the engine counts per request."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def counts(self, method: str, tokens: list[int], accepted: int | None, drafted: int | None) -> tuple | None:
        """The bench's ``(verify steps, drafted, accepted, by depth)`` of one output: a speculative step commits
        its accepted drafts + 1 token; None without speculation or counts."""
        if method == self.prefix or accepted is None:
            return None
        return len(tokens) - accepted, drafted, accepted, ()

    def batch_runner(self, method: str, max_new_tokens: int):
        """A bench batch runner ``(inputs: list of [1, T], seed) -> [(tokens, counts, time share)]`` for ``method``:
        the requests as one batch, each with an equal share of the batch's time. Without per-request counts (vLLM
        counts accepted drafts per batch) each request gets a share of the batch's in proportion to its tokens
        (they add up to the batch's: tau over the run is exact)."""

        def run(inputs: list[torch.Tensor], seed: int):
            got = self.generate_batch(method, [ids[0].tolist() for ids in inputs], max_new_tokens)
            outputs, share = got["outputs"], got["time_s"] / len(inputs)
            per_request = got.get("counts")
            if per_request is None and got["accepted"] is not None and sum(map(len, outputs)) > 0:
                lengths = [len(t) for t in outputs]
                per_request = list(zip(split_counts(got["accepted"], lengths), split_counts(got["drafted"], lengths)))
            per_request = per_request or [(None, None)] * len(outputs)
            return [(tokens, self.counts(method, tokens, *c), share) for tokens, c in zip(outputs, per_request)]

        return run

    def runner(self, method: str, max_new_tokens: int):
        """A bench runner ``(ids [1, T], seed) -> (tokens, counts, time_s)`` for ``method`` (greedy only)."""

        def run(ids: torch.Tensor, seed: int):
            got = self.generate(method, ids[0].tolist(), max_new_tokens)
            return got["tokens"], self.counts(method, got["tokens"], got["accepted"], got["drafted"]), got["time_s"]

        return run


class PeerServer(PeerEngine):
    """``scripts/peer_vllm.py --serve`` in vLLM's environment, for ``methods`` on the target at ``target_path``.

    python: that environment's interpreter (relative paths from the repository root); max_model_len: the longest
    prompt plus new tokens any request will need; max_num_seqs: requests an engine runs at once (the bench's
    batch size).
    """

    prefix = PREFIX

    def __init__(self, python: str, methods: list[str], target_path: str, dtype: str, max_model_len: int,
                 script: str = "scripts/peer_vllm.py", log: str | None = None, max_num_seqs: int = 1) -> None:
        exe, path = (REPO / python if not Path(python).is_absolute() else Path(python)), REPO / script
        if not exe.exists():
            raise ConfigError(f"no peer interpreter at {exe}: make vLLM's environment with `bash scripts/vllm_env.sh` "
                              "(or set bench.peer_python), or drop the vllm methods from bench.methods.")
        self.log = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - kept open as the child's stderr
        self.proc = subprocess.Popen([str(exe), str(path), "--serve", "--target", target_path, "--dtype", dtype,
                                      "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs),
                                      "--methods", ",".join(methods)],
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

    def _ask(self, request: dict) -> dict:
        """One request line to the child, its answer line back."""
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def generate(self, method: str, ids: list[int], max_new_tokens: int) -> dict:
        """Greedy tokens for ``ids``: ``{"tokens", "accepted", "drafted", "time_s"}``."""
        return self._ask({"method": method, "ids": ids, "max_new_tokens": max_new_tokens})

    def generate_batch(self, method: str, batch: list[list[int]], max_new_tokens: int) -> dict:
        """Greedy tokens for every request of ``batch``, submitted at once: ``{"outputs", "accepted", "drafted",
        "time_s"}`` (counts for the whole batch)."""
        return self._ask({"method": method, "batch": batch, "max_new_tokens": max_new_tokens})

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
