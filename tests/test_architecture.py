"""The layout's rules, read from the source's import statements (module-level and inside functions alike).

- specdec's core never imports a concrete drafter or verifier (only ``specdec/registry.py`` names them, as strings);
  nothing but ``train/`` imports ``train``; drafters and verifiers do not import each other.
- Rooms depend downwards: the contracts (``errors``, ``types``, ``protocols``) on nothing of ours; ``algorithms`` and
  ``kernels`` on the contracts; ``models`` on those and the kernels, ``serving`` on the contracts and ``algorithms``;
  ``bench`` and the API on top.
- C++ lives in ``specdec/kernels/csrc/`` files, never in Python strings.
- No import cycles between modules.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("specdec", "drafters", "verifiers", "train")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def resolve(name: str) -> str | None:
    """The project module an imported dotted name refers to (a module, or the package holding the name)."""
    while name:
        if name in modules():
            return name
        name = name.rpartition(".")[0]
    return None


@cache
def imports_of(module: str) -> frozenset[str]:
    """Project modules ``module`` imports, anywhere in its source."""
    tree = ast.parse(modules()[module].read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out.update(m for m in map(resolve, names) if m is not None and m != module)
    return frozenset(out)


def in_room(module: str, room: str) -> bool:
    return module == room or module.startswith(room + ".")


def test_the_scan_sees_the_project():
    assert {"specdec.generate", "specdec.serving.engine", "drafters.eagle", "verifiers.paged.verifier",
            "train.eagle", "specdec.kernels.cpu_gemm"} <= set(modules())
    assert "specdec.algorithms.step" in imports_of("specdec.serving.engine")
    assert "specdec.models.hf_cache" in imports_of("drafters.eagle")  # `from specdec.models import hf_cache`


@pytest.mark.parametrize("module", sorted(m for m in modules() if in_room(m, "specdec")))
def test_core_never_imports_a_concrete_drafter_verifier_or_training_job(module):
    bad = [m for m in imports_of(module) if m.split(".")[0] in ("drafters", "verifiers", "train")]
    assert not bad, f"{module} imports {bad}; reach drafters and verifiers through specdec.registry"


@pytest.mark.parametrize("module", sorted(m for m in modules() if m.split(".")[0] in ("drafters", "verifiers")))
def test_drafters_and_verifiers_stay_apart_and_never_import_train(module):
    other = "verifiers" if module.startswith("drafters") else "drafters"
    bad = [m for m in imports_of(module) if m.split(".")[0] in (other, "train")]
    assert not bad, f"{module} imports {bad}"


# what each room of specdec may import from specdec (besides itself)
CONTRACTS = ("specdec.errors", "specdec.types", "specdec.protocols")
ALLOWED = {
    "specdec.errors": (),
    "specdec.types": ("specdec.errors",),
    "specdec.protocols": ("specdec.errors", "specdec.types"),
    "specdec.algorithms": CONTRACTS,
    "specdec.kernels": CONTRACTS,
    "specdec.models": (*CONTRACTS, "specdec.algorithms", "specdec.kernels"),
    "specdec.serving": (*CONTRACTS, "specdec.algorithms"),
}


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_rooms_depend_downwards(room):
    allowed = (room, *ALLOWED[room])
    for module in [m for m in modules() if in_room(m, room)]:
        bad = [m for m in imports_of(module) if in_room(m, "specdec") and not any(in_room(m, a) for a in allowed)]
        assert not bad, f"{module} ({room}) imports {bad}; it may import only {list(allowed)}"


def test_no_import_cycles():
    graph = {m: imports_of(m) for m in modules()}
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("module", sorted(modules()))
def test_no_cpp_in_python_strings(module):
    text = modules()[module].read_text(encoding="utf-8")
    assert "PYBIND11_MODULE(" not in text and "\n#include <" not in text, \
        f"{module} holds C++ source; put it in specdec/kernels/csrc/ and bind it in kernels.cpp (build.Kernel)"


def test_every_kernel_is_a_submodule_of_the_one_translation_unit_in_csrc():
    """The kernels are headers in csrc/, bound by kernels.cpp (one translation unit: torch's headers compile once);
    every Kernel a module names is a submodule there, and every submodule is named by a module."""
    csrc = REPO / "specdec" / "kernels" / "csrc"
    assert {p.name for p in csrc.glob("*.cpp")} == {"kernels.cpp"}
    bound = set(re.findall(r'def_submodule\("(\w+)"', (csrc / "kernels.cpp").read_text(encoding="utf-8")))
    named = set()
    for module in modules():
        tree = ast.parse(modules()[module].read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Kernel":
                named.add(node.args[0].value)
    assert named and named == bound, f"kernels.cpp binds {sorted(bound)}; the modules name {sorted(named)}"


@pytest.mark.parametrize("module", sorted(m for m in modules() if m.split(".")[0] in PACKAGES))
def test_only_the_cli_reaches_the_bench_app(module):
    """The bench app sits on top: the library (generate, the profiler the adaptive budget needs), drafters,
    verifiers and training jobs never import it."""
    if in_room(module, "specdec.bench") or module == "specdec.cli":
        return
    bad = [m for m in imports_of(module) if in_room(m, "specdec.bench")]
    assert not bad, f"{module} imports {bad}; the bench app is reached only from specdec.cli"
