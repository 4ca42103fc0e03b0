"""C++ kernels built on the machine that runs them (torch ``cpp_extension``), with a clean fallback where they cannot.

A :class:`CppKernel` compiles its source once per machine, source and torch version (torch caches the build under
its extension directory; the first build takes about a minute and needs a C++ compiler and ``ninja``) and loads it on
first use. Where the build fails, :meth:`CppKernel.available` is False and :meth:`CppKernel.failure` says why; callers
then take their torch route. ``SPECDEC_NO_CPP_KERNEL=1`` turns every such kernel off (e.g. to compare routes).

Flags: ``-O3``, ``-march=native`` on x86 (AVX2 / AVX-512 paths chosen at compile time for this CPU), and ``-fopenmp``
so ``at::parallel_for`` in the kernel runs on torch's OpenMP thread pool (without it the pragma is ignored and the
kernel runs on one thread). No ``-ffast-math``: it would change the process's float flags (denormals) for the model.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading

import torch


class CppKernel:
    """One C++ extension: ``source`` (with a ``PYBIND11_MODULE``), built and loaded on first :meth:`available`."""

    def __init__(self, name: str, source: str) -> None:
        self.name, self.source = name, source
        self._module = None
        self._failed: str | None = None
        self._lock = threading.Lock()

    def flags(self) -> list[str]:
        flags = ["-O3", "-fopenmp"]
        if platform.machine() in ("x86_64", "AMD64"):
            flags.append("-march=native")
        return flags

    def _build(self):
        from torch.utils.cpp_extension import load_inline

        flags = self.flags()
        digest = hashlib.sha1((self.source + " ".join(flags) + torch.__version__ + platform.node()).encode()).hexdigest()
        return load_inline(name=f"{self.name}_{digest[:10]}", cpp_sources=self.source, extra_cflags=flags,
                           extra_ldflags=["-fopenmp"], verbose=False)

    def available(self) -> bool:
        """Whether the kernel is built (building it now if it was not; False where that fails or is turned off)."""
        if self._module is not None:
            return True
        if self._failed is not None or os.environ.get("SPECDEC_NO_CPP_KERNEL"):
            return False
        with self._lock:
            if self._module is None and self._failed is None:
                try:
                    self._module = self._build()
                except Exception as e:  # noqa: BLE001 - no compiler, no headers, no ninja: the torch route serves
                    self._failed = f"{type(e).__name__}: {e}"
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


# dot(a, b) and exp in place, vectorised with AVX2 where the build has it; for sources that include <cmath>,
# <ATen/OpMathType.h> and, under SPECDEC_AVX2 (defined with __AVX2__ and __FMA__), <immintrin.h> and <sleef.h>
SIMD_HELPERS = r"""
// dot(a, b) over n elements, and e[i] = exp(e[i]) for i < n: 8 lanes at a time with AVX2 (Sleef's exp, 1 ULP, from
// libtorch), the scalar loops otherwise
template <typename acc_t, typename scalar_t>
static inline acc_t dot(const acc_t* a, const scalar_t* b, int64_t n) {
  acc_t s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * static_cast<acc_t>(b[i]);
  return s;
}
template <typename acc_t>
static inline void exp_inplace(acc_t* e, int64_t n) {
  for (int64_t i = 0; i < n; ++i) e[i] = std::exp(e[i]);
}
#ifdef SPECDEC_AVX2
template <>
inline float dot<float, float>(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  __m256 v = _mm256_add_ps(acc0, acc1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  float s = _mm_cvtss_f32(h);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}
template <>
inline void exp_inplace<float>(float* e, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(e + i, Sleef_expf8_u10(_mm256_loadu_ps(e + i)));
  for (; i < n; ++i) e[i] = std::exp(e[i]);
}
#endif

"""
