"""specdec: lossless speculative decoding for Hugging Face causal LMs.

A drafter proposes a draft tree; a verifier runs the whole tree through the target in one forward pass; an
acceptance rule keeps the longest valid path plus one token from the target. See README.md for the concepts.
"""

from specdec.algorithms.acceptance import LOSSY, RULES
from specdec.algorithms.loop import Step, decode
from specdec.algorithms.sampling import SamplingParams
from specdec.errors import ConfigError, PromptError, SpecdecError, VocabularyMismatchError
from specdec.generate import SpecDecoder, generate
from specdec.protocols import Drafter, Feedback, Verifier
from specdec.types import Acceptance, DraftContext, DraftTree, GenerationOutput, GenerationStats, VerifyOutput

__all__ = [
    "Acceptance", "ConfigError", "DraftContext", "DraftTree", "Drafter", "Feedback", "GenerationOutput",
    "GenerationStats", "LOSSY", "PromptError", "RULES", "SamplingParams", "SpecDecoder", "SpecdecError", "Step",
    "Verifier", "VerifyOutput", "VocabularyMismatchError", "decode", "generate",
]
__version__ = "0.1.0"
