"""The runner: a model on KV caches, prefilled in chunks and stepped by one compiled function.

Compile lives here, at the edge: the model stays eager, and the runner compiles `decode_step`
with `torch.compile(mode="reduce-overhead", fullgraph=True)`, and `prefill_chunk`. Every input
that changes between steps (tokens, which rows are still active, cache lengths, sampling
settings, penalties) is a tensor, so the step compiles once per batch size and per way of
choosing (see sampling.sampling_kind), and on CUDA each later call replays a CUDA graph. Prefill
chunks are no longer than the sliding window or the ring's room beyond it (see cache.py) and,
compiled, are padded to a few fixed lengths, so prompts of any length share a handful of graphs.

The runner also lends caches: each call takes one of its own from a small pool (`checkout`),
and model calls take turns under `lock`, so threads never share a cache. loop.py drives it.

Compiling a graph takes seconds to minutes, so a runner tells `on_compile` when a call is about
to compile one, and when it is done. compile="cached" runs packages instead (packages.py).
"""

from __future__ import annotations

import threading
import time
import types
from collections.abc import Callable, Sequence

import torch

from .cache import KVCache
from .config import GemmaConfig
from .errors import InvalidArgumentError
from .grammar import mask_logits
from .model import Gemma3
from .options import MAX_LOGPROBS
from .packages import Kernels, Packages, cache_dir, step_args
from .sampling import Penalties, SamplerState, apply_penalties, greedy, logprobs, sample

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
    span: int,  # global slots attended (see KVCache.span); a constant of the graph
    allowed: torch.Tensor | None = None,  # [B, ceil(vocab / 32)] int32 grammar bitmask (grammar.py); None: no grammar
):
    """Feed one token per row and choose the next. No host sync: this is the compiled graph."""
    logits = model(tokens[:, None], cache, n_new=active.long(), span=span)[:, -1]
    next_tokens = choose(logits, sampler, penalties, cache.lengths, kind, allowed)
    next_tokens = torch.where(active, next_tokens, tokens)
    finished = (next_tokens[:, None] == eos_ids).any(-1) | (cache.lengths >= cache.max_seq_len - 1)
    chosen = logprobs(logits, next_tokens, MAX_LOGPROBS) if with_logprobs else None
    return next_tokens, active & ~finished, chosen


def prefill_chunk(model: Gemma3, cache: KVCache, ids: torch.Tensor, n_new: torch.Tensor, span: int, embeds=None, image_spans=None) -> torch.Tensor:
    """Append a chunk [B, T] (row b: n_new[b] real tokens, then padding); logits [B, vocab] of each row's last."""
    return model(ids, cache, n_new=n_new, last_only=True, span=span, embeds=embeds, image_spans=image_spans)[:, 0]


def chunk_cuts(lengths: list[int], width: int, spans: list[list]) -> list[list[tuple[int, int]]]:
    """Each prefill chunk's [start, end) of every row's tokens: at most `width` tokens, and never
    ending inside one of the row's image `spans` (which are no longer than `width`)."""
    cursors, plan = [0] * len(lengths), []
    while any(c < n for c, n in zip(cursors, lengths)):
        cuts = []
        for row, (start, n) in enumerate(zip(cursors, lengths)):
            end = min(start + width, n)
            for span in spans[row]:
                if span.start < end < span.end:
                    end = span.start
            if end == start < n:
                raise ValueError(f"an image of {spans[row][0].length} tokens does not fit in {width}-token prefill chunks")
            cuts.append((start, end))
        plan.append(cuts)
        cursors = [end for _, end in cuts]
    return plan


def verify_chunk(model: Gemma3, cache: KVCache, ids: torch.Tensor, n_new: torch.Tensor, span: int) -> torch.Tensor:
    """Append a chunk [B, T] (a last token and drafts); logits [B, T, vocab] at every position."""
    return model(ids, cache, n_new=n_new, span=span)


def prefill_bucket(length: int, width: int) -> int:
    """The padded length of a compiled prefill chunk: a power of two from 16, or the full width."""
    bucket = 16
    while bucket < length:
        bucket *= 2
    return min(bucket, width)


def choose(logits, sampler: SamplerState | None, penalties: Penalties, positions, kind: str, allowed=None) -> torch.Tensor:
    """The next token of each row [B]: penalties first, then the grammar's mask, then greedy or sampling."""
    scores = apply_penalties(logits, penalties)
    if allowed is not None:
        scores = mask_logits(scores, allowed)
    return greedy(scores) if sampler is None else sample(scores, sampler, positions, kind)


def describe_graph(key: tuple, shape: tuple) -> str:
    """What a compiled graph is, for people: "the decode step (topk, batch 4, 256 keys)",
    "prefill (batch 1, 16-token chunks, 256 keys)"."""
    if key[0] == "prefill":
        return f"prefill (batch {shape[0]}, {shape[1]}-token chunks, {key[1]} keys)"
    if key[0] == "verify":
        return f"speculative verification (batch {shape[0]}, {shape[1]} tokens, {key[1]} keys)"
    _, kind, with_logprobs, span, *masked = key
    extras = (", logprobs" if with_logprobs else "") + (", grammar mask" if masked else "")
    return f"the decode step ({kind}{extras}, batch {shape[0]}, {span} keys)"


def fresh_function(fn):
    """A copy of `fn` with its own code object.

    Dynamo keeps compiled graphs per code object and caps how many one may hold. Each runner
    compiles its own copy of decode_step, so runners never crowd out each other's graphs.
    """
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__doc__, copy.__qualname__ = fn.__doc__, fn.__qualname__
    return copy


class Runner:
    """Runs a model on KV caches: prefill and the compiled decode step; loop.generate joins them."""

    def __init__(
        self,
        model: Gemma3,
        *,
        device: torch.device,
        dtype: torch.dtype,
        compile: bool | str,
        max_seq_len: int,
        rewind_margin: int = 0,
    ):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.max_seq_len = max_seq_len
        self.rewind_margin = rewind_margin
        self.compiled = compile is True  # torch.compile, in this process
        model.setup_rope(max_seq_len)
        # compile="cached": prefill and decode from the machine's compile cache (packages.py).
        self.packages = Packages(self, cache_dir(), recipe=None) if compile == "cached" else None
        # One function per mode (decode with a kind of sampling, logprobs or not; prefill), each
        # compiled on first use: a mode's graphs then differ only by shape (batch, chunk bucket).
        self._graphs: dict[tuple, tuple] = {}
        # Model calls on this runner's caches take turns: threads interleave step by step, each
        # on a cache of its own (see checkout), so none can see another's tokens.
        self.lock = threading.Lock()
        self._pool_lock = threading.Lock()
        self._idle: list[KVCache] = []  # caches no call is using, newest last
        # Told `on_compile(what, None)` before a call compiles a new graph, then `(what, seconds)`.
        self.on_compile: Callable[[str, float | None], None] | None = None
        self._shapes_run: set[tuple] = set()  # (mode key, shape) of every compiled call so far

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

    def _call(self, key: tuple, shape: torch.Size, fn, *args):
        """Call the compiled `key` function on inputs of `shape` (what its graphs are specialized on);
        the first call of a new shape compiles, and on_compile hears of it."""
        if not self.compiled or (key, shape) in self._shapes_run:
            return fn(*args)
        what = describe_graph(key, shape)
        if self.on_compile:
            self.on_compile(what, None)
        started = time.perf_counter()
        out = fn(*args)
        self._shapes_run.add((key, shape))
        if self.on_compile:
            self.on_compile(what, time.perf_counter() - started)
        return out

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

    def compiled_shapes(self, mode: str = "decode") -> list[tuple[tuple, tuple]]:
        """(key, input shape) of every graph the decode step (or "prefill") was called with so far."""
        return sorted((key, tuple(shape)) for key, shape in self._shapes_run if key[0] == mode)

    def kernels(self, batch_size: int, kind: str, with_logprobs: bool, masked: bool, width: int = 0) -> "Kernels | None":
        """The packaged prefill, decode step (and `width`-token verification) of a call of this shape, when
        the compile cache holds them all; None: the call runs eagerly (and the missing ones are wanted)."""
        return None if self.packages is None else self.packages.kernels(batch_size, kind, with_logprobs, masked, width)

    def kernels_name(self, batch_size: int, kind: str, with_logprobs: bool, masked: bool, packable: bool, width: int = 0) -> str:
        """Which kernels a call of this shape runs: "packaged" when `kernels` has them (and the call
        is `packable`: it has no images), else this runner's own."""
        if packable and self.kernels(batch_size, kind, with_logprobs, masked, width) is not None:
            return "packaged"
        return self.kernel_name

    @property
    def kernel_name(self) -> str:
        return "compiled" if self.compiled else "eager"

    def new_cache(self, batch_size: int, device: torch.device | str | None = None) -> KVCache:
        return KVCache(
            self.config, batch_size, self.max_seq_len, rewind_margin=self.rewind_margin, device=device or self.device,
            dtype=self.dtype, static=self.compiled,
        )  # fmt: skip

    def prefill_width(self, cache: KVCache) -> int:
        """The most tokens a prefill chunk takes: the cache's bound, and no longer than the window either
        (a ring could take more, but every chunk length is a compiled graph, and small-window models
        would compile many for nothing)."""
        return min(PREFILL_CHUNK, cache.longest_chunk, cache.window)

    def chunk_lengths(self, batch_size: int) -> tuple[int, int]:
        """The shortest and longest compiled prefill chunk (see prefill_bucket)."""
        width = self.prefill_width(self.new_cache(batch_size, device="meta"))
        return prefill_bucket(1, width), width

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
    def prefill(
        self, cache: KVCache, chunks: Sequence[Sequence[int]], images: Sequence[Sequence] | None = None, kernels: "Kernels | None" = None
    ) -> torch.Tensor:
        """Append each row's tokens to the cache; return float32 logits [B, vocab] of each row's last token.

        `images`: for each row, the (span, features) of the images among its tokens (see
        vision.ImageSpan; features [span.length, hidden] in the model's dtype). A chunk never cuts
        through an image: one image's tokens attend to each other, so they are fed together.
        `kernels` (see `kernels`): run the packaged prefill; images then take the eager one.
        """
        lengths = [len(c) for c in chunks]
        cache.check_room(lengths)
        for row, chunk in enumerate(chunks):
            if cache.tokens[row] is not None:
                cache.tokens[row] = cache.tokens[row] + list(chunk)
        held = cache.lengths.tolist()
        images = images or [()] * len(chunks)
        width = self.prefill_width(cache)
        kernels = None if any(images) else kernels  # an image chunk takes the eager prefill
        compiled = self.compiled or kernels is not None
        cache.kernels = kernels.name if kernels else self.kernel_name
        # Compiled chunks are padded to a few fixed lengths, so prompts of any length share graphs.
        padded = max(lengths) if not compiled else width * (-(-max(lengths) // width))
        ids = torch.zeros(len(chunks), padded + width, dtype=torch.long)
        for row, chunk in enumerate(chunks):
            ids[row, : len(chunk)] = torch.as_tensor(chunk, dtype=torch.long)
        ids = ids.to(self.device)
        last = torch.zeros(len(chunks), self.config.vocab_size, device=self.device)
        for cuts in chunk_cuts(lengths, width, [[span for span, _ in row] for row in images]):
            size = max(end - start for start, end in cuts)
            if compiled:
                size = prefill_bucket(size, width)
                if self.device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()
            starts = torch.tensor([start for start, _ in cuts], device=self.device)
            n_new = torch.tensor([end - start for start, end in cuts], device=self.device)
            cache.high = max(h + end for h, (_, end) in zip(held, cuts))
            key = ("prefill", cache.span(cache.high))
            # A fresh tensor: a view's strides would make a new graph per prompt length.
            offsets = torch.arange(size, device=self.device)
            chunk = torch.where(offsets < n_new[:, None], ids.gather(1, starts[:, None] + offsets), 0)
            seen = [[(span, f) for span, f in row if start <= span.start < end] for row, (start, end) in zip(images, cuts)]
            extra = () if not any(seen) else self._image_inputs(chunk, seen, cuts, held)
            if kernels is not None:
                logits = kernels.prefill(cache, (chunk, n_new), key[1])
            else:
                chunk_fn = self._compiled(key, prefill_chunk)
                logits = self._call(key, chunk.shape, chunk_fn, self.model, cache, chunk, n_new, key[1], *extra)
            ends_here = torch.tensor([end == n and end > start for (start, end), n in zip(cuts, lengths)], device=self.device)
            last = torch.where(ends_here[:, None], logits.float(), last)
        return last

    def _image_inputs(self, chunk: torch.Tensor, images, cuts, held) -> tuple[torch.Tensor, tuple]:
        """The chunk's embeddings with its images' features in place, and each query's image span."""
        embeds = self.model.embed(chunk)
        first = torch.zeros(chunk.shape, dtype=torch.long)
        after = torch.zeros(chunk.shape, dtype=torch.long)
        for row, ((start, _), row_images) in enumerate(zip(cuts, images)):
            for span, features in row_images:
                at = span.start - start
                embeds[row, at : at + span.length] = features.to(embeds.dtype)
                first[row, at : at + span.length] = held[row] + span.start
                after[row, at : at + span.length] = held[row] + span.end
        return embeds, (first.to(self.device), after.to(self.device))

    def step(self, cache: KVCache, tokens, active, sampler, penalties, eos_ids, kind: str, with_logprobs: bool, allowed=None, kernels=None):
        """One decode step, compiled when the runner is; the outputs are the caller's to keep.

        The step only reads the penalty counts: the caller adds the new tokens (count_tokens).
        A graph that wrote into a tensor that is not a static buffer could not be a CUDA graph.
        `allowed` (a grammar bitmask, see grammar.py) selects the graph that masks; its contents
        never recompile it. `kernels` (see `kernels`): run the packaged step.
        """
        if kernels is not None:
            cache.high = min(cache.high + 1, cache.max_seq_len)
            cache.kernels = kernels.name
            return kernels.decode(cache, step_args(tokens, active, sampler, penalties, eos_ids, allowed), cache.span(cache.high))
        if self.device.type == "cuda" and self.compiled:
            torch.compiler.cudagraph_mark_step_begin()
        cache.high = min(cache.high + 1, cache.max_seq_len)
        span = cache.span(cache.high)
        key = ("decode", kind, with_logprobs, span) + (("masked",) if allowed is not None else ())
        step = self._compiled(key, decode_step)
        args = (self.model, cache, tokens, active, sampler, penalties, eos_ids, kind, with_logprobs, span, allowed)
        tokens, active, chosen = self._call(key, tokens.shape, step, *args)
        # Graph outputs are overwritten by the next replay: keep copies.
        return tokens.clone(), active.clone(), None if chosen is None else tuple(t.clone() for t in chosen)

    @torch.no_grad()
    def verify(self, cache: KVCache, ids: torch.Tensor, n_new: torch.Tensor, width: int, kernels=None) -> torch.Tensor:
        """Feed a chunk [B, T] (row b: n_new[b] real tokens) in one forward; logits [B, T, vocab].

        Compiled or packaged (`kernels`), chunks are padded to `width` (1 + the call's most draft
        tokens): one graph per batch size, width and span. See speculative.py.
        """
        length = ids.shape[1]
        padded = self.compiled or kernels is not None
        if max(length, width if padded else 0) > cache.longest_chunk:
            raise InvalidArgumentError(
                f"{length - 1} draft tokens do not fit in one verification chunk of this cache "
                f"(at most {cache.longest_chunk - 1}); ask for fewer draft tokens"
            )
        if padded:
            ids = torch.cat([ids, ids.new_zeros(ids.shape[0], width - length)], 1)
        cache.high = min(cache.high + length, cache.max_seq_len)
        key = ("verify", cache.span(cache.high))
        if kernels is not None:
            cache.kernels = kernels.name
            return kernels.verify(cache, (ids, n_new), key[1])[:, :length]
        if self.device.type == "cuda" and self.compiled:
            torch.compiler.cudagraph_mark_step_begin()
        fn = self._compiled(key, verify_chunk)
        logits = self._call(key, ids.shape, fn, self.model, cache, ids, n_new, key[1])
        return logits[:, :length].clone()

    def eos_tensor(self, eos_ids: Sequence[int]) -> torch.Tensor:
        padded = torch.full((EOS_SLOTS,), -1, dtype=torch.long)
        padded[: len(eos_ids)] = torch.tensor(list(eos_ids)[:EOS_SLOTS], dtype=torch.long)
        return padded.to(self.device)

