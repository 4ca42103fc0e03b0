"""Drafters: one module per kind, each implementing :class:`specdec.protocols.Drafter`.

- ``none``: proposes nothing (plain decoding through the speculative loop).
- ``ngram``: prompt lookup over the prompt and generated text, merged into a trie.
- ``draft_model``: any small causal LM sharing the target's vocabulary (chain or top-k tree).
"""
