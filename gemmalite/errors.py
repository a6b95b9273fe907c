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


class QueueFullError(GemmaliteError):
    """Every slot of the server is busy and its waiting line is full: the caller should try again later."""


def one_line(error: BaseException, limit: int | None = None, *, with_type: bool = False) -> str:
    """`error`'s message as one line (its type's name when it has none), cut to `limit` characters.

    with_type puts the type's name first: for errors that were not raised on purpose, where the
    type says as much as the message (`RuntimeError: ...`).
    """
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    name = type(error).__name__
    text = (f"{name}: {message}" if message else name) if with_type else (message or name)
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text
