"""Token selection without host syncs: greedy, and sampling with temperature, top-k, top-p, min-p.

Every setting is a per-row tensor, so changing them between calls never recompiles a graph.

Sampling uses the exponential-race form of the Gumbel-max trick: the token is
argmax(log p + Gumbel noise), which draws exactly from softmax. The noise is not drawn from a
torch RNG: it is a counter-based hash of (row key, position, token id). That makes a seed fully
reproducible, the same in eager and compiled code, and needs no generator state inside a graph.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .errors import InvalidArgumentError

MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingSettings:
    """What the user asked for. temperature 0 means greedy; top_k 0, top_p 1 and min_p 0 mean off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        t, k, p, m = self.temperature, self.top_k, self.top_p, self.min_p
        if not _is_number(t) or not math.isfinite(t) or t < 0:
            raise InvalidArgumentError(f"temperature must be a number >= 0 (0 means greedy), got {t!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise InvalidArgumentError(f"top_k must be an integer >= 0 (0 means off), got {k!r}")
        if not _is_number(p) or not 0 < p <= 1:
            raise InvalidArgumentError(f"top_p must be in (0, 1] (1 means off), got {p!r}")
        if not _is_number(m) or not 0 <= m <= 1:
            raise InvalidArgumentError(f"min_p must be in [0, 1] (0 means off), got {m!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InvalidArgumentError(f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class SamplerState(NamedTuple):
    """Per-row tensors [B] that a sampling graph reads."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    keys: torch.Tensor  # per-row 32-bit noise keys, derived from the seed


def sampler_state(settings: SamplingSettings, batch_size: int, device) -> SamplerState:
    seed = settings.seed if settings.seed is not None else random.getrandbits(63)
    rows = torch.arange(batch_size, dtype=torch.long)
    keys = hash32(hash32(torch.full((batch_size,), seed & MASK32)) ^ ((seed >> 32) & MASK32) ^ hash32(rows))

    def full(value, dtype):
        return torch.full((batch_size,), value, dtype=dtype, device=device)

    return SamplerState(
        full(settings.temperature, torch.float32),
        full(settings.top_k, torch.long),
        full(settings.top_p, torch.float32),
        full(settings.min_p, torch.float32),
        keys.to(device),
    )


# ------------------------------------------------------------------ the noise
def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x < 2**32, with every intermediate below 2**49 (no int64 overflow)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A well-mixed 32-bit integer hash (xorshift-multiply), on int64 tensors holding 32-bit values."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(keys: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, vocab], a pure function of (row key, position, token id)."""
    stream = hash32(hash32(keys) ^ positions)  # [B]
    second = hash32(stream ^ 0x5BD1E995)[:, None]
    token_ids = torch.arange(vocab_size, device=keys.device)[None, :]
    # Two rounds, so that two streams never give permutations of the same noise.
    bits = hash32(hash32(stream[:, None] ^ token_ids) ^ second)
    uniform = ((bits >> 8).float() + 0.5) / float(1 << 24)  # in (0, 1), never 0 or 1
    return -torch.log(-torch.log(uniform))


# ------------------------------------------------------------------ filters
def filter_logits(logits: torch.Tensor, state: SamplerState) -> torch.Tensor:
    """Temperature-scaled logits [B, V], with -inf for every token the filters remove.

    Order: temperature, top-k, top-p over what top-k kept (renormalised), min-p relative to the
    most likely token. The most likely token always survives.
    """
    scaled = logits.float() / state.temperature.clamp(min=1e-5)[:, None]
    ordered, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(scaled.shape[-1], device=scaled.device)[None, :]
    top_k = state.top_k[:, None]
    keep = (top_k <= 0) | (rank < top_k)
    ordered = ordered.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    top_p = state.top_p[:, None]
    keep = keep & ((mass_before < top_p) | (top_p >= 1.0))
    keep = keep & (ordered >= ordered[:, :1] + torch.log(state.min_p[:, None]))
    keep_by_id = torch.zeros_like(keep).scatter(1, order, keep)
    return scaled.masked_fill(~keep_by_id, float("-inf"))


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, state: SamplerState, positions: torch.Tensor) -> torch.Tensor:
    """One token per row [B] from logits [B, V]. Rows with temperature 0 take the argmax."""
    filtered = filter_logits(logits, state)
    drawn = (filtered + gumbel_noise(state.keys, positions, logits.shape[-1])).argmax(dim=-1)
    return torch.where(state.temperature == 0, logits.argmax(dim=-1), drawn)
