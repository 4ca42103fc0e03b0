"""C++ kernels built on the machine that runs them (torch ``cpp_extension``), with a clean fallback where they cannot.

The sources are real files in ``specdec/kernels/csrc/``: each kernel is a header (``layers.h``, ``panel_gemm.h``,
``paged_attention.h``, ...), and ``kernels.cpp`` includes them all in one translation unit with one
``PYBIND11_MODULE`` holding a submodule per kernel. Compiling torch's own headers costs about 35 seconds per
translation unit on a 2-core machine and our kernels a few seconds, so one unit builds in about a minute where one per
kernel took six. A :class:`CppKernel` (an extension: a ``.cpp`` file) builds once and loads on first use, into
``$TORCH_EXTENSIONS_DIR/specdec/<name>_<key>/`` (default ``~/.cache/torch_extensions``); a :class:`Kernel` is one
submodule of the shipped extension, :func:`shipped` (what the Python modules hold). The key hashes the source and
the headers it includes, the compiler flags, the CPU's instruction-set flags (``-march=native`` makes the binary
this CPU's), the compiler and the torch version: the same source on the same kind of machine is built once, whatever
the host is called. A build needs a C++ compiler and ``ninja``.

Where the build fails, :meth:`CppKernel.available` is False and :meth:`CppKernel.failure` says why; callers then take
their torch route. ``SPECDEC_NO_CPP_KERNEL=1`` turns every such kernel off (e.g. to compare routes);
``SPECDEC_REQUIRE_CPP=1`` turns a failed build into an error (CI sets it, so a kernel that stops compiling fails the
run instead of silently testing the fallback). ``specdec kernels`` builds them all and prints a table.

Flags: ``-O3``, ``-march=native`` on x86 (AVX2 / AVX-512 paths chosen at compile time for this CPU), and ``-fopenmp``
so ``at::parallel_for`` in the kernel runs on torch's OpenMP thread pool (without it the pragma is ignored and the
kernel runs on one thread). No ``-ffast-math``: it would change the process's float flags (denormals) for the model.
The sources include ``<torch/types.h>`` and ``<torch/python.h>``, not ``<torch/extension.h>`` (all of libtorch's C++
API): the same tensors and bindings, a third less compile time.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import re
import subprocess
import threading
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
REQUIRE_ENV = "SPECDEC_REQUIRE_CPP"
DISABLE_ENV = "SPECDEC_NO_CPP_KERNEL"
_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


KERNELS: list[CppKernel] = []  # every extension made from csrc/ (the shipped one: kernels.cpp)
PARTS: list[Kernel] = []  # every kernel of the shipped extension a loaded module made, in the order they were made
UNIT = "kernels.cpp"  # the shipped extension's translation unit


class KernelBuildError(RuntimeError):
    """A C++ kernel failed to build while ``SPECDEC_REQUIRE_CPP=1`` asks for every kernel."""


class CppKernel:
    """One C++ extension: ``csrc/<source>`` (a translation unit with a ``PYBIND11_MODULE``), built and loaded on
    first :meth:`available`. ``purpose``: what it computes, in a few words (``specdec kernels`` lists it). Every
    kernel made from ``csrc/`` is listed in :data:`KERNELS`; ``root``: another source folder (tests)."""

    def __init__(self, name: str, source: str, purpose: str, root: Path = CSRC) -> None:
        self.name, self.source, self.purpose, self.root = name, source, purpose, Path(root)
        if not (self.root / source).is_file():
            raise FileNotFoundError(f"C++ kernel {name}: no source file {self.root / source}")
        if self.root == CSRC:
            KERNELS.append(self)
        self._module = None
        self._key: str | None = None
        self._failed: str | None = None
        self._lock = threading.Lock()

    @staticmethod
    def flags() -> list[str]:
        flags = ["-O3", "-fopenmp"]
        if platform.machine() in ("x86_64", "AMD64"):
            flags.append("-march=native")
        return flags

    def files(self) -> list[Path]:
        """The source and every header of ``csrc/`` it includes, directly or through another header."""
        seen: list[Path] = []
        todo = [self.root / self.source]
        while todo:
            path = todo.pop()
            if path in seen:
                continue
            seen.append(path)
            todo += [self.root / m.group(1) for m in _LOCAL_INCLUDE.finditer(path.read_text(encoding="utf-8"))
                     if (self.root / m.group(1)).is_file()]
        return sorted(seen)

    def key(self) -> str:
        """What the build depends on, hashed: its source and the headers it includes, the flags, the CPU's
        instruction-set flags, the compiler and torch (computed once)."""
        if self._key is None:
            h = hashlib.sha1()
            for path in self.files():
                h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
            h.update(" ".join([*self.flags(), torch.__version__, platform.machine(), cpu_flags(),
                               compiler()]).encode())
            self._key = h.hexdigest()[:10]
        return self._key

    def build_dir(self) -> Path:
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
        return Path(root) / "specdec" / f"{self.name}_{self.key()}"

    def _build(self):
        from torch.utils.cpp_extension import load

        directory = self.build_dir()
        directory.mkdir(parents=True, exist_ok=True)
        return load(name=f"{self.name}_{self.key()}", sources=[str(self.root / self.source)],
                    extra_include_paths=[str(self.root)], extra_cflags=self.flags(), extra_ldflags=["-fopenmp"],
                    build_directory=str(directory), verbose=bool(os.environ.get("SPECDEC_VERBOSE_BUILD")))

    def available(self) -> bool:
        """Whether the kernel is built (building it now if it was not; False where that fails or is turned off).
        Under ``SPECDEC_REQUIRE_CPP=1`` the build's failure raises :class:`KernelBuildError` instead (once: the
        kernel then stays unavailable)."""
        if self._module is not None:
            return True
        if os.environ.get(DISABLE_ENV):
            return False
        if self._failed is None:
            with self._lock:
                if self._module is None and self._failed is None:
                    try:
                        self._module = self._build()
                    except Exception as e:  # noqa: BLE001 - no compiler, no headers, no ninja: the torch route serves
                        self._failed = f"{type(e).__name__}: {e}"
                        if os.environ.get(REQUIRE_ENV):
                            raise KernelBuildError(f"the C++ kernel {self.name} ({self.root / self.source}) failed to "
                                                   f"build and {REQUIRE_ENV} is set: {self._failed}") from e
        return self._module is not None

    def failure(self) -> str | None:
        """Why the kernel could not be built (None if it was, or was not tried)."""
        return self._failed

    @property
    def module(self):
        """The loaded extension (raises with the build error where there is none)."""
        if not self.available():
            raise RuntimeError(f"the C++ kernel {self.name} could not be built: {self._failed or 'turned off'}")
        return self._module


@functools.cache
def shipped() -> CppKernel:
    """The extension holding every kernel of ``csrc/`` (:data:`UNIT`), made on first use."""
    return CppKernel("specdec_kernels", UNIT, "every kernel, one translation unit")


class Kernel:
    """One kernel of the shipped extension: its submodule ``part`` (as ``kernels.cpp`` names it), built with the
    whole extension on first :meth:`available`; ``purpose``: what it computes, in a few words. The interface of a
    :class:`CppKernel`: ``available()``, ``failure()``, ``module`` (the submodule)."""

    def __init__(self, part: str, purpose: str) -> None:
        self.part, self.purpose = part, purpose
        self._failed: str | None = None  # this kernel alone off, and why (tests simulate a missing kernel so)
        PARTS.append(self)

    def available(self) -> bool:
        """Whether the shipped extension is built (building it now if it was not)."""
        return self._failed is None and shipped().available()

    def failure(self) -> str | None:
        """Why the kernel is not used (None when it is, or was not tried)."""
        return self._failed or shipped().failure()

    @property
    def module(self):
        """The kernel's submodule of the loaded extension (raises with the build error where there is none)."""
        return getattr(shipped().module, self.part)


@functools.cache
def cpu_flags() -> str:
    """The CPU's flags line from /proc/cpuinfo, space-padded ('' where there is none: not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""
    return " " + flags.split(":", 1)[-1].strip() + " "


@functools.cache
def compiler() -> str:
    """The C++ compiler torch builds with (``$CXX`` or ``c++``) and its version line ('' where it does not run)."""
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{cxx} {out.splitlines()[0] if out else ''}"
