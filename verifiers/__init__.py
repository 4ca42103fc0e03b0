"""Verifiers: run draft trees through the target and keep its KV cache in step with what was accepted. Each
implements :class:`specdec.protocols.Verifier` (and declares its capabilities), is registered by name in
:mod:`specdec.registry` and configured by ``conf/verifier/<name>.yaml``.

- ``hf`` (:mod:`verifiers.hf`): the reference: the target's own transformers forward with a 4D tree mask,
  ``position_ids`` and a ``DynamicCache``; one request at a time.
- ``paged`` (:mod:`verifiers.paged`): tree attention over a paged KV cache through transformers'
  ``AttentionInterface``; one request, or many with continuous batching (``capabilities.batching``).
"""
