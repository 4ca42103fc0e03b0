"""Measure a :class:`~specdec.algorithms.cost.CostProfile` and cache it per (model, dtype, threads, device, versions).

    specdec profile [--target PATH_OR_ID] [--dtype float32] [--threads 2] [--verifier hf] [--remeasure]

``load_or_measure(model)`` returns the cached profile when one exists for exactly this setting (the key says what
was measured; any difference — another model, dtype, thread count, device, torch or transformers version — means a
new measurement), otherwise measures one (a few seconds: verify steps over chains of 1..64 nodes after a 256-token
prefix, median of a few repetitions) and writes it as JSON under ``$SPECDEC_CACHE/profiles/``.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import transformers

from specdec import models, registry, textio
from specdec.algorithms import tree as tree_ops
from specdec.algorithms.cost import CostProfile
from specdec.kernels import cpu_gemm, quant_gemm
from specdec.models import gqa_attention
from specdec.models.checkpoint import target_fingerprint
from specdec.models.quantize import quantization_of

SIZES = (1, 2, 4, 8, 16, 32, 64)
PROFILE_REQUEST = "profile"  # the request id the measurement's verify steps run under


def profile_key(model, verifier: str = registry.REFERENCE_VERIFIER, cost_key: Mapping | None = None,
                fast_linears: bool = True) -> dict:
    """What a profile is valid for: the target, its dtype and device, the thread count, the verifier and what its
    step cost depends on (``cost_key``: :meth:`specdec.protocols.Verifier.cost_key` of the verifier measured; None:
    a default-built one's: its KV layout, how greedy tokens come from the LM head), the linear-layer kernel
    (:mod:`specdec.kernels.cpu_gemm`), the attention route (:mod:`specdec.models.gqa_attention`) and versions."""
    if cost_key is None:
        cost_key = registry.build_verifier(verifier, model).cost_key()
    p = next(model.parameters())
    return {"target": target_fingerprint(model), "dtype": str(p.dtype).replace("torch.", ""),
            "device": p.device.type, "threads": torch.get_num_threads(), "verifier": verifier,
            "linears": cpu_gemm.kernel(model) if fast_linears else "off",
            "quantization": quantization_of(model),  # int8 / int4 linears cost another profile
            "quant_kernel": quant_gemm.cost_tag() if quantization_of(model) else None,
            "attention": gqa_attention.route(model), **cost_key,
            "torch": torch.__version__, "transformers": transformers.__version__}


def profile_path(key: dict, root: Path | None = None) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return (root or models.cache_dir() / "profiles") / f"cost-{digest}.json"


def measure_verify(model, verifier, sizes: Sequence[int] = SIZES, prefix_len: int = 256, reps: int = 9,
                   fast_linears: bool = True) -> dict[int, float]:
    """Median milliseconds of one greedy verify step (score + commit of the root) of ``verifier`` (a
    :class:`~specdec.protocols.Verifier` of ``model``) over a chain of each size, with or without the fast linear
    kernel (:mod:`specdec.kernels.cpu_gemm`). The sizes are measured in turn, ``reps`` rounds, so that a slow moment
    of a shared machine spreads over all of them instead of inflating one size."""
    g = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    prompt = torch.randint(0, vocab, (1, prefix_len), generator=g).to(model.device)
    times: dict[int, list[float]] = {n: [] for n in sizes}
    with torch.inference_mode(), cpu_gemm.fast_linears(model, enabled=fast_linears and cpu_gemm.wanted(model)):
        verifier.start(PROFILE_REQUEST, prompt)
        try:
            for rep in range(reps + 1):  # the first round is a warm-up
                for n in sizes:
                    tokens = torch.randint(0, vocab, (n,), generator=g).tolist()
                    tree = tree_ops.chain(tokens[0], tokens[1:], device=prompt.device)
                    start = time.perf_counter()
                    verifier.score([PROFILE_REQUEST], [tree], greedy=True)
                    verifier.commit(PROFILE_REQUEST, [0])  # keep the root: the cache grows by one token a step
                    if prompt.device.type == "cuda":
                        torch.cuda.synchronize(prompt.device)  # the step's kernels, not only their launches
                    if rep:
                        times[n].append(1000 * (time.perf_counter() - start))
        finally:
            verifier.release(PROFILE_REQUEST)
    return {n: statistics.median(t) for n, t in times.items()}


def save(profile: CostProfile, path: Path) -> Path:
    data = {"key": dict(profile.key), "verify_ms": {str(k): v for k, v in profile.verify_ms.items()},
            "draft_ms": dict(profile.draft_ms)}
    return textio.write_json(path, data)


def load(path: Path, key: dict | None = None) -> CostProfile | None:
    """The profile at ``path``, or None when it is missing, unreadable, or measured for another ``key``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        profile = CostProfile(key=data["key"], verify_ms={int(k): float(v) for k, v in data["verify_ms"].items()},
                              draft_ms={str(k): float(v) for k, v in data.get("draft_ms", {}).items()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if key is not None and json.loads(json.dumps(key)) != profile.key:
        return None
    return profile


def load_or_measure(model, verifier: str = registry.REFERENCE_VERIFIER, verifier_kwargs: Mapping | None = None,
                    root: Path | None = None, remeasure: bool = False, sizes: Sequence[int] = SIZES, reps: int = 9,
                    fast_linears: bool = True) -> tuple[CostProfile, Path, bool]:
    """The cached profile for this setting, or a fresh measurement (then cached). Returns (profile, path,
    measured_now). ``verifier`` / ``verifier_kwargs``: the verifier (by registry name, with its options) whose steps
    are measured; ``fast_linears``: whether the decoder uses the fast linear kernel (:mod:`specdec.kernels.cpu_gemm`)."""
    measured_with = registry.build_verifier(verifier, model, **dict(verifier_kwargs or {}))
    key = profile_key(model, verifier, measured_with.cost_key(), fast_linears)
    path = profile_path(key, root)
    if not remeasure:
        cached = load(path, key)
        if cached is not None:
            return cached, path, False
    profile = CostProfile(key=key, verify_ms=measure_verify(model, measured_with, sizes, reps=reps,
                                                            fast_linears=fast_linears))
    save(profile, path)
    return profile, path, True


def format_profile(profile: CostProfile) -> str:
    """The profile as a table: nodes, milliseconds, cost relative to one node."""
    base = profile.verify(1)
    rows = [[str(n), ms, f"{ms / base:.2f}x"] for n, ms in sorted(profile.verify_ms.items())]
    head = ", ".join(f"{k}={v}" for k, v in profile.key.items() if k != "target")
    table = textio.format_table(["nodes", "verify ms", "vs 1 node"], rows)
    drafts = "".join(f"\ndraft call {k}: {v:.2f} ms" for k, v in profile.draft_ms.items())
    return f"{head}\n\n{table}{drafts}"
