"""Continuous batching: many requests decoded together, each in one row of one cache.

A `Scheduler` owns `parallel` slots, the rows of one KV cache, and runs one loop in a thread of
its own. Each turn of the loop:

1. admit: waiting requests take free slots, first come first served;
2. prefill: new prompts, oldest first (all of them when no one is decoding, else at most
   PREFILL_BUDGET tokens, so the others wait one chunk at most);
3. decode: one step for the rows in flight, sized to them (see placement.py), or one
   verification of their drafts when requests speculate (see batch_drafts.py);
4. hand each request its new tokens, and free the slots that finished or were cancelled.

Prompt reuse. A slot keeps its cache when its request ends. A new request takes the free slot
whose transcript shares the longest prefix with its prompt, as llama-server does, steps that row
back to the shared part and prefills only the rest. A slot is taken for its prefix only when that
prefix is at least half of what it holds, so a short shared start (a system prompt) does not evict
another conversation; otherwise the least recently used slot is taken. Stepping back works within the
cache's rewind margin (see cache.py), so a conversation re-sent as a whole message list prefills
only its new turn even where the reply, re-tokenized from text, differs from the generated tokens
near its end. Only identical tokens are ever shared: a request sees another's cache only where
its own prompt holds the same tokens at the same positions.

Each request gets the tokens it would get alone: its noise key is seed_key(seed, 0), as for the
first prompt of a call, and the noise depends on the position, never on the row; its penalties
count its own prompt and reply; its first token comes from a one-row prefill, as in a call of its
own. Stop tokens are checked here on the host, per request, so chat and plain requests (which
stop at different ids) can share a batch.

The scheduler knows nothing of HTTP: `submit` takes a Request with a callback, which receives
CompletionChunks (the last one has finish_reason and usage) or one exception.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Sequence

import torch

from .batch_drafts import BatchDrafts, DraftCounts, RowSpeculation
from .completion import RowResult
from .errors import ContextLengthError, GemmaliteError, InvalidArgumentError, QueueFullError
from .grammar import Guide
from .options import GenerationOptions
from .placement import Placement, batch_sizes, compared_prompt, leading_views
from .sampling import (
    GREEDY,
    SamplerState,
    SamplingSettings,
    count_tokens,
    penalties,
    sampler_state,
    sampling_kind,
    seed_key,
    set_penalties,
)
from .slots import Request, Slot
from .speculative import Pace


class Scheduler(Placement, BatchDrafts):
    """The slots, the waiting line, and the loop that prefills and decodes them (see the module doc)."""

    def __init__(self, engine, *, parallel: int = 4, max_queue: int = 64, defaults: SamplingSettings | None = None):
        for name, value, least in (("parallel", parallel, 1), ("max_queue", max_queue, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InvalidArgumentError(f"{name} must be an integer >= {least}, got {value!r}")
        self.engine = engine
        self.runner = engine.runner
        self.defaults = engine.defaults if defaults is None else defaults
        self.max_queue = max_queue
        self.cache = self.runner.new_cache(parallel)
        self.staging = self.runner.new_cache(1)
        self.slots = [Slot(row) for row in range(parallel)]
        neutral = [SamplingSettings()] * parallel
        device = self.runner.device
        self.sampler = sampler_state(neutral, parallel, device, keys=[0] * parallel)
        self.penalties = penalties(neutral, [[]] * parallel, engine.config.vocab_size, device)
        self.eos = self.runner.eos_tensor(())  # the step's own eos test is unused: stops are per request
        # The first n rows of the cache, the sampler and the penalties, for a step of batch size n:
        # views, made once, so that a compiled step sees the same tensors every time.
        self.sizes = batch_sizes(parallel)
        self._leading = {
            n: (self.cache.leading_rows(n), leading_views(self.sampler, n), leading_views(self.penalties, n)) for n in self.sizes
        }
        self.decode_steps: Counter[int] = Counter()  # steps run, by batch size (the server's metrics read it)
        self.draft_counts = DraftCounts()  # speculative rounds (batch_drafts.py)
        self.pace = Pace()  # whether verifying pays, timed (batch_drafts.py)
        self.drafters: dict = {}  # batch size -> the draft model's ModelDrafter (batch_drafts.py)
        self.guide = Guide(parallel, engine.grammars.words, device)  # per-request json_schema/regex/grammar
        self._waiting: deque[Request] = deque()
        self._filling: Slot | None = None  # the slot whose prompt is in the staging cache
        self._clock = itertools.count(1)
        self._cond = threading.Condition()
        self._closed = False
        self._draining = False
        self._thread: threading.Thread | None = None

    @property
    def parallel(self) -> int:
        return len(self.slots)

    # ------------------------------------------------------------------ the public side
    def start(self) -> None:
        """Run the loop in a background thread until close()."""
        self._thread = threading.Thread(target=self._loop, name="gemmalite-scheduler", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the loop; requests still waiting or in flight end at once, with finish_reason "abort"."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
            ended = [(s.request, s.result) for s in self.slots if s.request is not None]
            for slot in self.slots:
                slot.release()
            for drafter in self.drafters.values():
                drafter.close()  # the draft model's caches go back to its runner
            self.drafters.clear()
        for request in waiting:
            ended.append((request, RowResult.for_prompt(request.prompt, None, False)))
        for request, result in ended:
            self._send(request, result.last_chunk("abort"))

    def drain(self, timeout: float, interrupt: threading.Event | None = None) -> None:
        """Refuse new requests, give those accepted up to `timeout` seconds (or until `interrupt`) to
        finish, then close: the rest end with finish_reason "abort"."""
        with self._cond:
            self._draining = True
        deadline = time.monotonic() + timeout
        while self._has_work() and time.monotonic() < deadline and not (interrupt and interrupt.is_set()):
            time.sleep(0.02)
        self.close()

    def submit(self, request: Request) -> None:
        """Queue a request; QueueFullError when every slot is busy and the waiting line is full."""
        with self._cond:
            if self._closed or self._draining:
                raise GemmaliteError("the server is shutting down")
            free = sum(s.request is None for s in self.slots)
            if len(self._waiting) >= free + self.max_queue:
                raise QueueFullError(
                    f"all {self.parallel} slots are busy and {len(self._waiting)} requests are waiting; try again later"
                )
            self._waiting.append(request)
            self._cond.notify_all()

    def cancel(self, request: Request) -> None:
        """Drop a request (a client that went away): its slot is freed at the next turn of the loop."""
        request.cancelled = True
        with self._cond:
            self._cond.notify_all()

    def status(self) -> dict:
        return {
            "slots": self.parallel,
            "busy": sum(s.request is not None for s in self.slots),
            "queued": len(self._waiting),
        }

    def warm_up(self, settings: Sequence[SamplingSettings] = (SamplingSettings(),)) -> None:
        """Compile the prefill and the decode step at every batch size for these sampling settings (before start())."""
        bos = self.engine.config.bos_token_id
        for s in settings:
            sampling = dict(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p)
            options = GenerationOptions(max_new_tokens=2, ignore_eos=True, **sampling)
            for n in self.sizes:  # n requests at once: prefilled together, then one step of batch size n
                self._waiting.extend(Request([bos], options, deliver=lambda _: None, reuse=False) for _ in range(n))
                while self._has_work():
                    self.step()
        self.cache.reset()
        self.decode_steps.clear()

    def cache_usage(self) -> float:
        """The part of the cache's token capacity that requests in flight hold, in [0, 1]."""
        held = sum(int(self.cache.lengths[s.row]) for s in self.slots if s.request is not None)
        return held / (self.parallel * self.engine.max_seq_len)

    # ------------------------------------------------------------------ the loop
    def _has_work(self) -> bool:
        return bool(self._waiting) or any(s.request is not None for s in self.slots)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._has_work():
                    self._cond.wait()
                if self._closed:
                    return
            try:
                self.step()
            except Exception as error:  # a bug: fail what is in flight, and go on serving
                self._filling = None
                self._fail([s for s in self.slots if s.request is not None], error)

    def step(self) -> None:
        """One turn: admit, prefill one piece, decode one step. The loop's thread calls it (tests may too)."""
        with self._cond:
            self._drop_cancelled()
            self._admit()
        self._prefill()
        self._decode()

    def _drop_cancelled(self) -> None:
        self._waiting = deque(r for r in self._waiting if not r.cancelled)
        for slot in self.slots:
            if slot.request is not None and slot.request.cancelled:
                if slot is self._filling:  # keep what was prefilled: a retry may reuse it
                    self.cache.copy_row(slot.row, self.staging, 0)
                    self._filling = None
                self._release(slot)

    def _admit(self) -> None:
        while self._waiting:
            free = [s for s in self.slots if s.request is None]
            if not free:
                return
            request = self._waiting.popleft()
            try:
                self._take(request, free)
            except Exception as error:  # a request's own error never stops the others
                self._report(error)
                self._send(request, error)

    def _take(self, request: Request, free: list[Slot]) -> None:
        engine, prompt, options = self.engine, request.prompt, request.options
        if not prompt or len(prompt) >= engine.max_seq_len:
            raise ContextLengthError(f"a prompt must have 1 to {engine.max_seq_len - 1} tokens, got {len(prompt)}")
        settings = options.sampling(self.defaults)
        result = RowResult.for_prompt(prompt, lambda: engine.text_stream(options, request.chat), options.logprobs is not None)
        budget = min(options.new_tokens, engine.max_seq_len - len(prompt))
        if budget == 0:
            self._send(request, result.last_chunk("length"))
            return
        grammar = engine.row_grammars(options, 1, request.chat)  # compiled (or refused) before the slot is touched
        speculation = RowSpeculation.of(engine, options)
        slot = self._choose_slot(request, free)
        self.guide.set(slot.row, grammar[0] if grammar else None)
        if request.reuse:
            keep = self.cache.reuse(slot.row, compared_prompt(request))  # steps back to the shared part, or empties the row
        else:
            keep = 0
            self.cache.reset(slot.row)
        self._set_row(slot.row, settings, prompt)
        result.cached_tokens = keep
        stop_ids = frozenset(engine.stop_ids(options.ignore_eos, request.chat))
        slot.start(request, settings, budget, stop_ids, result, keep, next(self._clock))
        slot.speculation = speculation

    def _choose_slot(self, request: Request, free: list[Slot]) -> Slot:
        """The free slot with the longest usable prefix, when it is most of what that slot holds (so
        little is evicted); else the least recently used (an empty one first).
        """
        scored = [(s, self._reusable(s, request)) for s in free]
        matching = [(s, keep) for s, keep in scored if keep and 2 * keep >= int(self.cache.lengths[s.row])]
        if matching:
            return max(matching, key=lambda pair: pair[1])[0]
        return min(free, key=lambda s: s.last_used)

    def _reusable(self, slot: Slot, request: Request) -> int:
        """How many of the prompt's tokens this slot's cache can serve (as KVCache.reuse would keep)."""
        if not request.reuse:
            return 0
        keep = min(self.cache.shared_prefix(slot.row, compared_prompt(request)), len(request.prompt) - 1)
        return keep if int(self.cache.lengths[slot.row]) - keep <= self.cache.rewindable(slot.row) else 0

    def _set_row(self, row: int, settings: SamplingSettings, prompt: list[int]) -> None:
        """The row's sampling and penalty tensors for a new request (the step reads them in place)."""
        s, p = self.sampler, self.penalties
        s.temperature[row] = settings.temperature
        s.top_k[row] = min(settings.top_k, self.engine.config.vocab_size)
        s.top_p[row] = settings.top_p
        s.min_p[row] = settings.min_p
        s.keys[row] = seed_key(settings.seed, 0)
        set_penalties(p, row, settings, prompt)

    def _decode(self) -> None:
        """One decode step for every row in flight, at the smallest batch size that holds them."""
        rows = [s for s in self.slots if s.decoding]
        if not rows:
            return
        try:
            size = self._pack(rows)
            cache, sampler_rows, penalties = self._leading[size]
            active = torch.zeros(size, dtype=torch.bool)
            tokens = torch.zeros(size, dtype=torch.long)
            for s in rows:
                active[s.row], tokens[s.row] = True, s.last
            device = self.runner.device
            active, tokens = active.to(device), tokens.to(device)
            kind = sampling_kind([s.settings for s in rows])
            sampler: SamplerState | None = None if kind == GREEDY else sampler_rows
            with_logprobs = any(s.top is not None for s in rows)
            cache.high = self.cache.high
            guided = any(s.row in self.guide.rows for s in rows)
            started = time.perf_counter()
            drafts = self._drafts(rows, size, sampler, kind)  # (drafts, grammar masks), or None
            with torch.no_grad(), self.runner.lock:
                if drafts is not None:  # a verification forward (batch_drafts.py)
                    emitted, chosen = self._verify(rows, cache, tokens, active, *drafts, sampler, penalties, kind, with_logprobs)
                else:
                    allowed = self.guide.allowed()[:size] if guided else None
                    step = self.runner.step(cache, tokens, active, sampler, penalties, self.eos, kind, with_logprobs, allowed)
                    tokens, _, chosen = step
                    count_tokens(penalties, tokens, active)
            if drafts is None:
                self.cache.high = cache.high
                self.decode_steps[size] += 1
                emitted = [[t] for t in tokens.tolist()]  # the one host sync of a step
                if chosen is not None:  # per row, its one token's [logprob, top values, top ids]
                    chosen = [t.tolist() for t in chosen]
                    chosen = [[[c[row] for c in chosen]] for row in range(size)]
        except Exception as error:
            self._fail(rows, error)
            return
        self._timed(rows, drafts is not None, time.perf_counter() - started, sum(len(emitted[s.row]) for s in rows))
        for s in rows:
            self._emit_run(s, emitted[s.row], None if chosen is None else chosen[s.row])

    def _emit(self, slot: Slot, token: int, chosen) -> None:
        """Hand a request its new token; end it at a stop token, a stop string, a complete value
        (json_schema, regex, grammar) or its budget."""
        request = slot.request
        grammar = self.guide.rows.get(slot.row)
        complete = grammar is not None and grammar.accept(token)
        slot.produced += 1
        slot.last = token
        logprob = top = None
        if slot.top is not None:
            chosen_logprob, values, ids = chosen
            logprob, top = [chosen_logprob], [list(zip(ids[: slot.top], values[: slot.top]))]
        chunk = slot.result.add([token], logprob, top)
        if chunk.text or chunk.token_ids:
            self._send(request, chunk)
        reason = None
        if token in slot.stop_ids or slot.result.stopped or complete:
            reason = "stop"
        elif slot.produced >= slot.budget:
            reason = "length"
        if reason is not None:  # the slot is free before the request hears it is done (status, metrics)
            last = slot.result.last_chunk(reason)
            self._release(slot)
            self._send(request, last)

    def _release(self, slot: Slot) -> None:
        self.guide.set(slot.row, None)
        slot.release()
        slot.last_used = next(self._clock)

    def _fail(self, slots: list[Slot], error: BaseException) -> None:
        """The model call of these rows failed: their caches are unknown now, so start them over."""
        self._report(error)
        for slot in slots:
            self.cache.reset(slot.row)
            if slot.request is not None:
                self._send(slot.request, error)
            self._release(slot)

    def _send(self, request: Request, item) -> None:
        try:
            request.deliver(item)
        except Exception:  # the receiver is gone (e.g. its event loop closed): stop working for it
            request.cancelled = True

    @staticmethod
    def _report(error: BaseException) -> None:
        if not isinstance(error, GemmaliteError):  # a bug, not a bad request: say where
            traceback.print_exception(error, file=sys.stderr)
