"""The benchmark app: ``python -m specdec.bench`` (Hydra, ``conf/``).

- :mod:`~specdec.bench.app`: methods, runners, the interleaved and batched runs, the Hydra entry point.
- :mod:`~specdec.bench.config`: the config schemas and the checks that make a bad config fail early.
- :mod:`~specdec.bench.prompts`, :mod:`~specdec.bench.report`, :mod:`~specdec.bench.plots`: prompt files, tables
  and JSON, PNG plots.
- :mod:`~specdec.bench.divergence`: where a greedy output leaves the reference's and the target's top-2 logit gap there.
"""
