"""Verifiers: run draft trees through the target and keep its KV cache in step with what was accepted.

- ``hf``: the reference verifier — transformers ``DynamicCache`` + 4D tree mask + ``position_ids``.
"""
