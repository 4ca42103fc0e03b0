"""Drafters: one module per kind, each implementing :class:`specdec.protocols.Drafter`, registered by name in
:mod:`specdec.registry` and configured by ``conf/drafter/<name>.yaml``.

- ``none`` (:mod:`drafters.none`): proposes nothing (plain decoding through the speculative loop).
- ``ngram`` (:mod:`drafters.ngram`): prompt lookup over the prompt and generated text, merged into a trie.
- ``draft_model`` (:mod:`drafters.draft_model`): any small causal LM sharing the target's vocabulary, or one
  distilled by ``train/`` (chain, top-k tree or dynamic tree).
- ``eagle`` (:mod:`drafters.eagle`): an EAGLE-style head (one decoder layer) on the target's features.
- ``medusa`` (:mod:`drafters.medusa`): K Medusa heads on the target's last hidden state.
- ``layerskip`` (:mod:`drafters.layerskip`): the target itself with layers skipped, plus a trained exit adapter.
- ``hybrid`` (:mod:`drafters.hybrid`): several drafters proposing into one tree, budget shares following acceptance.

Shared parts, composed in (not inherited): :mod:`drafters.tree_shape` (Medusa-style choices -> topology, priority,
per-step cut) and :mod:`drafters.growing` (the level-by-level grower, static and dynamic, over a drafter's own
forward for one level).
"""
