"""Packaging: the core install is what ``generate()`` needs; the bench and the training jobs take extras.

- No core module (``specdec`` outside the bench app, ``drafters``, ``verifiers``) imports an extra's package at module
  level, and with every extra's package made unimportable, ``import specdec``, every core module, a greedy
  ``generate()`` (adaptive too) and ``specdec generate --help`` still work; ``specdec bench`` names the install.
- ``pyproject.toml``'s extras, :data:`specdec.extras.EXTRAS` and the imports of ``train/`` and ``specdec/bench/``
  agree.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from specdec import extras, registry
from specdec.errors import SpecdecError

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
MODULE_OF = {"hydra-core": "hydra"}  # package name -> import name, where they differ
# modules the core may import that come with transformers (its own dependencies)
WITH_TRANSFORMERS = {"huggingface_hub", "tokenizers", "yaml"}
OURS = {"specdec", "drafters", "verifiers", "train", "tests", "scripts"}


def modules_of(requirements: list[str]) -> set[str]:
    names = {r.split(";")[0].split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip() for r in requirements}
    return {MODULE_OF.get(n, n) for n in names if n != "specdec"}


CORE = modules_of(PYPROJECT["dependencies"])
EXTRA = {name: modules_of(reqs) for name, reqs in PYPROJECT["optional-dependencies"].items()}
NOT_CORE = set().union(*EXTRA.values()) - CORE


def core_files() -> list[Path]:
    """The modules ``generate()`` may reach: specdec outside the bench app, drafters, verifiers."""
    files = [p for pkg in ("specdec", "drafters", "verifiers") for p in sorted((REPO / pkg).rglob("*.py"))]
    return [p for p in files if not p.is_relative_to(REPO / "specdec" / "bench")]


def imports(path: Path, module_level_only: bool) -> set[str]:
    """Top-level names of the third-party modules ``path`` imports (at module level only, or anywhere)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = _module_level(tree.body) if module_level_only else ast.walk(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return {m for m in out if m not in sys.stdlib_module_names and m not in OURS}


def _module_level(body):
    """Statements that run on import, into ``if`` / ``with`` blocks (a ``try: import x`` that tolerates its absence,
    and imports inside functions, run later or never)."""
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.With)):
            yield from _module_level(node.body)
            yield from _module_level(getattr(node, "orelse", []))


def test_core_dependencies_hold_no_extra():
    assert CORE == {"torch", "transformers", "numpy", "safetensors", "gguf", "tqdm", "ninja"}
    assert {"bench", "train", "test"} <= set(EXTRA)
    assert not CORE & NOT_CORE


@pytest.mark.parametrize("extra", sorted(extras.EXTRAS))
def test_the_extras_table_matches_pyproject(extra):
    assert set(extras.EXTRAS[extra]) == EXTRA[extra]


@pytest.mark.parametrize("path", core_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_core_modules_import_no_extra_at_module_level(path):
    bad = imports(path, module_level_only=True) - CORE - WITH_TRANSFORMERS
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)} on import; import it where it is used"


@pytest.mark.parametrize("room, extra", [("train", "train"), ("specdec/bench", "bench")])
def test_entry_points_need_only_the_core_and_their_extra(room, extra):
    used = set().union(*(imports(p, module_level_only=False) for p in (REPO / room).rglob("*.py")))
    beyond = used - CORE - WITH_TRANSFORMERS - EXTRA[extra]
    assert not beyond, f"{room} imports {sorted(beyond)}, in neither the core nor the [{extra}] extra"


CORE_ONLY = r"""
import importlib, pathlib, sys
for name in BLOCKED:
    sys.modules[name] = None  # as if not installed: importing it raises ModuleNotFoundError
import torch
torch.set_num_threads(1)
import specdec
from specdec import cli, extras
for pkg in ("specdec", "drafters", "verifiers"):
    for p in sorted(pathlib.Path(pkg).rglob("*.py")):
        parts = p.with_suffix("").parts
        if parts[:2] == ("specdec", "bench") or parts[-1] == "__main__":  # the bench app needs its extra
            continue
        importlib.import_module(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
from tests.tiny import tiny_llama, tiny_tokenizer, random_prompt
model, ids = tiny_llama(0), random_prompt(0, 12)
ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)[0, 12:].tolist()
for adaptive in (False, True):
    out = specdec.generate(model, ids, tokenizer=tiny_tokenizer(), max_new_tokens=16, adaptive=adaptive)
    assert out.new_tokens == ref and out.stats.finish_reason == "length", (adaptive, out.new_tokens, ref)
assert cli.main(["bench"]) == 2
for name in BLOCKED:
    assert sys.modules[name] is None, f"{name} was imported"
try:
    cli.main(["generate", "--help"])
except SystemExit as e:
    assert e.code == 0
print("core ok")
"""


def test_core_runs_without_any_extra(tmp_path):
    blocked = sorted(NOT_CORE | {"pytest", "hypothesis"})
    code = f"BLOCKED = {blocked!r}\n{CORE_ONLY}"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                          check=False, env={**os.environ, "SPECDEC_CACHE": str(tmp_path)})
    assert proc.returncode == 0 and "core ok" in proc.stdout, proc.stderr[-3000:]
    assert "pip install 'specdec[bench]'" in proc.stderr
    assert "examples:" in proc.stdout and "--drafter adaptive" in proc.stdout


def test_missing_extra_is_named_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "accelerate", None)
    assert extras.missing("train") == ["accelerate"]
    with pytest.raises(SpecdecError, match=r"python -m train.eagle needs the \[train\] extra \(accelerate "
                                                   r"not installed\): pip install 'specdec\[train\]'"):
        extras.require("train", "python -m train.eagle")
    extras.require("bench", "the bench")  # installed here: nothing happens


def test_an_entry_point_without_its_extra_exits_with_the_message(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "hydra", None)
    with pytest.raises(SystemExit) as e:
        extras.require_or_exit("bench", "python -m specdec.bench")
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: python -m specdec.bench needs the [bench] extra (hydra not installed): "
                                       "pip install 'specdec[bench]' (from a checkout: pip install -e '.[bench]').\n")


def test_make_demo_shows_the_recommended_method():
    from omegaconf import OmegaConf

    methods = list(OmegaConf.load(REPO / "conf" / "bench" / "demo.yaml").methods)
    assert "hf" in methods and "specdec:adaptive" in methods
    assert registry.METHODS["adaptive"] == registry.NamedMethod(registry.RECOMMENDED_DRAFTER, adaptive=True)
