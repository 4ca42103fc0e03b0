"""Errors that name what is wrong and how to fix it.

Every user-facing failure in specdec raises a subclass of :class:`SpecdecError`, so callers can catch one type,
and every message says what to change.
"""


class SpecdecError(ValueError):
    """Base class: bad input or configuration. The message names the fix."""


class ConfigError(SpecdecError):
    """An unknown drafter/verifier/acceptance name, an unknown config key, or an inconsistent setting."""


class VocabularyMismatchError(SpecdecError):
    """A drafter proposes token ids from a different vocabulary than the target's."""


class PromptError(SpecdecError):
    """An empty prompt, a prompt longer than the target's context, or a malformed prompt file line."""


class CapabilityError(SpecdecError):
    """A drafter needs something (hidden states, draft probabilities) that the verifier or rule does not provide."""
