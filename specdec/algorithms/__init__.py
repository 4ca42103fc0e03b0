"""The algorithms: pure functions and small state holders, no model code.

- :mod:`~specdec.algorithms.tree`: draft-tree operations (constructors, masks, positions, paths, cuts).
- :mod:`~specdec.algorithms.sampling`: transformers-style warping (temperature, top-k, top-p) and draws.
- :mod:`~specdec.algorithms.acceptance`: the acceptance rules by config name (greedy, rejection, typical);
  :mod:`~specdec.algorithms.rejection` and :mod:`~specdec.algorithms.typical` hold the two non-trivial ones.
- :mod:`~specdec.algorithms.stopping`: EOS, stop strings and ``max_new_tokens``, exactly as ``model.generate``.
- :mod:`~specdec.algorithms.step`: one request's verify step around the verifier call (draft, then accept ->
  commit -> observe), which the decode driver (:mod:`specdec.serving.engine`) runs for every request.
- :mod:`~specdec.algorithms.cost` and :mod:`~specdec.algorithms.adaptive`: the cost model and the per-request
  adaptive node budget.
"""
