"""The few exception types gemmalite raises where input enters.

Every message says what went wrong and what to do about it. The CLI prints them as one line.
"""


class GemmaliteError(Exception):
    """Base class: anything gemmalite raises on purpose."""


class ModelLoadError(GemmaliteError):
    """The model source cannot be read: missing, not Gemma 3, corrupt, or shapes that disagree."""


class InvalidArgumentError(GemmaliteError, ValueError):
    """An argument is out of range or of the wrong kind (sampling values, dtype, device, prompts)."""


class ContextLengthError(InvalidArgumentError):
    """The tokens would not fit in the engine's max_seq_len."""


class MissingExtraError(GemmaliteError, ImportError):
    """An optional dependency is needed; the message names the pip extra that installs it."""
