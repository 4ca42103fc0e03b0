"""The bench end to end on a tiny model (one CLI run, the rest in-process), its errors, and the report functions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from specdec.bench import app as bench
from specdec.bench import peer
from specdec.bench import report
from specdec.bench.config import CONF_DIR
from specdec.bench.report import Measurement
from specdec.errors import ConfigError, PromptError
from tests.tiny import save_tiny

torch.set_num_threads(1)  # another process may be benchmarking on this machine

REPO = Path(__file__).resolve().parents[1]
ROWS = [
    {"question_id": 1, "category": "code", "prompt": "w5 w6 w7 w5 w6 w7 w8 w5 w6"},
    {"question_id": 2, "category": "chat", "turns": ["w10 w11 w12 w10 w11", "w20 w21 w22 w20"]},
    {"question_id": 3, "category": "code", "prompt": "w30 w31 w32 w33 w30 w31 w32"},
]
SPECULATIVE = ("specdec:none", "specdec:ngram", "specdec:draft_model")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny target, a tiny draft model (other weights) and a prompt file with `prompt` and `turns` rows."""
    d = tmp_path_factory.mktemp("bench")
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return {"target": save_tiny(d / "target"), "draft": save_tiny(d / "draft", seed=1, layers=1), "prompts": prompts}


def base_overrides(files, out: Path) -> list[str]:
    # float64: argmax ties never flip between the tree forward and model.generate's sequential one
    return [f"target.name={files['target']}", "target.dtype=float64", f"bench.prompts={files['prompts']}",
            "bench.max_new_tokens=16", "bench.threads=1", f"bench.output={out}"]


def run_in_process(files, tmp_path, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=base_overrides(files, tmp_path / "out.json") + list(overrides))
    return bench.run_bench(cfg)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": ""}
    return subprocess.run([sys.executable, "-m", "specdec.bench", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=180)


def check_schema(result: dict) -> None:
    assert isinstance(result["target"], str) and isinstance(result["dtype"], str)
    assert isinstance(result["device"], str) and isinstance(result["config"], dict)
    for key in ("threads", "prompts", "max_new_tokens"):
        assert isinstance(result[key], int)
    for run in result["runs"]:
        assert isinstance(run["method"], str) and isinstance(run["mismatches"], int)
        assert len(run["divergences"]) == run["mismatches"]  # greedy: one divergence per mismatching output
        assert (run["max_divergence_gap"] is None) == (run["mismatches"] == 0)
        assert isinstance(run["new_tokens"], int) and run["new_tokens"] > 0
        for key in ("tokens_per_s", "speedup_vs_hf", "time_s"):
            assert isinstance(run[key], float) and run[key] > 0
        speculative = run["method"].startswith("specdec:")
        assert (run["tau"] is None) != speculative and (run["acceptance_rate"] is None) != speculative
        for cat in run["per_category"].values():
            assert isinstance(cat["tokens_per_s"], float) and isinstance(cat["speedup_vs_hf"], float)
            assert (cat["tau"] is None) != speculative


def test_cli_end_to_end(files, tmp_path):
    out = tmp_path / "out.json"
    proc = cli(*base_overrides(files, out), f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    check_schema(result)
    assert [r["method"] for r in result["runs"]] == ["hf", "hf+fast", "hf_pld", "specdec:none", "specdec:ngram"]
    assert result["prompts"] == 3 and result["max_new_tokens"] == 16 and result["threads"] == 1
    assert result["target"] == str(files["target"]) and result["config"]["drafter"]["name"] == "ngram"
    for run in result["runs"]:
        assert run["mismatches"] == 0, run["method"]
        assert set(run["per_category"]) == {"code", "chat"}
    runs = {r["method"]: r for r in result["runs"]}
    assert runs["hf"]["speedup_vs_hf"] == 1.0 and runs["specdec:none"]["tau"] == 1.0
    assert runs["specdec:ngram"]["tau"] > 1.0  # the repeats in the prompts let the n-gram drafter speculate
    assert runs["specdec:ngram"]["drafter"] == {"name": "ngram", "max_ngram": 3, "min_ngram": 2, "max_depth": 8,
                                                "max_candidates": 8}
    assert "speedup" in proc.stdout and "by category" in proc.stdout and "specdec:ngram" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "run"]  # no temporary file left behind


def test_cli_unknown_key_is_one_clear_line(files, tmp_path):
    proc = cli(*base_overrides(files, tmp_path / "out.json"), "bench.bogus=1")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown key 'bogus' in bench; valid keys: ['all_turns', 'batch_size'")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_every_method_with_a_draft_model(files, tmp_path):
    methods = "[hf,hf_pld,hf_assisted,hf_assisted+fast,specdec:none,specdec:ngram,specdec:draft_model]"
    result = run_in_process(files, tmp_path, "drafter=draft_model", f"drafter.path={files['draft']}",
                            "drafter.dtype=float64", "drafter.depth=3", f"bench.methods={methods}",
                            "bench.all_turns=true", "bench.warmup=0", "tree=small")
    check_schema(result)
    runs = {r["method"]: r for r in result["runs"]}
    assert list(runs) == methods.strip("[]").split(",") and result["prompts"] == 4  # all turns: 2 + 1 + 1
    for method in SPECULATIVE + ("hf_pld", "hf_assisted", "hf_assisted+fast"):
        assert runs[method]["mismatches"] == 0, method
    assert runs["specdec:draft_model"]["drafter"]["depth"] == 3  # the drafter group's overrides
    assert runs["specdec:ngram"]["drafter"]["max_ngram"] == 3  # conf/drafter/ngram.yaml
    assert json.loads((tmp_path / "out.json").read_text())["runs"] == json.loads(json.dumps(result["runs"]))


def test_categories_limit_and_drafter_none(files, tmp_path):
    result = run_in_process(files, tmp_path, "drafter=none", "bench.categories=[code]", "bench.limit=1")
    assert [r["method"] for r in result["runs"]] == ["hf", "hf+fast", "hf_pld", "specdec:none"]
    assert result["prompts"] == 1 and all(set(r["per_category"]) == {"code"} for r in result["runs"])


def test_verifiers_side_by_side(files, tmp_path):
    """specdec:<drafter>@paged runs beside the default verifier's method in the same run, with the same output."""
    result = run_in_process(files, tmp_path, "bench.methods=[hf,specdec:ngram,specdec:ngram@paged]",
                            "bench.warmup=0", "tree=small")
    check_schema(result)
    runs = {r["method"]: r for r in result["runs"]}
    assert runs["specdec:ngram"]["verifier"]["name"] == "hf"
    assert runs["specdec:ngram@paged"]["verifier"] == {"name": "paged", "num_blocks": 1024, "block_size": 16,
                                                      "kernel": "auto", "share_prefixes": True,
                                                      "preemption": "recompute", "group_attention": True,
                                                      "screen_greedy": True}
    assert runs["specdec:ngram@paged"]["mismatches"] == 0 and runs["specdec:ngram@paged"]["batch_size"] == 1


def test_adaptive_method_beside_static(files, tmp_path, monkeypatch):
    """specdec:<drafter>+adaptive runs beside the static method (a profile is measured once and cached)."""
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    result = run_in_process(files, tmp_path, "bench.methods=[hf,specdec:ngram,specdec:ngram+adaptive]",
                            "bench.warmup=0")
    runs = {r["method"]: r for r in result["runs"]}
    assert runs["specdec:ngram+adaptive"]["adaptive"] and not runs["specdec:ngram"]["adaptive"]
    assert runs["specdec:ngram+adaptive"]["mismatches"] == 0
    assert list((tmp_path / "cache" / "profiles").glob("cost-*.json"))


def test_adaptive_alias_is_hybrid_plus_adaptive(files, tmp_path):
    cfg_methods = bench.method_drafters(_compose(files, tmp_path, "bench.methods=[hf,specdec:adaptive]"))
    spec = cfg_methods["specdec:adaptive"]
    assert spec.adaptive and spec.drafter.name == "hybrid"
    assert [d["name"] for d in spec.drafter.drafters] == ["ngram", "eagle"] and spec.drafter.drafters[1].dynamic


def _compose(files, tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=base_overrides(files, tmp_path / "out.json") + list(overrides))
    return bench.config.validate(cfg)


def test_batched_bench(files, tmp_path):
    """bench.batch_size=2: HF batched generate (left-padded) beside specdec's continuous batching."""
    result = run_in_process(files, tmp_path, "verifier=paged", "verifier.block_size=4", "bench.batch_size=2",
                            "bench.methods=[hf,specdec:none,specdec:ngram]", "bench.all_turns=true",
                            "bench.warmup=0")
    assert result["batch_size"] == 2 and result["prompts"] == 4
    for run in result["runs"]:
        assert run["batch_size"] == 2 and run["mismatches"] == 0 and run["tokens_per_s"] > 0
        assert all(c["tokens_per_s"] is None for c in run["per_category"].values())
    assert "batch size 2" in bench.report.text_report(result)


def test_batched_rounds_alternate_methods_vllm_batches_included(files, tmp_path):
    """bench.rounds=2 at batch 2: every method runs the first group of prompts before any runs the second; the
    peer engine gets each group as one batch (tests/fake_peer.py) and its batch counts add up to the run's."""
    result = run_in_process(files, tmp_path, "verifier=paged", "verifier.block_size=4", "bench.batch_size=2",
                            "bench.rounds=2", "bench.methods=[hf,specdec:ngram,vllm,vllm:ngram]",
                            "bench.all_turns=true", "bench.warmup=0", "bench.save_tokens=true",
                            f"bench.peer_python={sys.executable}", "bench.peer_script=tests/fake_peer.py",
                            f"bench.peer_log={tmp_path / 'peer.log'}")
    runs = {r["method"]: r for r in result["runs"]}
    assert result["prompts"] == 4 and set(runs) == {"hf", "specdec:ngram", "vllm", "vllm:ngram"}
    for run in runs.values():
        assert run["batch_size"] == 2 and run["mismatches"] == 0 and run["tokens_per_s"] > 0
        assert len(run["outputs"]) == 4 and all(run["outputs"])
    assert runs["vllm"]["tau"] is None
    lengths = [len(o) for o in runs["vllm:ngram"]["outputs"]]  # the stand-in accepts half of each batch's tokens
    steps = sum(lengths) - sum(lengths[:2]) // 2 - sum(lengths[2:]) // 2
    assert runs["vllm:ngram"]["tau"] == pytest.approx(sum(lengths) / steps)


def test_run_batched_alternates_methods_by_group():
    calls = []

    def runner(name):
        def run(inputs, seed):
            calls.append((name, len(inputs), seed))
            return [([1, 2], None)] * len(inputs)
        return run

    prompts = [bench.Prompt(str(i), "c", "x") for i in range(5)]
    inputs = [torch.ones(1, 3, dtype=torch.long)] * 5
    ms = bench.run_batched({"a": runner("a"), "b": runner("b")}, prompts, inputs, batch_size=2, warmup=0, seed=10,
                           rounds=2)
    assert calls == [("a", 3, 10), ("b", 3, 10), ("a", 2, 13), ("b", 2, 13)]
    assert sorted(m.prompt_index for m in ms if m.method == "a") == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("overrides, fragment", [
    (["bench.batch_size=2", "bench.methods=[hf,specdec:ngram]"], "batched runs need verifier=paged"),
    (["bench.batch_size=2", "bench.rounds=0"], "bench.rounds must be >= 1"),
    (["bench.batch_size=2", "verifier=paged", "bench.methods=[hf,hf_pld]"], "hf_pld runs one request at a time"),
    (["bench.batch_size=0"], "bench.batch_size must be >= 1"),
    (["bench.methods=[hf,specdec:ngram@fast]"], "no verifier config 'fast'"),
    (["bench.methods=[hf,specdec:ngram+fast]"], "unknown modifier \\+fast"),
    (["verifier=paged", "verifier.kernel=cuda"], "unknown paged attention kernel 'cuda'"),
])
def test_bad_batch_options_fail_clearly(files, tmp_path, overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        run_in_process(files, tmp_path, *overrides)


def test_default_methods():
    assert bench.default_methods("ngram") == ["hf", "hf+fast", "hf_pld", "specdec:none", "specdec:ngram"]
    assert bench.default_methods("none") == ["hf", "hf+fast", "hf_pld", "specdec:none"]
    assert bench.default_methods("draft_model") == ["hf", "hf+fast", "hf_pld", "hf_assisted", "specdec:none",
                                                    "specdec:draft_model"]


@pytest.mark.parametrize("overrides, error, fragment", [
    (["bench.methods=[hf_pld,specdec:ngram]"], ConfigError, "bench.methods must include 'hf'"),
    (["bench.methods=[hf,hf]"], ConfigError, "lists a method twice"),
    (["bench.methods=[hf,hf+adaptive]"], ConfigError, "unknown modifier +adaptive in bench method 'hf+adaptive'; HF"),
    (["bench.methods=[hf,fast]"], ConfigError, "unknown bench method 'fast'; use ['hf', 'hf_pld', 'hf_assisted']"),
    (["bench.methods=[hf,specdec:bogus]"], ConfigError, "no drafter config 'bogus'"),
    (["bench.methods=[hf,hf_assisted]"], ConfigError, "hf_assisted needs a draft model"),
    (["bench.methods=[hf,specdec:draft_model]"], ConfigError, "needs a draft model: set drafter.path="),
    (["drafter=draft_model"], ConfigError, "needs a draft model: set drafter.path="),
    (["drafter.name=bogus"], ConfigError, "unknown drafter 'bogus'; choose one of"),
    (["+drafter.bogus=1"], ConfigError, "drafter 'ngram' has no option(s) ['bogus']"),
    (["+bench.bogus=1"], ConfigError, "unknown key 'bogus' in bench; valid keys:"),
    (["bench.prompts=/nonexistent/p.jsonl"], PromptError, "'/nonexistent/p.jsonl' not found; set bench.prompts="),
    (["bench.categories=[poetry]"], PromptError, "no prompts in categories ['poetry']"),
    (["bench.max_new_tokens=600"], PromptError, "exceeds the target's context of 512"),
])
def test_bad_inputs_fail_clearly(files, tmp_path, overrides, error, fragment):
    with pytest.raises(error) as e:
        run_in_process(files, tmp_path, *overrides)
    assert fragment in str(e.value)
    assert not (tmp_path / "out.json").exists()


def test_malformed_prompt_line_names_file_and_line(files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + '{"question_id": 9, "category": "x"}\n', encoding="utf-8")
    with pytest.raises(PromptError, match=rf"{bad}:2: the row has neither 'turns' and 'prompt'"):
        run_in_process(files, tmp_path, f"bench.prompts={bad}")


# ---------------------------------------------------------------- report (pure functions)


MS = [
    Measurement("hf", 0, "math", (5, 6, 7, 8), 2.0),
    Measurement("hf", 1, "code", (1, 2), 1.0),
    Measurement("specdec:ngram", 0, "math", (5, 6, 7, 8), 1.0, verify_steps=2, drafted=6, accepted=2),
    Measurement("specdec:ngram", 1, "code", (1, 3), 0.5, verify_steps=2, drafted=2, accepted=0),
]


def test_mismatches_report_the_top2_gap_at_the_first_differing_token(files, tmp_path, monkeypatch, capsys):
    """A method made to change its third token (or its last, if shorter): the run records where each output leaves hf's and the target's
    top-2 logit gap there, and the report prints a line for it."""
    real = bench.specdec_runner

    def off_by_one(decoder, n, sampling):
        run = real(decoder, n, sampling)

        def changed(ids, seed):
            tokens, counts = run(ids, seed)
            k = min(2, len(tokens) - 1)
            return tokens[:k] + [tokens[k] % 90 + 3] + tokens[k + 1:], counts

        return changed

    monkeypatch.setattr(bench, "specdec_runner", off_by_one)
    result = run_in_process(files, tmp_path, "bench.methods=[hf,specdec:ngram]", "bench.warmup=0",
                            "bench.save_tokens=true")
    check_schema(result)
    hf, spec = result["runs"]
    assert hf["divergences"] == [] and spec["mismatches"] == 3
    assert [(d["question_id"], d["position"], d["dtype"]) for d in spec["divergences"]] == [
        (q, min(2, len(out) - 1), "float64") for q, out in zip([1, 2, 3], hf["outputs"])]
    assert all(d["token"] != d["reference_token"] and d["gap"] > 0 for d in spec["divergences"])
    assert spec["max_divergence_gap"] == max(d["gap"] for d in spec["divergences"])
    assert "specdec:ngram: 3 divergences, top-2 logit gap at the first differing token: max " in capsys.readouterr().out


def test_sampled_runs_have_no_divergences(files, tmp_path):
    result = run_in_process(files, tmp_path, "bench.methods=[hf,specdec:ngram]", "bench.warmup=0",
                            "bench.temperature=0.8", "bench.limit=1")
    assert all(r["mismatches"] is None and r["divergences"] is None for r in result["runs"])
    assert "divergence" not in report.text_report(result)


def test_summarize_golden():
    hf, spec = report.summarize(MS, ["hf", "specdec:ngram"])
    assert hf == {"method": "hf", "batch_size": 1, "new_tokens": 6, "time_s": 3.0, "tokens_per_s": 2.0, "tau": None,
                  "acceptance_rate": None, "acceptance_by_depth": None, "speedup_vs_hf": 1.0, "mismatches": 0,
                  "per_category": {"code": {"tokens_per_s": 2.0, "tau": None, "speedup_vs_hf": 1.0},
                                   "math": {"tokens_per_s": 2.0, "tau": None, "speedup_vs_hf": 1.0}}}
    assert spec["tokens_per_s"] == 4.0 and spec["speedup_vs_hf"] == 2.0 and spec["tau"] == 1.5
    assert spec["acceptance_rate"] == 0.25 and spec["mismatches"] == 1  # prompt 1: (1, 3) != (1, 2)
    assert spec["per_category"]["math"] == {"tokens_per_s": 4.0, "tau": 2.0, "speedup_vs_hf": 2.0}
    assert spec["per_category"]["code"] == {"tokens_per_s": 4.0, "tau": 1.0, "speedup_vs_hf": 2.0}


def test_acceptance_by_depth_aggregates_over_prompts():
    ms = [Measurement("hf", 0, "c", (1,), 1.0),
          Measurement("s", 0, "c", (1, 2, 3), 1.0, verify_steps=2, drafted=4, accepted=2, accepted_by_depth=(2,)),
          Measurement("s", 1, "c", (1, 2, 3), 1.0, verify_steps=2, drafted=4, accepted=2, accepted_by_depth=(1, 1))]
    spec = report.summarize(ms, ["hf", "s"])[1]
    assert spec["acceptance_by_depth"] == [0.75, 0.25]  # 3 of 4 steps reached depth 1, one reached depth 2


def test_plots_next_to_the_json(files, tmp_path):
    result = run_in_process(files, tmp_path, "bench.methods=[hf,specdec:ngram]", "bench.plots=true",
                            "bench.warmup=0")
    for suffix in (".speedup.png", ".acceptance.png"):
        png = tmp_path / f"out{suffix}"
        assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    assert result["runs"][1]["acceptance_by_depth"] is not None


def test_summarize_batched_has_no_per_category_time():
    hf, spec = report.summarize(MS, ["hf", "specdec:ngram"], batch_size=8)
    assert hf["batch_size"] == spec["batch_size"] == 8 and spec["speedup_vs_hf"] == 2.0
    assert spec["per_category"]["math"] == {"tokens_per_s": None, "tau": 2.0, "speedup_vs_hf": None}


def test_mismatch_counts_length_differences():
    ref = [Measurement("hf", 0, "c", (1, 2, 3), 1.0)]
    assert report.count_mismatches([Measurement("x", 0, "c", (1, 2), 1.0)], ref) == 1
    assert report.count_mismatches([Measurement("x", 0, "c", (1, 2, 3), 1.0)], ref) == 0


def test_tables_golden():
    runs = report.summarize(MS, ["hf", "specdec:ngram"])
    assert report.runs_table(runs).splitlines() == [
        "method         tokens/s  speedup   tau  accept  mismatches",
        "-------------  --------  -------  ----  ------  ----------",
        "hf                 2.00    1.00x     -       -           0",
        "specdec:ngram      4.00    2.00x  1.50    0.25           1",
    ]
    assert report.category_table(runs).splitlines() == [
        "category     hf   specdec:ngram",
        "--------  -----  --------------",
        "code      1.00x  2.00x tau 1.00",
        "math      1.00x  2.00x tau 2.00",
    ]


def test_text_report_has_header_and_both_tables():
    result = {"target": "t", "dtype": "float32", "device": "cpu", "threads": 2, "prompts": 2, "max_new_tokens": 8,
              "runs": report.summarize(MS, ["hf", "specdec:ngram"])}
    text = report.text_report(result)
    assert text.startswith("t (float32, cpu, 2 threads), 2 prompts, up to 8 new tokens each\n\nmethod ")
    assert report.runs_table(result["runs"]) in text and report.category_table(result["runs"]) in text
    for q, head in (("int8", "t (int8 weights, 8-bit activations, cpu"),
                    ("bf16", "t (bf16 weights, float32 activations, cpu")):
        assert report.text_report({**result, "quantization": q}).startswith(head)


def test_write_json_is_atomic_and_replaces(tmp_path):
    path = tmp_path / "sub" / "r.json"
    report.write_json(path, {"a": 1})
    report.write_json(path, {"b": [1.5, None]})
    assert json.loads(path.read_text()) == {"b": [1.5, None]} and os.listdir(path.parent) == ["r.json"]
    with pytest.raises(TypeError):
        report.write_json(path, {"c": object()})
    assert json.loads(path.read_text()) == {"b": [1.5, None]} and os.listdir(path.parent) == ["r.json"]


@pytest.mark.parametrize("job", ["eagle", "medusa", "layerskip", "draft_model"])
def test_trained_drafter_in_the_bench(files, tmp_path, job):
    """A checkpoint from a train/ job runs as ``specdec:<kind>`` with ``drafter=<kind> drafter.path=...``, lossless."""
    from tests.train_fixtures import job_config
    from train import draft_model, eagle, layerskip, medusa
    from train.job import run

    specs = {"eagle": eagle.SPEC, "medusa": medusa.SPEC, "layerskip": layerskip.SPEC, "draft_model": draft_model.SPEC}
    extra = {"eagle": ["drafter.draft_vocab_size=64"], "medusa": ["drafter.draft_vocab_size=64"],
             "layerskip": ["drafter.skip_layers=[]", "drafter.skip_attention=[1]"],
             "draft_model": ["drafter.num_layers=1"]}[job]
    final = run(specs[job], job_config(tmp_path, job, extra), progress=False)
    result = run_in_process(files, tmp_path, f"drafter={job}", f"drafter.path={final}",
                            f"bench.methods=[hf,specdec:{job}]")
    check_schema(result)
    run_ = {r["method"]: r for r in result["runs"]}[f"specdec:{job}"]
    assert run_["mismatches"] == 0


def test_saved_tokens_let_a_peer_engine_run_the_same_requests(files, tmp_path, capsys):
    result = run_in_process(files, tmp_path, "bench.save_tokens=true", "bench.methods=[hf,specdec:ngram]")
    assert [r["question_id"] for r in result["requests"]] == [1, 2, 3]
    assert result["requests"][1]["category"] == "chat" and Path(result["target_path"]).exists()
    hf, spec = result["runs"]
    assert hf["outputs"] == spec["outputs"] and all(hf["outputs"])  # lossless, and the requests' own outputs
    assert sum(len(o) for o in hf["outputs"]) == hf["new_tokens"]
    # a peer engine's result (as scripts/peer_vllm.py writes it) joins the report of the same sitting
    peer = {**{k: result[k] for k in ("target", "dtype", "device", "threads", "prompts", "max_new_tokens")},
            "batch_size": 1, "runs": [{**hf, "method": "vllm", "engine": "vllm", "tau": None}]}
    (tmp_path / "a.json").write_text(json.dumps(result))
    (tmp_path / "b.json").write_text(json.dumps(peer))
    assert report.main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    table = capsys.readouterr().out
    assert "specdec:ngram" in table and "\nvllm " in table


def test_vllm_methods_run_interleaved_through_the_peer_server(files, tmp_path):
    """``vllm`` methods go to the peer engine's line protocol (a stand-in here: tests/fake_peer.py), prompt by
    prompt between ours, and are reported like every method."""
    result = run_in_process(files, tmp_path, "bench.methods=[hf,specdec:ngram,vllm,vllm:ngram]",
                            f"bench.peer_python={sys.executable}", "bench.peer_script=tests/fake_peer.py",
                            f"bench.peer_log={tmp_path / 'peer.log'}")
    runs = {r["method"]: r for r in result["runs"]}
    assert runs["vllm"]["mismatches"] == 0 and runs["vllm:ngram"]["mismatches"] == 0
    assert runs["vllm"]["tau"] is None
    # the child's counts (accepted = len // 2, drafted = 2 * len per request) make tau and the acceptance rate
    assert 0 < runs["vllm:ngram"]["acceptance_rate"] <= 0.25 and 1.5 <= runs["vllm:ngram"]["tau"] <= 2.0


def test_vllm_runs_bfloat16_beside_bf16_weights_and_refuses_int8():
    """vLLM's row beside ``target.quantization=bf16`` is its bfloat16 engine; beside int8 / int4 there is no vLLM
    row to compare (no such weights on its CPU build): a clear error before any model loads."""
    assert peer.engine_dtype("float32") == "float32" and peer.engine_dtype("float32", "bf16") == "bfloat16"
    for q in ("int8", "int4"):
        with pytest.raises(ConfigError, match="llamacpp methods"):
            peer.engine_dtype("float32", q)


def test_peer_methods_with_a_drafter_directory(files, tmp_path):
    """``vllm:eagle3=<dir>,<k>`` survives the comma-joined method list; a method whose counts the engine cannot
    report (vLLM keeps only the last-built engine's metrics; n-gram engines are built last) has no tau."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import peer_vllm

    methods = peer_vllm.split_methods("vllm,vllm:ngram,vllm:eagle3=out/e3,3,vllm:medusa=out/m")
    assert methods == ["vllm", "vllm:ngram", "vllm:eagle3=out/e3,3", "vllm:medusa=out/m"]
    assert peer_vllm.build_order(methods)[-1] == "vllm:ngram"
    assert peer_vllm.speculative_config(methods[2]) == {"method": "eagle3", "model": "out/e3",
                                                        "num_speculative_tokens": 3}
    assert peer_vllm.speculative_config(methods[3])["method"] == "medusa"
    assert peer_vllm.speculative_config("vllm:speculators=out/s") is None
    assert peer_vllm.engine_model("vllm:speculators=out/s", "target") == "out/s"
    result = run_in_process(files, tmp_path, "bench.methods=[hf,vllm:ngram,'vllm:eagle3=out/e3,3']",
                            f"bench.peer_python={sys.executable}", "bench.peer_script=tests/fake_peer.py")
    runs = {r["method"]: r for r in result["runs"]}
    assert runs["vllm:eagle3=out/e3,3"]["mismatches"] == 0 and runs["vllm:eagle3=out/e3,3"]["tau"] is None
    assert runs["vllm:ngram"]["tau"] is not None


def test_vllm_methods_need_their_environment(files, tmp_path):
    with pytest.raises(ConfigError, match="vllm_env.sh"):
        run_in_process(files, tmp_path, "bench.methods=[hf,vllm]", "bench.peer_python=/nonexistent/python")
    with pytest.raises(ConfigError, match="greedy only"):
        run_in_process(files, tmp_path, "bench.methods=[hf,vllm]", "bench.temperature=0.7")


def test_suffix_methods_keep_caches_of_their_own_and_never_warm_up_on_a_measured_prompt(files, tmp_path):
    """Two suffix-decoding methods side by side, prompt by prompt: each drafts only from its own requests (the other
    method's answer to the same prompt would be a perfect draft), and the warm-up is not a measured prompt."""
    from drafters.suffix_cache import _SHARED
    from specdec.bench.config import isolate_caches

    assert isolate_caches("suffix", {"max_depth": 4}, "m") == {"max_depth": 4, "cache": "bench:m"}
    parts = {"drafters": [{"name": "suffix"}, {"name": "eagle"}], "min_share": 0.2}
    assert isolate_caches("hybrid", parts, "m")["drafters"] == [{"name": "suffix", "cache": "bench:m"},
                                                                {"name": "eagle"}]
    assert isolate_caches("ngram", {"max_ngram": 3}, "m") == {"max_ngram": 3}
    # a recycling table holds the target's predictions on the other method's run of the same prompt: its own too
    assert isolate_caches("recycling", {"k": 4}, "m") == {"k": 4, "table": "bench:m"}
    mixed = {"drafters": [{"name": "suffix"}, {"name": "recycling"}, "ngram"]}
    assert isolate_caches("hybrid", mixed, "m")["drafters"] == [{"name": "suffix", "cache": "bench:m"},
                                                                {"name": "recycling", "table": "bench:m"}, "ngram"]
    ids = torch.arange(20)[None]
    assert bench.warmup_ids(ids).tolist() == [list(range(8))]
    result = run_in_process(files, tmp_path, "bench.methods=[hf,specdec:suffix,specdec:suffix@paged]")
    runs = {r["method"]: r for r in result["runs"]}
    assert runs["specdec:suffix"]["mismatches"] == 0 and runs["specdec:suffix@paged"]["mismatches"] == 0
    caches = {key[0]: cache for key, cache in _SHARED.items() if key[0].startswith("bench:specdec:suffix")}
    assert set(caches) == {"bench:specdec:suffix", "bench:specdec:suffix@paged"}
    # each holds its warm-up request (8 prompt tokens + its output) and one request per measured prompt
    assert all(c.stats()["segments"] == 1 + result["prompts"] for c in caches.values())


def test_workload_prompt_sets_have_four_categories(tmp_path):
    out = tmp_path / "w.jsonl"
    subprocess.run([sys.executable, str(REPO / "scripts" / "workload_prompts.py"), "--per-category", "3",
                    "--out", str(out)], check=True, capture_output=True, timeout=120)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["category"] for r in rows] == ["code_edit"] * 3 + ["tool_json"] * 3 + ["sql"] * 3 + ["report"] * 3
    assert len({r["question_id"] for r in rows}) == 12 and all(r["turns"][0] for r in rows)
    assert "```python\ndef " in rows[0]["turns"][0]
