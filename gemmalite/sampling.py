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
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .errors import InvalidArgumentError

MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingSettings:
    """What the user asked for. temperature 0 means greedy; top_k 0, top_p 1 and min_p 0 mean off.

    Penalties: repetition_penalty 1 is off (transformers' rule, over prompt and reply);
    presence_penalty and frequency_penalty 0 are off (OpenAI's rule, over the reply only).
    repeat_last_n: the tokens the repetition penalty looks back over, as llama.cpp's flag: the last
    N of prompt and reply; -1 (the default) is all of them, 0 turns the penalty off.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_last_n: int = -1

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
        r = self.repetition_penalty
        if not _is_number(r) or not math.isfinite(r) or r <= 0:
            raise InvalidArgumentError(f"repetition_penalty must be a finite number > 0 (1 means off), got {r!r}")
        n = self.repeat_last_n
        if isinstance(n, bool) or not isinstance(n, int) or not -1 <= n < WHOLE_HISTORY:
            raise InvalidArgumentError(f"repeat_last_n must be an integer >= -1 (-1: the whole history, 0: off), got {n!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise InvalidArgumentError(f"{name} must be a finite number >= 0 (0 means off), got {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        repetition = self.repetition_penalty != 1 and self.repeat_last_n != 0
        return repetition or self.presence_penalty != 0 or self.frequency_penalty != 0


FLOAT32_MAX = 3.4e38  # settings become float32 tensors: larger values would turn into inf


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not abs(x) > FLOAT32_MAX


class SamplerState(NamedTuple):
    """Per-row tensors [B] that a sampling graph reads."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    keys: torch.Tensor  # per-row 32-bit noise keys, derived from the seed


def seed_key(seed: int | None, index: int = 0) -> int:
    """The 32-bit noise key of the `index`-th prompt of a call with this seed (random without one).

    A key depends on the seed and the prompt's place in its call, never on the cache row it
    happens to occupy, so a request draws the same tokens alone or batched with others.
    """
    seed = seed if seed is not None else random.getrandbits(63)
    mixed = hash32(torch.tensor([seed & MASK32])) ^ ((seed >> 32) & MASK32) ^ hash32(torch.tensor([index]))
    return int(hash32(mixed))


def sampler_state(settings: SamplingSettings | Sequence[SamplingSettings], batch_size: int, device, keys=None) -> SamplerState:
    """The tensors for `batch_size` rows: one settings for all, or one per row.

    `keys` (one per row) default to seed_key(seed, row).
    """
    rows = [settings] * batch_size if isinstance(settings, SamplingSettings) else list(settings)
    if keys is None:
        shared = rows[0].seed if isinstance(settings, SamplingSettings) else None
        if isinstance(settings, SamplingSettings) and shared is None:
            shared = random.getrandbits(63)  # one random seed for the call, rows still differ
        keys = [seed_key(shared if shared is not None else r.seed, i) for i, r in enumerate(rows)]

    def column(name, dtype):
        return torch.tensor([getattr(r, name) for r in rows], dtype=dtype, device=device)

    return SamplerState(
        column("temperature", torch.float32),
        column("top_k", torch.long),
        column("top_p", torch.float32),
        column("min_p", torch.float32),
        torch.tensor(keys, dtype=torch.long, device=device),
    )


# ------------------------------------------------------------------ which graph samples
TOPK_CANDIDATES = 128  # top_k up to this is served from torch.topk, with no sort of the vocabulary
GREEDY, PLAIN, TOPK, SORTED = "greedy", "plain", "topk", "sorted"


def sampling_kind(rows: Sequence[SamplingSettings]) -> str:
    """The cheapest exact way to sample every row; a static choice, so each kind is its own graph.

    - greedy: every row has temperature 0;
    - plain: no top-k and no top-p: temperature and min-p need only the largest logit;
    - topk: every row keeps at most TOPK_CANDIDATES tokens: top-p and min-p act inside them;
    - sorted: anything else (top-p without top-k): the whole vocabulary is sorted.
    """
    if all(r.greedy for r in rows):
        return GREEDY
    sampled = [r for r in rows if not r.greedy]
    if all(r.top_k == 0 and r.top_p >= 1 for r in sampled):
        return PLAIN
    if all(0 < r.top_k <= TOPK_CANDIDATES for r in sampled):
        return TOPK
    return SORTED


# ------------------------------------------------------------------ penalties
# A token's place in its row's history (prompt, then reply) is counted in int32. A token never
# seen sits at NEVER; a window of WHOLE_HISTORY reaches back past any history a cache can hold.
NEVER = -(2**31)
WHOLE_HISTORY = 2**30


class Penalties(NamedTuple):
    """Per-row penalty settings [B] and what they count: tensors, so values never recompile."""

    repetition: torch.Tensor  # [B] float32, 1 = off
    presence: torch.Tensor  # [B] float32, 0 = off
    frequency: torch.Tensor  # [B] float32, 0 = off
    window: torch.Tensor  # [B] int32: how many of the latest tokens the repetition penalty sees
    last_seen: torch.Tensor  # [B, V] int32: each token's latest place in the history (prompt and reply)
    seen: torch.Tensor  # [B] int32: how long the history is
    counts: torch.Tensor  # [B, V] int32: how often each token was generated


def repetition_window(settings: SamplingSettings) -> int:
    return WHOLE_HISTORY if settings.repeat_last_n == -1 else settings.repeat_last_n


def latest_places(history: Sequence[int], vocab_size: int) -> torch.Tensor:
    """[V] int32: where each token of `history` last occurs in it; NEVER for the others."""
    places = torch.full((vocab_size,), NEVER, dtype=torch.int32)
    ids = torch.as_tensor(list(history), dtype=torch.long)
    return places.scatter_reduce(0, ids, torch.arange(len(ids), dtype=torch.int32), "amax")


def penalties(
    settings: Sequence[SamplingSettings], histories: Sequence[Sequence[int]], vocab_size: int, device
) -> Penalties:
    """Penalty state for rows whose prompts (everything before the reply) are `histories`."""
    last_seen = torch.stack([latest_places(h, vocab_size) for h in histories]) if histories else torch.empty(0, vocab_size)

    def column(name):
        return torch.tensor([getattr(s, name) for s in settings], dtype=torch.float32, device=device)

    return Penalties(
        column("repetition_penalty"),
        column("presence_penalty"),
        column("frequency_penalty"),
        torch.tensor([repetition_window(s) for s in settings], dtype=torch.int32, device=device),
        last_seen.to(device, torch.int32),
        torch.tensor([len(h) for h in histories], dtype=torch.int32, device=device),
        torch.zeros(len(settings), vocab_size, dtype=torch.int32, device=device),
    )


def set_penalties(p: Penalties, row: int, settings: SamplingSettings, history: Sequence[int]) -> None:
    """Row `row` of `p`, in place, for a new request with these settings and prompt."""
    p.repetition[row] = settings.repetition_penalty
    p.presence[row] = settings.presence_penalty
    p.frequency[row] = settings.frequency_penalty
    p.window[row] = repetition_window(settings)
    p.last_seen[row] = latest_places(history, p.last_seen.shape[1]).to(p.last_seen.device)
    p.seen[row] = len(history)
    p.counts[row] = 0


def row_view(state: SamplerState | Penalties, row: int):
    """One row of a SamplerState or Penalties, as views: in-place updates reach the whole batch's tensors."""
    return type(state)(*(t[row : row + 1] for t in state))


def apply_penalties(logits: torch.Tensor, p: Penalties) -> torch.Tensor:
    """transformers' repetition penalty over prompt and reply, then OpenAI's presence and frequency.

    With the neutral values (1, 0, 0) every logit comes back bit for bit unchanged.
    """
    logits = logits.float()
    seen = p.last_seen >= (p.seen - p.window)[:, None]  # within the row's window
    r = p.repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    counts = p.counts.float()
    return logits - p.presence[:, None] * (counts > 0).float() - p.frequency[:, None] * counts


def count_tokens(p: Penalties, tokens: torch.Tensor, active: torch.Tensor) -> None:
    """Add each active row's new token [B] to its counts and history, in place."""
    p.counts.scatter_add_(1, tokens[:, None], active[:, None].to(p.counts.dtype))
    place = torch.where(active, p.seen, p.last_seen.gather(1, tokens[:, None])[:, 0])
    p.last_seen.scatter_(1, tokens[:, None], place[:, None])
    p.seen.add_(active.to(p.seen.dtype))


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
    return gumbel_at(keys, positions, torch.arange(vocab_size, device=keys.device)[None, :])


def gumbel_at(keys: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """The same noise, only for the given token ids [B, K] (or [1, K])."""
    stream = hash32(hash32(keys) ^ positions)  # [B]
    second = hash32(stream ^ 0x5BD1E995)[:, None]
    # Two rounds, so that two streams never give permutations of the same noise.
    bits = hash32(hash32(stream[:, None] ^ token_ids) ^ second)
    uniform = ((bits >> 8).float() + 0.5) / float(1 << 24)  # in (0, 1), never 0 or 1
    return -torch.log(-torch.log(uniform))


# ------------------------------------------------------------------ filters
def _keep_sorted(ordered: torch.Tensor, state: SamplerState) -> torch.Tensor:
    """Which of the logits [B, K], sorted in descending order, survive top-k, top-p and min-p.

    Order: top-k, top-p over what top-k kept (renormalised), min-p relative to the most likely
    token. The most likely token always survives.
    """
    rank = torch.arange(ordered.shape[-1], device=ordered.device)[None, :]
    top_k = state.top_k[:, None]
    keep = (top_k <= 0) | (rank < top_k)
    probs = torch.softmax(ordered.masked_fill(~keep, float("-inf")), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    top_p = state.top_p[:, None]
    keep = keep & ((mass_before < top_p) | (top_p >= 1.0))
    return keep & (ordered >= ordered[:, :1] + torch.log(state.min_p[:, None]))


def _scaled(logits: torch.Tensor, state: SamplerState) -> torch.Tensor:
    return logits.float() / state.temperature.clamp(min=1e-5)[:, None]


def filter_logits(logits: torch.Tensor, state: SamplerState) -> torch.Tensor:
    """Temperature-scaled logits [B, V], with -inf for every token the filters remove (full sort)."""
    scaled = _scaled(logits, state)
    ordered, order = scaled.sort(dim=-1, descending=True)
    keep_by_id = torch.zeros_like(ordered, dtype=torch.bool).scatter(1, order, _keep_sorted(ordered, state))
    return scaled.masked_fill(~keep_by_id, float("-inf"))


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, state: SamplerState, positions: torch.Tensor, kind: str = SORTED) -> torch.Tensor:
    """One token per row [B] from logits [B, V]. Rows with temperature 0 take the argmax.

    Every kind draws argmax(filtered logits + noise(token id)) over the same kept set, so for a
    seed all kinds pick the same token; they differ only in how much of the vocabulary they touch.
    """
    if kind == GREEDY:
        return greedy(logits)
    if kind == TOPK:
        ordered, ids = _scaled(logits, state).topk(TOPK_CANDIDATES, dim=-1)  # sorted, descending
        score = ordered + gumbel_at(state.keys, positions, ids)
        score = score.masked_fill(~_keep_sorted(ordered, state), float("-inf"))
        drawn = ids.gather(1, score.argmax(dim=-1, keepdim=True))[:, 0]
    else:
        if kind == PLAIN:  # min-p needs only the largest logit
            scaled = _scaled(logits, state)
            floor = scaled.amax(dim=-1, keepdim=True) + torch.log(state.min_p[:, None])
            filtered = scaled.masked_fill(scaled < floor, float("-inf"))
        else:
            filtered = filter_logits(logits, state)
        drawn = (filtered + gumbel_noise(state.keys, positions, logits.shape[-1])).argmax(dim=-1)
    return torch.where(state.temperature == 0, logits.argmax(dim=-1), drawn)


def logprobs(logits: torch.Tensor, chosen: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log-softmax of the model's own logits: of each chosen token [B], and the `top` best [B, top] (values, ids)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logp.topk(top, dim=-1)
    return logp.gather(1, chosen[:, None])[:, 0], values, ids
