"""gemmalite: a small, fast, from-scratch inference engine for Gemma 3."""

from .config import GemmaConfig
from .engine import Engine
from .errors import (
    ContextLengthError,
    GemmaliteError,
    InvalidArgumentError,
    MissingExtraError,
    ModelLoadError,
)
from .loading import load
from .options import GenerationOptions
from .loop import Stats

__all__ = [
    "ContextLengthError",
    "Engine",
    "GemmaConfig",
    "GemmaliteError",
    "GenerationOptions",
    "InvalidArgumentError",
    "MissingExtraError",
    "ModelLoadError",
    "Stats",
    "check",
    "load",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # `gemmalite.check` is a tool, not part of generation: import it only when asked for.
    if name == "check":
        from .selfcheck import check  # a package named apart, so that importing it never shadows this function

        return check
    raise AttributeError(f"module 'gemmalite' has no attribute {name!r}")
