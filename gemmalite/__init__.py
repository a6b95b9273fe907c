"""gemmalite: a small, fast, from-scratch inference engine for Gemma 3."""

from .check import check
from .config import GemmaConfig
from .engine import Engine, Stats, load
from .errors import (
    ContextLengthError,
    GemmaliteError,
    InvalidArgumentError,
    MissingExtraError,
    ModelLoadError,
)

__all__ = [
    "ContextLengthError",
    "Engine",
    "GemmaConfig",
    "GemmaliteError",
    "InvalidArgumentError",
    "MissingExtraError",
    "ModelLoadError",
    "Stats",
    "check",
    "load",
]
__version__ = "0.1.0"
