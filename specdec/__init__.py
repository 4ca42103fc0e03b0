"""specdec: lossless speculative decoding for Hugging Face causal LMs.

A drafter proposes a draft tree; a verifier runs the whole tree through the target in one forward pass; an
acceptance rule keeps the longest valid path plus one token from the target. See docs/concepts.md for the concepts.

The top level holds the public API and the contracts every part shares (``types``, ``protocols``, ``errors``,
``params``, the ``registry``, the verify-cost ``profiler``); the rooms below hold the parts: ``algorithms/`` (pure
functions: trees, acceptance rules, the step), ``serving/`` (the decode driver: one request or a continuous batch),
``kernels/`` (CPU kernels, C++ in ``kernels/csrc/``), ``models/`` (model plumbing), ``bench/`` (the benchmark app). Concrete drafters and verifiers live in the top-level packages ``drafters/`` and ``verifiers/``.
"""

from specdec.algorithms.acceptance import LOSSY, RULES
from specdec.algorithms.sampling import SamplingParams
from specdec.algorithms.step import Step
from specdec.errors import ConfigError, PromptError, SpecdecError, VocabularyMismatchError
from specdec.generate import SpecDecoder, generate
from specdec.params import GenerationParams
from specdec.protocols import Drafter, Feedback, Verifier, VerifierCapabilities
from specdec.serving.engine import decode
from specdec.types import Acceptance, DraftContext, DraftTree, GenerationOutput, GenerationStats, VerifyOutput

__all__ = [
    "Acceptance", "ConfigError", "DraftContext", "DraftTree", "Drafter", "Feedback",
    "GenerationOutput", "GenerationParams", "GenerationStats", "LOSSY", "PromptError", "RULES", "SamplingParams",
    "SpecDecoder", "SpecdecError", "Step", "Verifier", "VerifierCapabilities", "VerifyOutput",
    "VocabularyMismatchError", "decode", "generate",
]
__version__ = "0.1.0"
