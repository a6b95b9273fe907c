"""The decode runner: prefill in chunks, one compiled decode step, and the token loop.

Compile lives here, at the edge: the model stays eager, and the runner compiles one function,
`decode_step`, with `torch.compile(mode="reduce-overhead", fullgraph=True)`. Every input that
changes between steps (tokens, which rows are still active, cache lengths, sampling settings) is
a tensor, so the step compiles once per batch size and per mode (greedy or sampling), and on CUDA
each later call replays a CUDA graph.

Prefill runs eagerly, in chunks no longer than the sliding window (see cache.py for why).
"""

from __future__ import annotations

import threading
import time
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .cache import KVCache
from .config import GemmaConfig
from .model import Gemma3
from .options import MAX_LOGPROBS
from .sampling import (
    GREEDY,
    Penalties,
    SamplerState,
    SamplingSettings,
    apply_penalties,
    count_tokens,
    greedy,
    logprobs,
    penalties,
    sample,
    sampler_state,
    sampling_kind,
)

PREFILL_CHUNK = 512
IDLE_CACHES = 2  # caches kept between calls (more are made while calls overlap)
EOS_SLOTS = 4  # eos ids are passed as a fixed-size tensor, padded with -1, so they never change a shape


def decode_step(
    model: Gemma3,
    cache: KVCache,
    tokens: torch.Tensor,  # [B] the last token of each row, to be fed now
    active: torch.Tensor,  # [B] bool; inactive rows are frozen: fed as padding, their token repeated
    sampler: SamplerState | None,  # None when every row is greedy
    penalties: Penalties,
    eos_ids: torch.Tensor,  # [EOS_SLOTS]
    kind: str,  # how to sample (see sampling.sampling_kind); a constant of the graph
    with_logprobs: bool,  # a constant of the graph
):
    """Feed one token per row and choose the next. No host sync: this is the compiled graph."""
    logits = model(tokens[:, None], cache, n_new=active.long())[:, -1]
    next_tokens = choose(logits, sampler, penalties, cache.lengths, kind)
    next_tokens = torch.where(active, next_tokens, tokens)
    finished = (next_tokens[:, None] == eos_ids).any(-1) | (cache.lengths >= cache.max_seq_len - 1)
    chosen = logprobs(logits, next_tokens, MAX_LOGPROBS) if with_logprobs else None
    return next_tokens, active & ~finished, chosen


def prefill_chunk(model: Gemma3, cache: KVCache, ids: torch.Tensor, n_new: torch.Tensor) -> torch.Tensor:
    """Append a chunk [B, T] (row b: n_new[b] real tokens, then padding); logits [B, vocab] of each row's last."""
    return model(ids, cache, n_new=n_new, last_only=True)[:, 0]


def prefill_bucket(length: int, width: int) -> int:
    """The padded length of a compiled prefill chunk: a power of two from 16, or the full width."""
    bucket = 16
    while bucket < length:
        bucket *= 2
    return min(bucket, width)


def choose(logits, sampler: SamplerState | None, penalties: Penalties, positions, kind: str) -> torch.Tensor:
    """The next token of each row [B]: penalties first, then greedy or sampling."""
    scores = apply_penalties(logits, penalties)
    return greedy(scores) if sampler is None else sample(scores, sampler, positions, kind)


class Block(list):
    """What the loop yields: each row's new tokens, and their log-probabilities when asked for.

    `logprobs[row]` is a list of floats; `top[row]` a list, per token, of (id, logprob) pairs.
    """

    def __init__(self, tokens, logprobs=None, top=None):
        super().__init__(tokens)
        self.logprobs, self.top = logprobs, top


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
    cached_tokens: list[int] = field(default_factory=list)  # prompt tokens reused from an earlier call
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

    def __init__(
        self,
        model: Gemma3,
        *,
        device: torch.device,
        dtype: torch.dtype,
        compile: bool,
        max_seq_len: int,
        rewind_margin: int = 0,
    ):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.max_seq_len = max_seq_len
        self.rewind_margin = rewind_margin
        self.compiled = compile
        model.setup_rope(max_seq_len)
        # One function per mode (decode with a kind of sampling, logprobs or not; prefill), each
        # compiled on first use: a mode's graphs then differ only by shape (batch, chunk bucket).
        self._graphs: dict[tuple, tuple] = {}
        # Model calls on this runner's caches take turns: threads interleave step by step, each
        # on a cache of its own (see checkout), so none can see another's tokens.
        self.lock = threading.Lock()
        self._pool_lock = threading.Lock()
        self._idle: list[KVCache] = []  # caches no call is using, newest last

    def _compiled(self, key: tuple, fn):
        """`fn`, compiled on first use under `key` when the runner compiles (each key its own code object)."""
        if key not in self._graphs:
            own = fresh_function(fn)
            compiled = own
            if self.compiled:
                # On CPU there are no CUDA graphs to replay; a C++ wrapper cuts the per-kernel Python
                # overhead instead (it cannot be combined with CUDA graphs, so CUDA keeps the default).
                cpu = self.device.type == "cpu"
                options, mode = ({"cpp_wrapper": True}, None) if cpu else (None, "reduce-overhead")
                compiled = torch.compile(own, mode=mode, options=options, fullgraph=True, dynamic=False)
            self._graphs[key] = own, compiled
        return self._graphs[key][1]

    @property
    def config(self) -> GemmaConfig:
        return self.model.config

    def graph_count(self, mode: str = "decode") -> int:
        """How many graphs the decode step (or "prefill") has compiled: one per mode and shape."""
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        if not self.compiled:
            return 0
        fns = [fn for key, (fn, _) in self._graphs.items() if key[0] == mode]
        return sum(len(_debug_get_cache_entry_list(fn.__code__)) for fn in fns)

    def new_cache(self, batch_size: int) -> KVCache:
        return KVCache(
            self.config, batch_size, self.max_seq_len, rewind_margin=self.rewind_margin, device=self.device, dtype=self.dtype
        )

    def checkout(self, batch_size: int, prompts: list[list[int]] | None = None) -> KVCache:
        """A cache for one call to use alone: an idle one of this batch size, else a new one.

        With `prompts`, the idle cache that already holds the longest start of them is chosen.
        """
        with self._pool_lock:
            fits = [c for c in self._idle if c.batch_size == batch_size]
            if not fits:
                return self.new_cache(batch_size)

            def shared(cache: KVCache) -> int:
                return sum(cache.shared_prefix(row, p) for row, p in enumerate(prompts or []))

            best = max(reversed(fits), key=shared)  # ties: the most recently used
            self._idle.remove(best)
            return best

    def checkin(self, cache: KVCache) -> None:
        """Give a cache back for later calls; only the newest IDLE_CACHES are kept."""
        with self._pool_lock:
            self._idle.append(cache)
            del self._idle[:-IDLE_CACHES]

    def kv_cache(self, batch_size: int) -> KVCache:
        """The idle cache that the next call of this batch size will use (allocated if none)."""
        cache = self.checkout(batch_size)
        self.checkin(cache)
        return cache

    @property
    def kv_bytes(self) -> int:
        """Bytes held by the largest idle cache (0 before the first call)."""
        with self._pool_lock:
            return max((c.nbytes for c in self._idle), default=0)

    @torch.no_grad()
    def prefill(self, cache: KVCache, chunks: Sequence[Sequence[int]]) -> torch.Tensor:
        """Append each row's tokens to the cache; return float32 logits [B, vocab] of each row's last token."""
        lengths = [len(c) for c in chunks]
        cache.check_room(lengths)
        for row, chunk in enumerate(chunks):
            if cache.tokens[row] is not None:
                cache.tokens[row] = cache.tokens[row] + list(chunk)
        width = min(PREFILL_CHUNK, cache.window)
        # Compiled chunks are padded to a few fixed lengths, so prompts of any length share graphs.
        padded = max(lengths) if not self.compiled else width * (-(-max(lengths) // width))
        ids = torch.zeros(len(chunks), padded, dtype=torch.long)
        for row, chunk in enumerate(chunks):
            ids[row, : len(chunk)] = torch.as_tensor(chunk, dtype=torch.long)
        ids = ids.to(self.device)
        remaining = torch.tensor(lengths, device=self.device)
        last = torch.zeros(len(chunks), self.config.vocab_size, device=self.device)
        chunk_fn = self._compiled(("prefill",), prefill_chunk)
        for start in range(0, max(lengths), width):
            size = min(width, max(lengths) - start)
            if self.compiled:
                size = prefill_bucket(size, width)
                if self.device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()
            n_new = (remaining - start).clamp(0, width)
            # A fresh tensor: a view's strides would make a new graph per prompt length.
            chunk = torch.empty((len(chunks), size), dtype=torch.long, device=self.device).copy_(ids[:, start : start + size])
            logits = chunk_fn(self.model, cache, chunk, n_new)
            ends_here = (n_new > 0) & (remaining <= start + width)
            last = torch.where(ends_here[:, None], logits.float(), last)
        return last

    def step(self, cache: KVCache, tokens, active, sampler, penalties, eos_ids, kind: str, with_logprobs: bool):
        """One decode step, compiled when the runner is; the outputs are the caller's to keep.

        The step only reads the penalty counts: the caller adds the new tokens (count_tokens).
        A graph that wrote into a tensor that is not a static buffer could not be a CUDA graph.
        """
        if self.device.type == "cuda" and self.compiled:
            torch.compiler.cudagraph_mark_step_begin()
        step = self._compiled(("decode", kind, with_logprobs), decode_step)
        tokens, active, chosen = step(self.model, cache, tokens, active, sampler, penalties, eos_ids, kind, with_logprobs)
        # Graph outputs are overwritten by the next replay: keep copies.
        return tokens.clone(), active.clone(), None if chosen is None else tuple(t.clone() for t in chosen)

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
        *,
        sync_every: int = 8,
        histories: list[list[int]] | None = None,
        top_logprobs: int | None = None,
    ) -> Iterator[Block]:
        """Yield, every `sync_every` steps, a Block of the tokens each row produced since the last.

        The prompts are appended to what the cache holds; `histories` (default: the prompts) are
        the tokens the repetition penalty counts as prompt. Rows stop at an eos id, at
        max_new_tokens, or when their transcript reaches max_seq_len. `top_logprobs` (None: off)
        asks for each token's log-probability and the top N alternatives.
        """
        held = cache.lengths.tolist()
        batch = len(prompts)
        rows = Rows([min(max_new_tokens, self.max_seq_len - h - len(p)) for h, p in zip(held, prompts)], eos_ids, stats)
        if max_new_tokens == 0:
            rows.reasons[:] = ["length"] * batch
            yield Block([[] for _ in prompts], *_no_logprobs(batch, top_logprobs))
            return
        eos_tensor = self.eos_tensor(eos_ids)
        kind = sampling_kind([settings])
        sampler = None if kind == GREEDY else sampler_state(settings, batch, self.device)
        penalty = penalties([settings] * batch, histories or prompts, self.config.vocab_size, self.device)
        with_logprobs = top_logprobs is not None
        out = _Collector(rows, top_logprobs)
        # What each row will hold once its tokens are fed: what it held, its prompt, its reply.
        transcripts = [None if t is None else t + p for t, p in zip(cache.tokens, prompts)]
        prefilled = False
        try:
            started = time.perf_counter()
            with torch.no_grad(), self.lock:
                logits = self.prefill(cache, prompts)
                prefilled = True
                tokens = choose(logits, sampler, penalty, cache.lengths, kind)
                count_tokens(penalty, tokens, torch.ones_like(tokens, dtype=torch.bool))
                active = (tokens[:, None] != eos_tensor).all(-1) & (cache.lengths < self.max_seq_len - 1)
                out.add(tokens, logprobs(logits, tokens, MAX_LOGPROBS) if with_logprobs else None)
            first = out.block(transcripts)
            stats.prefill_s = time.perf_counter() - started  # the time to first token
            decode_started = time.perf_counter()
            yield first
            while not rows.done:
                # The lock and no_grad cover the step only, never a yield: the caller's code between
                # blocks runs in its own grad mode, and other callers' steps may run meanwhile.
                with torch.no_grad(), self.lock:
                    fed = active
                    tokens, active, chosen = self.step(cache, tokens, active, sampler, penalty, eos_tensor, kind, with_logprobs)
                    count_tokens(penalty, tokens, fed)
                out.add(tokens, chosen)
                if out.pending >= sync_every or out.pending + max(rows.produced) >= max(rows.limits):
                    yield out.block(transcripts)
                    stats.decode_s = time.perf_counter() - decode_started
        finally:
            settle(cache, transcripts if prefilled else [None] * batch)


def settle(cache: KVCache, transcripts: list[list[int] | None]) -> None:
    """Record which tokens each row holds after a call; forget what cannot be vouched for.

    A call that ends early (an error, a stop string, a closed stream) may have fed tokens that
    nobody saw: a row is stepped back to the tokens that are known, or emptied when it cannot
    step back that far, or when its prefill did not finish.
    """
    lengths = cache.lengths.tolist()
    for row, (length, known) in enumerate(zip(lengths, transcripts)):
        unseen = length - len(known) if known is not None else None
        if unseen is None or unseen > cache.rewindable(row):
            cache.reset(row)
        else:
            if unseen > 0:
                cache.rewind(unseen, row)
            cache.tokens[row] = known[: int(cache.lengths[row])]


def _no_logprobs(batch: int, top_logprobs: int | None):
    return (None, None) if top_logprobs is None else ([[] for _ in range(batch)], [[] for _ in range(batch)])


class _Collector:
    """Gathers step outputs on the device and turns them into a Block at each sync."""

    def __init__(self, rows: Rows, top_logprobs: int | None):
        self.rows, self.top_logprobs = rows, top_logprobs
        self.tokens: list[torch.Tensor] = []
        self.chosen: list[tuple] = []

    @property
    def pending(self) -> int:
        return len(self.tokens)

    def add(self, tokens: torch.Tensor, chosen) -> None:
        self.tokens.append(tokens)
        if chosen is not None:
            self.chosen.append(chosen)

    def block(self, transcripts: list[list[int] | None]) -> Block:
        """The pending steps as a Block; each row's taken tokens are added to its transcript."""
        tokens = torch.stack(self.tokens, 1).tolist()  # [B, steps]: the one host sync
        taken = [self.rows.take(row, tokens[row]) for row in range(len(tokens))]
        for transcript, new in zip(transcripts, taken):
            if transcript is not None:
                transcript.extend(new)
        logprobs = top = None
        if self.top_logprobs is not None:
            n = self.top_logprobs
            chosen = torch.stack([c[0] for c in self.chosen], 1).tolist()  # [B, steps]
            values = torch.stack([c[1][:, :n] for c in self.chosen], 1).tolist()  # [B, steps, n]
            ids = torch.stack([c[2][:, :n] for c in self.chosen], 1).tolist()
            logprobs = [chosen[row][: len(taken[row])] for row in range(len(taken))]
            top = [[list(zip(i, v)) for i, v in zip(ids[row], values[row])][: len(taken[row])] for row in range(len(taken))]
        self.tokens.clear()
        self.chosen.clear()
        return Block(taken, logprobs, top)
