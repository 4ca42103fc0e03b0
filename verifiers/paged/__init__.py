"""The paged verifier and what only it uses: the paged KV cache, commit planning, attention groups and kernels.

- :mod:`~verifiers.paged.verifier`: :class:`PagedVerifier` (one request, or many through the batching engine).
- :mod:`~verifiers.paged.attention`: the attention function registered with transformers' ``AttentionInterface``.
- :mod:`~verifiers.paged.cache`: per-layer K/V pools and block tables (:class:`~verifiers.paged.cache.PagedKVCache`).
- :mod:`~verifiers.paged.commit_plan`: which slots to copy after an acceptance (a pure, golden-tested function).
- :mod:`~verifiers.paged.groups`: which requests share one attention call.
- :mod:`~verifiers.paged.kernels` (torch reference, fused SDPA) and :mod:`~verifiers.paged.triton_kernel` (GPU).
"""

from verifiers.paged.verifier import PagedVerifier

__all__ = ["PagedVerifier"]
