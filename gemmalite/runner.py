"""The decode runner: prefill in chunks, one compiled decode step, and the token loop.

Compile lives here, at the edge: the model stays eager, and the runner compiles one function,
`decode_step`, with `torch.compile(mode="reduce-overhead", fullgraph=True)`. Every input that
changes between steps (tokens, which rows are still active, cache lengths, sampling settings) is
a tensor, so the step compiles once per batch size and per mode (greedy or sampling), and on CUDA
each later call replays a CUDA graph.

Prefill runs eagerly, in chunks no longer than the sliding window (see cache.py for why).
"""

from __future__ import annotations

import time
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .cache import KVCache
from .config import GemmaConfig
from .model import Gemma3
from .sampling import SamplerState, SamplingSettings, greedy, sample, sampler_state

PREFILL_CHUNK = 512
EOS_SLOTS = 4  # eos ids are passed as a fixed-size tensor, padded with -1, so they never change a shape


def decode_step(
    model: Gemma3,
    cache: KVCache,
    tokens: torch.Tensor,  # [B] the last token of each row, to be fed now
    active: torch.Tensor,  # [B] bool; inactive rows are frozen: fed as padding, their token repeated
    sampler: SamplerState | None,  # None: greedy
    eos_ids: torch.Tensor,  # [EOS_SLOTS]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed one token per row and choose the next. No host sync: this is the compiled graph."""
    logits = model(tokens[:, None], cache, n_new=active.long())[:, -1]
    next_tokens = greedy(logits) if sampler is None else sample(logits, sampler, cache.lengths)
    next_tokens = torch.where(active, next_tokens, tokens)
    finished = (next_tokens[:, None] == eos_ids).any(-1) | (cache.lengths >= cache.max_seq_len - 1)
    return next_tokens, active & ~finished


def fresh_function(fn):
    """A copy of `fn` with its own code object.

    Dynamo keeps compiled graphs per code object and caps how many one may hold. Each runner
    compiles its own copy of decode_step, so runners never crowd out each other's graphs.
    """
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__doc__, copy.__qualname__ = fn.__doc__, fn.__qualname__
    return copy


@dataclass
class Stats:
    """Figures from the last generation call."""

    prompt_tokens: list[int] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)  # "stop" (eos or stop string) or "length"
    prefill_s: float = 0.0  # time to first token
    decode_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(self.new_tokens, default=0) - 1
        return steps / self.decode_s if self.decode_s > 0 and steps > 0 else 0.0


class Rows:
    """Which rows are still going: each row's budget, what it produced, and why it finished."""

    def __init__(self, limits: list[int], eos_ids: Sequence[int], stats: Stats):
        self.limits = limits
        self.eos_ids = frozenset(eos_ids)
        self.produced = stats.new_tokens = [0] * len(limits)
        self.reasons = stats.finish_reasons = [None] * len(limits)

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.reasons)

    def take(self, row: int, tokens: list[int]) -> list[int]:
        """The row's share of `tokens`: up to and including an eos, and within its budget."""
        taken = []
        for token in tokens:
            if self.reasons[row] is not None:
                break
            taken.append(token)
            self.produced[row] += 1
            if token in self.eos_ids:
                self.reasons[row] = "stop"
            elif self.produced[row] >= self.limits[row]:
                self.reasons[row] = "length"
        return taken


class Runner:
    """Runs a model on KV caches: prefill, the compiled decode step, and the loop that joins them."""

    def __init__(self, model: Gemma3, *, device: torch.device, dtype: torch.dtype, compile: bool, max_seq_len: int):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.max_seq_len = max_seq_len
        self.compiled = compile
        self._step_fn = fresh_function(decode_step)
        self._step = self._step_fn
        if compile:
            # On CPU there are no CUDA graphs to replay; a C++ wrapper cuts the per-kernel Python
            # overhead instead (it cannot be combined with CUDA graphs, so CUDA keeps the default).
            options = {"cpp_wrapper": True} if device.type == "cpu" else None
            mode = "reduce-overhead" if options is None else None
            self._step = torch.compile(self._step_fn, mode=mode, options=options, fullgraph=True, dynamic=False)
        self._cache: KVCache | None = None

    @property
    def config(self) -> GemmaConfig:
        return self.model.config

    def graph_count(self) -> int:
        """How many graphs the decode step has compiled (one per batch size and mode)."""
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return len(_debug_get_cache_entry_list(self._step_fn.__code__)) if self.compiled else 0

    def new_cache(self, batch_size: int) -> KVCache:
        return KVCache(self.config, batch_size, self.max_seq_len, device=self.device, dtype=self.dtype)

    def kv_cache(self, batch_size: int) -> KVCache:
        """The runner's own cache for this batch size, reused across calls so compiled graphs stay valid."""
        if self._cache is None or self._cache.batch_size != batch_size:
            self._cache = None  # free the old buffers before allocating new ones
            self._cache = self.new_cache(batch_size)
        return self._cache

    @property
    def kv_bytes(self) -> int:
        """Bytes held by the runner's own cache (0 before the first call)."""
        return self._cache.nbytes if self._cache is not None else 0

    @torch.no_grad()
    def prefill(self, cache: KVCache, chunks: Sequence[Sequence[int]]) -> torch.Tensor:
        """Append each row's tokens to the cache; return float32 logits [B, vocab] of each row's last token."""
        lengths = [len(c) for c in chunks]
        cache.check_room(lengths)
        width = min(PREFILL_CHUNK, cache.window)
        ids = torch.zeros(len(chunks), max(lengths), dtype=torch.long)
        for row, chunk in enumerate(chunks):
            ids[row, : len(chunk)] = torch.as_tensor(chunk, dtype=torch.long)
        ids = ids.to(self.device)
        remaining = torch.tensor(lengths, device=self.device)
        last = torch.zeros(len(chunks), self.config.vocab_size, device=self.device)
        for start in range(0, max(lengths), width):
            n_new = (remaining - start).clamp(0, width)
            logits = self.model(ids[:, start : start + width], cache, n_new=n_new, last_only=True)[:, 0]
            ends_here = (n_new > 0) & (remaining <= start + width)
            last = torch.where(ends_here[:, None], logits.float(), last)
        return last

    def step(self, cache: KVCache, tokens, active, sampler, eos_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step, compiled when the runner is; the outputs are the caller's to keep."""
        if self.device.type == "cuda" and self.compiled:
            torch.compiler.cudagraph_mark_step_begin()
        tokens, active = self._step(self.model, cache, tokens, active, sampler, eos_ids)
        # Graph outputs are overwritten by the next replay: keep copies.
        return tokens.clone(), active.clone()

    def eos_tensor(self, eos_ids: Sequence[int]) -> torch.Tensor:
        padded = torch.full((EOS_SLOTS,), -1, dtype=torch.long)
        padded[: len(eos_ids)] = torch.tensor(list(eos_ids)[:EOS_SLOTS], dtype=torch.long)
        return padded.to(self.device)

    def generate(
        self,
        cache: KVCache,
        prompts: list[list[int]],
        settings: SamplingSettings,
        max_new_tokens: int,
        eos_ids: tuple[int, ...],
        stats: Stats,
        sync_every: int = 8,
    ) -> Iterator[list[list[int]]]:
        """Yield, every `sync_every` steps, the tokens each row produced since the last yield.

        The prompts are appended to what the cache holds. Rows stop at an eos id, at
        max_new_tokens, or when their transcript reaches max_seq_len.
        """
        held = cache.lengths.tolist()
        rows = Rows([min(max_new_tokens, self.max_seq_len - h - len(p)) for h, p in zip(held, prompts)], eos_ids, stats)
        if max_new_tokens == 0:
            rows.reasons[:] = ["length"] * len(prompts)
            yield [[] for _ in prompts]
            return
        eos_tensor = self.eos_tensor(eos_ids)
        sampler = None if settings.greedy else sampler_state(settings, len(prompts), self.device)

        started = time.perf_counter()
        with torch.no_grad():
            logits = self.prefill(cache, prompts)
            tokens = greedy(logits) if sampler is None else sample(logits, sampler, cache.lengths)
            active = (tokens[:, None] != eos_tensor).all(-1) & (cache.lengths < self.max_seq_len - 1)
            first = tokens.tolist()
            stats.prefill_s = time.perf_counter() - started  # the time to first token
            decode_started = time.perf_counter()
            yield [rows.take(row, [first[row]]) for row in range(len(prompts))]
            pending = []
            while not rows.done:
                tokens, active = self.step(cache, tokens, active, sampler, eos_tensor)
                pending.append(tokens)
                if len(pending) >= sync_every or len(pending) + max(rows.produced) >= max(rows.limits):
                    block = torch.stack(pending, 1).tolist()
                    pending.clear()
                    yield [rows.take(row, block[row]) for row in range(len(prompts))]
                    stats.decode_s = time.perf_counter() - decode_started
