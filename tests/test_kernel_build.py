"""How C++ kernels are built: from files in specdec/kernels/csrc, keyed by what they are made of (not the host),
with a fallback where the build fails, and an error instead under SPECDEC_REQUIRE_CPP (CI)."""

from __future__ import annotations

import os
import platform
import re
import shutil

import pytest

from specdec.kernels import build


def _copy_csrc(tmp_path):
    root = tmp_path / "csrc"
    shutil.copytree(build.CSRC, root)
    (root / "screen_only.cpp").write_text('#include "greedy_screen.h"\n')  # an extension of one header
    return root


def test_a_kernel_is_its_file_and_the_headers_it_includes(tmp_path):
    root = _copy_csrc(tmp_path)
    unit = build.CppKernel("t_unit", build.UNIT, "test", root=root)
    assert [p.name for p in unit.files()] == sorted(p.name for p in build.CSRC.iterdir() if p.suffix in (".h", ".cpp"))
    assert [p.name for p in build.CppKernel("t_screen", "screen_only.cpp", "test", root=root).files()] == \
        ["greedy_screen.h", "screen_only.cpp"]


def test_the_key_follows_the_sources_and_not_the_host(tmp_path, monkeypatch):
    root = _copy_csrc(tmp_path)

    def key(source):
        return build.CppKernel("t", source, "test", root=root).key()

    unit, screen = key(build.UNIT), key("screen_only.cpp")
    monkeypatch.setattr(platform, "node", lambda: "another-host")
    assert key(build.UNIT) == unit  # a renamed container reuses its builds
    (root / "simd.h").write_text((root / "simd.h").read_text() + "\n// an edit\n")
    assert key(build.UNIT) != unit  # an included header changed: built anew
    assert key("screen_only.cpp") == screen  # an extension that does not include it is untouched
    monkeypatch.setattr(build.CppKernel, "flags", staticmethod(lambda: ["-O2"]))
    assert key("screen_only.cpp") != screen  # other flags: another build


def test_every_shipped_kernel_is_listed():
    from specdec import registry
    from specdec.kernels import cpu_gemm, greedy_head  # noqa: F401 - importing them makes their kernels

    for name in registry.VERIFIERS:
        registry.verifier_class(name)
    build.shipped()
    assert sorted(k.source for k in build.KERNELS) == sorted(p.name for p in build.CSRC.glob("*.cpp"))
    bound = re.findall(r'def_submodule\("(\w+)"', (build.CSRC / build.UNIT).read_text(encoding="utf-8"))
    assert sorted(p.part for p in build.PARTS) == sorted(bound)


def _broken(tmp_path) -> build.CppKernel:
    (tmp_path / "broken.cpp").write_text('#error "this kernel does not compile"\n')
    return build.CppKernel("specdec_test_broken", "broken.cpp", "test", root=tmp_path)


def test_a_failed_build_falls_back_and_says_why(tmp_path, monkeypatch):
    monkeypatch.delenv(build.REQUIRE_ENV, raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    kernel = _broken(tmp_path)
    assert not kernel.available() and "does not compile" in kernel.failure()
    with pytest.raises(RuntimeError, match="could not be built"):
        kernel.module


def test_a_failed_build_is_an_error_where_every_kernel_is_required(tmp_path, monkeypatch):
    monkeypatch.setenv(build.REQUIRE_ENV, "1")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    with pytest.raises(build.KernelBuildError, match="broken.cpp.*SPECDEC_REQUIRE_CPP"):
        _broken(tmp_path).available()


def test_turned_off_kernels_are_not_built(tmp_path, monkeypatch):
    monkeypatch.setenv(build.DISABLE_ENV, "1")
    kernel = _broken(tmp_path)
    assert not kernel.available() and kernel.failure() is None


def test_no_compiler_means_the_fallback(tmp_path, monkeypatch):
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler here")
    monkeypatch.delenv(build.REQUIRE_ENV, raising=False)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    build.compiler.cache_clear()
    try:
        kernel = build.CppKernel("specdec_test_nocxx", "screen_only.cpp", "test", root=_copy_csrc(tmp_path))
        assert not kernel.available() and kernel.failure()
    finally:
        build.compiler.cache_clear()


@pytest.mark.skipif(not os.environ.get(build.REQUIRE_ENV),
                    reason="SPECDEC_REQUIRE_CPP is unset: a kernel that fails to build falls back (CI sets it)")
def test_every_kernel_builds_on_this_machine():
    """CI builds every kernel, also those this CPU would not use (the panels without AVX-512), so a source that stops
    compiling fails the run instead of leaving the suite on the fallbacks."""
    from specdec import registry
    from specdec.kernels import cpu_gemm, greedy_head  # noqa: F401 - importing them makes their kernels

    for name in registry.VERIFIERS:
        registry.verifier_class(name)
    for kernel in build.KERNELS:
        assert kernel.available(), f"{kernel.source}: {kernel.failure()}"
    for part in build.PARTS:  # every kernel is a submodule of the built extension
        assert part.available() and part.module is not None, part.part
