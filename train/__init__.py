"""Drafter training jobs (Hydra mains under ``conf/train/``): self-distillation data, Medusa heads, an EAGLE-style
head, layer-skip self-drafting and distilled draft models. Nothing in specdec, drafters or verifiers imports train.
"""
