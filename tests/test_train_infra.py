"""train/ infrastructure: data mixtures and splits, self-distillation and feature caches (resume), the trainer's
exact resume, checkpoints, and wandb in offline mode."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from drafters.tree_shape import choices_from_accuracy
from specdec.errors import ConfigError
from specdec.models import checkpoint
from tests.equality import assert_greedy_equal, greedy_ref, reference_finish_reason
from tests.tiny import tiny_llama, tiny_tokenizer
from tests.train_fixtures import chat_file
from train import data as data_mod
from train import eagle, features, selfdistill
from train.logger import Logger
from train.trainer import Schedule, Trainer, batch_indices, lr_lambda


@pytest.fixture
def two_files(tmp_path):
    return chat_file(tmp_path / "a.jsonl", rows=40, seed=1), chat_file(tmp_path / "b.jsonl", rows=40, seed=2)


def test_mixture_weights_split_and_determinism(two_files):
    a, b = two_files
    src = [{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1}]
    rows = data_mod.mixture(src, 16, val_fraction=0.2, seed=0)
    assert [r["source"] for r in rows].count("a") == 12 and [r["source"] for r in rows].count("b") == 4
    assert rows == data_mod.mixture(src, 16, val_fraction=0.2, seed=0)
    val = data_mod.mixture(src, 100, split="val", val_fraction=0.2, seed=0)
    train = data_mod.mixture(src, 100, split="train", val_fraction=0.2, seed=0)
    assert val and not {(r["source"], r["id"]) for r in val} & {(r["source"], r["id"]) for r in train}


def test_mixture_errors(tmp_path, two_files):
    with pytest.raises(ConfigError, match="does not exist"):
        data_mod.mixture([{"path": str(tmp_path / "nope.jsonl")}], 4)
    with pytest.raises(ConfigError, match="weights"):
        data_mod.mixture([{"path": str(two_files[0]), "weight": 0}], 4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "text": "no messages"}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1"):
        data_mod.mixture([{"path": str(bad)}], 4)


def test_encode_conversation_masks_assistant_tokens():
    tok = tiny_tokenizer()
    ids, mask = data_mod.encode_conversation(
        tok, [{"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": "w7 w8 w9"}], 64)
    words = tok.convert_ids_to_tokens(ids.tolist())
    assert [w for w, m in zip(words, mask.tolist()) if m] == ["w7", "w8", "w9"]
    ids, mask = data_mod.encode_conversation(tok, [{"role": "text", "content": "w5 w6 w7"}], 2)
    assert ids.tolist() == [5, 6] and mask.all()


def test_selfdistill_resumes(tmp_path, two_files):
    target, tok = tiny_llama(0, dtype=torch.float32), tiny_tokenizer()
    prompts = data_mod.prompts_of(data_mod.mixture([{"path": str(two_files[0])}], 6))
    out = tmp_path / "answers.jsonl"
    first = selfdistill.generate_answers(target, tok, prompts[:3], out, batch_size=2, max_new_tokens=6,
                                         progress=False)
    with out.open("a") as f:
        f.write('{"id": "torn')  # a crash mid-line
    rows = selfdistill.generate_answers(target, tok, prompts, out, batch_size=2, max_new_tokens=6, progress=False)
    assert len(first) == 3 and len(rows) == 6 and len({r["id"] for r in rows}) == 6
    eos = [target.generation_config.eos_token_id]
    for r in rows:  # the cached ids are exactly the target's greedy answer (EOS kept), whole
        prompt, answer = r["input_ids"][: r["n_prompt"]], r["input_ids"][r["n_prompt"]:]
        # an answer ends at EOS or after max_new_tokens; any other length is a cut answer and fails here
        ended = reference_finish_reason(prompt, answer, 6, eos)
        assert_greedy_equal((answer, ended), greedy_ref(target, prompt, 6), f"row {r['id']}")


def test_features_record_target_outputs_and_resume(tmp_path, two_files):
    target, tok = tiny_llama(0, dtype=torch.float32), tiny_tokenizer()
    rows = data_mod.mixture([{"path": str(two_files[0])}], 5)
    fs = features.extract(target, tok, rows, tmp_path / "f", max_len=64, shard_rows=2, progress=False)
    assert len(fs) == 5 and len(fs.manifest["shards"]) == 3
    ids, _ = data_mod.encode_conversation(tok, rows[0]["messages"], 64)
    out = target(ids[None], output_hidden_states=True)
    b = fs.batch([0])
    torch.testing.assert_close(b.hidden[0, : len(ids)], out.hidden_states[-1][0].half().float())
    assert b.target_top1[0, : len(ids)].tolist() == out.logits[0].argmax(-1).tolist()
    # a lost shard is recomputed, the others are kept
    (tmp_path / "f" / "shard-00001.safetensors").unlink()
    before = (tmp_path / "f" / "shard-00000.safetensors").stat().st_mtime_ns
    fs2 = features.extract(target, tok, rows, tmp_path / "f", max_len=64, shard_rows=2, progress=False)
    assert (tmp_path / "f" / "shard-00000.safetensors").stat().st_mtime_ns == before
    assert torch.equal(fs2.tokens, fs.tokens)
    with pytest.raises(checkpoint.CheckpointError, match="another target"):
        features.extract(tiny_llama(3, dtype=torch.float32), tok, rows, tmp_path / "f", max_len=64,
                         progress=False)


def test_features_of_grown_data_reuse_only_matching_shards(tmp_path, two_files):
    """More rows appended (a larger preset seeded from a smaller one's cache): full shards are kept, the old
    partial last shard is recomputed with the rows that now belong to it, and the result equals a fresh run."""
    target, tok = tiny_llama(0, dtype=torch.float32), tiny_tokenizer()
    rows = data_mod.mixture([{"path": str(two_files[0])}], 7)
    small = features.extract(target, tok, rows[:5], tmp_path / "f", max_len=64, shard_rows=2, progress=False)
    assert len(small) == 5
    kept = (tmp_path / "f" / "shard-00000.safetensors").stat().st_mtime_ns
    grown = features.extract(target, tok, rows, tmp_path / "f", max_len=64, shard_rows=2, progress=False)
    fresh = features.extract(target, tok, rows, tmp_path / "g", max_len=64, shard_rows=2, progress=False)
    assert (tmp_path / "f" / "shard-00000.safetensors").stat().st_mtime_ns == kept
    assert len(grown) == 7 and torch.equal(grown.offsets, fresh.offsets) and torch.equal(grown.tokens, fresh.tokens)
    assert torch.equal(grown.hidden, fresh.hidden)
    (tmp_path / "f" / "shard-00001.safetensors").write_bytes(b"torn")  # a corrupt shard is rewritten, not trusted
    again = features.extract(target, tok, rows, tmp_path / "f", max_len=64, shard_rows=2, progress=False)
    assert torch.equal(again.hidden, fresh.hidden)


def test_complete_features_are_read_without_rewriting_the_manifest(tmp_path, two_files):
    """Under ``accelerate launch`` the other processes open the cache the main process finished: a complete
    feature set is read as it is (no manifest written as incomplete while another process may be loading it)."""
    target, tok = tiny_llama(0, dtype=torch.float32), tiny_tokenizer()
    rows = data_mod.mixture([{"path": str(two_files[0])}], 5)
    first = features.extract(target, tok, rows, tmp_path / "f", max_len=64, shard_rows=2, progress=False)
    manifest = tmp_path / "f" / features.MANIFEST
    stamp = manifest.stat().st_mtime_ns

    def no_writes(*args, **kwargs):
        raise AssertionError("a complete feature set was written again")

    orig_json, orig_shard = features._write_json, features._write_shard
    features._write_json = features._write_shard = no_writes
    try:
        again = features.extract(target, tok, rows, tmp_path / "f", max_len=64, shard_rows=2, progress=False)
    finally:
        features._write_json, features._write_shard = orig_json, orig_shard
    assert manifest.stat().st_mtime_ns == stamp and torch.equal(again.hidden, first.hidden)
    # one more row: not complete for this data any more, so it is extended as before
    grown = features.extract(target, tok, data_mod.mixture([{"path": str(two_files[0])}], 6), tmp_path / "f",
                             max_len=64, shard_rows=2, progress=False)
    assert len(grown) == 6


def test_training_target_device():
    """``target.device: auto`` (the training jobs' default) is this process's accelerator device: cpu here, the
    process's GPU under ``accelerate launch``; an explicit device is kept."""
    from accelerate import PartialState

    from train.job import target_device
    assert target_device("auto") == target_device(None) == str(PartialState().device)
    assert target_device("cpu") == "cpu" and target_device("cuda:1") == "cuda:1"
    if not torch.cuda.is_available():
        assert target_device("auto") == "cpu"


def test_batch_order_and_schedule():
    assert batch_indices(10, 4, 0, 0) == batch_indices(10, 4, 0, 0)
    epoch0 = batch_indices(10, 4, 0, 0) + batch_indices(10, 4, 1, 0)
    assert len(set(epoch0)) == 8  # no repeats inside an epoch
    f = lr_lambda(warmup=2, steps=10)
    assert f(0) == 0.5 and f(1) == 1.0 and abs(f(10) - 0.1) < 1e-9


def _eagle_setup(tmp_path, two_files):
    target, tok = tiny_llama(0, dtype=torch.float32), tiny_tokenizer()
    fs = features.extract(target, tok, data_mod.mixture([{"path": str(two_files[0])}], 8), tmp_path / "f",
                          max_len=64, progress=False)

    class Data:
        train = fs

    cfg = {"drafter": {"draft_vocab_size": 48, "unroll": 2, "unroll_decay": 0.8, "feature_weight": 1.0,
                       "token_weight": 1.0, "init_layer": -1, "tree_nodes": 8, "max_depth": 4, "ranks": 2}}
    return target, fs, lambda: eagle.make_module(target, Data, cfg)


class Crash(Exception):
    pass


def test_resume_gives_the_same_parameters(tmp_path, two_files):
    target, fs, make = _eagle_setup(tmp_path, two_files)
    schedule = Schedule(steps=5, batch_size=2, lr=1e-2, warmup=1, eval_every=100, save_every=2, log_every=1)
    log = Logger(tmp_path / "log", name="none")

    torch.manual_seed(0)
    straight = Trainer(make(), eagle.loss_fn, fs, schedule, tmp_path / "a", log, progress=False).run()

    def crashing(module, batch, _n=[0]):
        _n[0] += 1
        if _n[0] == 4:  # dies during step 4, after the state of step 2 was saved
            raise Crash
        return eagle.loss_fn(module, batch)

    torch.manual_seed(0)
    with pytest.raises(Crash):
        Trainer(make(), crashing, fs, schedule, tmp_path / "b", log, progress=False).run()
    assert json.loads((tmp_path / "b" / "state" / "trainer.json").read_text())["step"] == 2
    torch.manual_seed(123)  # a fresh process: different init, restored from the state
    resumed = Trainer(make(), eagle.loss_fn, fs, schedule, tmp_path / "b", log, progress=False).run(resume=True)
    for (k, v), (k2, v2) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


def test_corrupt_or_mismatched_training_state_is_refused(tmp_path, two_files):
    target, fs, make = _eagle_setup(tmp_path, two_files)
    schedule = Schedule(steps=2, batch_size=2, warmup=1, eval_every=100, save_every=2, log_every=1)
    log = Logger(tmp_path / "log", name="none")
    Trainer(make(), eagle.loss_fn, fs, schedule, tmp_path / "r", log, progress=False).run()
    other = Schedule(steps=4, batch_size=4, warmup=1, eval_every=100, save_every=2, log_every=1)
    with pytest.raises(checkpoint.CheckpointError, match="batch_size"):
        Trainer(make(), eagle.loss_fn, fs, other, tmp_path / "r", log, progress=False).run(resume=True)
    (tmp_path / "r" / "state" / "optimizer.pt").write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
        Trainer(make(), eagle.loss_fn, fs, schedule, tmp_path / "r", log, progress=False).run(resume=True)


def test_checkpoint_save_is_atomic_and_loads(tmp_path):
    target = tiny_llama(0, dtype=torch.float32)
    path = checkpoint.save(tmp_path / "ck", "eagle", {"w": torch.ones(2)}, {"a": 1}, target=target, card="# hi\n")
    checkpoint.save(path, "eagle", {"w": torch.zeros(2)}, {"a": 2}, target=target)  # overwrite in place
    state, meta = checkpoint.load(path, kind="eagle", target=target)
    assert torch.equal(state["w"], torch.zeros(2)) and meta["config"] == {"a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary leftovers
    (path / checkpoint.META).write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
        checkpoint.load(path)


def test_wandb_offline_writes_run_files_and_sends_nothing(tmp_path, monkeypatch):
    sent = []
    real_connect = socket.socket.connect

    def guard(self, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "localhost", "::1"):
            sent.append(address)
            raise OSError("network disabled in this test")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guard)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    log = Logger(tmp_path, name="wandb", config={"x": 1}, run_name="t")
    log.log({"train/loss": 1.5}, step=1)
    log.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())
    assert not sent
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["train/loss"] == 1.5
    with pytest.raises(ConfigError, match="logger"):
        Logger(tmp_path, name="tensorboard")


def test_choices_from_accuracy_golden():
    assert choices_from_accuracy([[0.6, 0.2], [0.5, 0.1]], 4) == [[0], [0, 0], [1]]
    assert choices_from_accuracy([[0.9], [0.9], [0.9]], 10) == [[0], [0, 0], [0, 0, 0]]
    assert choices_from_accuracy([[0.5, 0.6]], 3) == [[0], [1]]  # noisy ranks are kept in order
    assert choices_from_accuracy([[0.5]], 1) == []


def test_eagle_module_state_holds_only_the_head(tmp_path, two_files):
    _, fs, make = _eagle_setup(tmp_path, two_files)
    keys = set(make().state_dict())
    assert all(k.startswith("head.") for k in keys) and "head.d2t" in keys
    saved = checkpoint.save(tmp_path / "h", "eagle", {k[5:]: v for k, v in make().state_dict().items()}, {})
    assert "embed_w" not in str(load_file(str(saved / checkpoint.WEIGHTS)).keys())


def test_cut_tree_keeps_the_best_paths_first():
    from drafters.tree_shape import choice_priority, cut_tree, topology_from_choices

    choices = [[0], [0, 0], [0, 0, 0], [1], [0, 1]]  # best first, as choices_from_accuracy lists them
    parents, ranks = topology_from_choices(choices)
    assert choice_priority(choices) == [1, 3, 5, 2, 4]
    assert cut_tree(parents, ranks, choice_priority(choices), 4, 8) == ([-1, 0, 1, 2], [-1, 0, 0, 0])
    assert cut_tree(parents, ranks, choice_priority(choices), 4, 1) == ([-1, 0, 0], [-1, 0, 1])
    assert cut_tree(parents, ranks, list(range(1, 6)), 3, 8) == ([-1, 0, 0], [-1, 0, 1])  # node order


class Tied(torch.nn.Module):
    """A module with tied weights (like a draft model with the target's tied embedding/LM head)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(96, 8)
        self.head = torch.nn.Linear(8, 96, bias=False)
        self.head.weight = self.emb.weight
        self.mid = torch.nn.Linear(8, 8)


def tied_loss(module, batch):
    logits = module.head(module.mid(module.emb(batch.tokens)))
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.target_top1.flatten()), {}


def test_training_state_with_tied_weights_saves_and_resumes(tmp_path, two_files):
    _, fs, _ = _eagle_setup(tmp_path, two_files)
    schedule = Schedule(steps=4, batch_size=2, warmup=1, eval_every=100, save_every=2, log_every=1)
    log = Logger(tmp_path / "log", name="none")
    torch.manual_seed(0)
    straight = Trainer(Tied(), tied_loss, fs, schedule, tmp_path / "a", log, progress=False).run()
    def crashing(module, batch, _n=[0]):
        _n[0] += 1
        if _n[0] == 3:
            raise Crash
        return tied_loss(module, batch)

    torch.manual_seed(0)
    with pytest.raises(Crash):
        Trainer(Tied(), crashing, fs, schedule, tmp_path / "b", log, progress=False).run()
    torch.manual_seed(5)
    resumed = Trainer(Tied(), tied_loss, fs, schedule, tmp_path / "b", log, progress=False).run(resume=True)
    assert resumed.head.weight is resumed.emb.weight
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


DATA_PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "train" / "data").glob("*.yaml"))


@pytest.mark.parametrize("preset", DATA_PRESETS)
def test_data_presets_compose_with_the_default_keys(preset):
    """Every ``train/data@data=<preset>`` composes into the same sections and keys as the default one."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base=None):
        base = OmegaConf.to_container(compose("train/eagle").data)
        cfg = compose("train/eagle", overrides=[f"train/data@data={preset}"])
    data = OmegaConf.to_container(cfg.data)

    def keys(d, prefix=""):
        return {prefix + k for k in d} | {x for k, v in d.items() if isinstance(v, dict) for x in keys(v, f"{k}.")}
    assert keys(data) == keys(base)
    assert cfg.target.device == "auto"
    if preset == "gpu":
        assert data["self_distill"]["batch_size"] >= 128 and data["teacher_forced"]["num_rows"] == 0
