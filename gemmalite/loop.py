"""The token loop: from prompts to blocks of new tokens, and what each row holds afterwards.

`generate` drives a Runner (runner.py): prefill, then one decode step after another, syncing with
the host only every `sync_every` steps. It keeps the books a caller needs: which rows are still
going and why each stopped (`Rows`), the call's figures (`Stats`), and, once the loop ends in
any way, which tokens each cache row really holds (`settle`), so that a later call can reuse them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .cache import KVCache
from .grammar import Guide, RowGrammar
from .options import MAX_LOGPROBS
from .runner import Runner, choose
from .sampling import GREEDY, SamplingSettings, count_tokens, logprobs, penalties, sampler_state, sampling_kind


@dataclass
class Stats:
    """Figures from the last generation call."""

    prompt_tokens: list[int] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)  # "stop" (eos or stop string) or "length"
    cached_tokens: list[int] = field(default_factory=list)  # prompt tokens reused from an earlier call
    prefill_s: float = 0.0  # time to first token
    decode_s: float = 0.0
    # Speculative decoding (speculative.py): tokens drafted, and drafted tokens the target kept.
    draft_tokens: list[int] = field(default_factory=list)
    accepted_tokens: list[int] = field(default_factory=list)
    prediction: tuple[int, ...] | None = None  # with prediction=: its token ids

    @property
    def acceptance_rate(self) -> float | None:
        """Drafted tokens kept over tokens drafted (None when nothing was drafted)."""
        drafted = sum(self.draft_tokens)
        return sum(self.accepted_tokens) / drafted if drafted else None

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
        self.ends: list[int | None] = [None] * len(limits)  # a grammar's value completes at this token

    def end_at(self, row: int, produced: int) -> None:
        """The row stops ("stop") once it has produced `produced` tokens: its grammar's value is complete."""
        self.ends[row] = produced

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
            if token in self.eos_ids or self.produced[row] == self.ends[row]:
                self.reasons[row] = "stop"
            elif self.produced[row] >= self.limits[row]:
                self.reasons[row] = "length"
        return taken


class Block(list):
    """What the loop yields: each row's new tokens, and their log-probabilities when asked for.

    `logprobs[row]` is a list of floats; `top[row]` a list, per token, of (id, logprob) pairs.
    """

    def __init__(self, tokens, logprobs=None, top=None):
        super().__init__(tokens)
        self.logprobs, self.top = logprobs, top


class Steps:
    """One call's blocks, iterated as they come, with the call's own Stats beside them."""

    def __init__(self, blocks: Iterator[Block], stats: Stats):
        self.blocks, self.stats = blocks, stats

    def __iter__(self) -> Iterator[Block]:
        return self.blocks

    def close(self) -> None:
        self.blocks.close()


def generate(
    runner: Runner,
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
    speculation=None,
    images: list[list] | None = None,
    grammars: Sequence[RowGrammar | None] = (),
) -> Iterator[Block]:
    """Yield, every `sync_every` steps, a Block of the tokens each row produced since the last.

    The prompts are appended to what the cache holds; `histories` (default: the prompts) are
    the tokens the repetition penalty counts as prompt. Rows stop at an eos id, at
    max_new_tokens, or when their transcript reaches max_seq_len. `top_logprobs` (None: off)
    asks for each token's log-probability and the top N alternatives. `speculation` (a
    speculative.Speculation) decodes after prefill instead of the plain steps, to the same tokens.
    `images`: each row's images among its prompt tokens (see Runner.prefill). `grammars` (per
    row, None for none) constrain the rows' tokens; a row ends when its value is complete (grammar.py).
    """
    held = cache.lengths.tolist()
    batch = len(prompts)
    rows = Rows([min(max_new_tokens, runner.max_seq_len - h - len(p)) for h, p in zip(held, prompts)], eos_ids, stats)
    if max_new_tokens == 0:
        rows.reasons[:] = ["length"] * batch
        yield Block([[] for _ in prompts], *_no_logprobs(batch, top_logprobs))
        return
    eos_tensor = runner.eos_tensor(eos_ids)
    kind = sampling_kind([settings])
    sampler = None if kind == GREEDY else sampler_state(settings, batch, runner.device)
    penalty = penalties([settings] * batch, histories or prompts, runner.config.vocab_size, runner.device)
    with_logprobs = top_logprobs is not None
    out = _Collector(rows, top_logprobs)
    guide = None
    if any(g is not None for g in grammars):
        guide = Guide(batch, next(g for g in grammars if g is not None).words, runner.device)
        for row, grammar in enumerate(grammars):
            guide.set(row, grammar)
    produced = 0  # tokens each row has produced so far (one per step)
    # What each row will hold once its tokens are fed: what it held, its prompt, its reply.
    transcripts = [None if t is None else t + p for t, p in zip(cache.tokens, prompts)]
    width = 0 if speculation is None else speculation.plan.width  # a speculative call also needs its verification
    kernels = runner.kernels(batch, kind, with_logprobs, guide is not None, width) if images is None else None
    prompts = _same_kernels(runner, cache, prompts, transcripts, kernels, stats)
    prefilled = False
    try:
        started = time.perf_counter()
        with torch.no_grad(), runner.lock:
            logits = runner.prefill(cache, prompts, images, kernels)
            prefilled = True
            tokens = choose(logits, sampler, penalty, cache.lengths, kind, guide.allowed() if guide else None)
            count_tokens(penalty, tokens, torch.ones_like(tokens, dtype=torch.bool))
            active = (tokens[:, None] != eos_tensor).all(-1) & (cache.lengths < runner.max_seq_len - 1)
            out.add(tokens, logprobs(logits, tokens, MAX_LOGPROBS) if with_logprobs else None)
            produced = 1
            _end_complete(guide, tokens, active, rows, produced)
        first = out.block(transcripts)
        stats.prefill_s = time.perf_counter() - started  # the time to first token
        decode_started = time.perf_counter()
        yield first
        if speculation is not None:
            state = (runner, cache, tokens, active, sampler, penalty, eos_tensor, kind, top_logprobs)
            for block in speculation.decode(*state, rows, transcripts, stats, Block, kernels, guide):
                yield block
                stats.decode_s = time.perf_counter() - decode_started
            return
        while not rows.done:
            # The lock and no_grad cover the step only, never a yield: the caller's code between
            # blocks runs in its own grad mode, and other callers' steps may run meanwhile.
            with torch.no_grad(), runner.lock:
                fed = active
                allowed = guide.allowed() if guide else None
                tokens, active, chosen = runner.step(cache, tokens, active, sampler, penalty, eos_tensor, kind, with_logprobs, allowed, kernels)
                count_tokens(penalty, tokens, fed)
            out.add(tokens, chosen)
            produced += 1
            ended = _end_complete(guide, tokens, active, rows, produced)
            if out.pending >= sync_every or out.pending + max(rows.produced) >= max(rows.limits) or ended:
                yield out.block(transcripts)
                stats.decode_s = time.perf_counter() - decode_started
    finally:
        settle(cache, transcripts if prefilled else [None] * batch)


def _same_kernels(runner: Runner, cache: KVCache, prompts, transcripts, kernels, stats: Stats) -> list[list[int]]:
    """The prompts to feed: when other kernels wrote what the cache holds (an eager call before
    its packages were built, say), the rows are emptied and fed their whole transcripts, so that
    a reply never depends on which kernels ran the calls before it."""
    mine = kernels.name if kernels is not None else runner.kernel_name
    if cache.kernels in (None, mine) or cache.high == 0 or any(t is None for t in transcripts):
        return prompts
    cache.reset()
    stats.cached_tokens = [0] * len(prompts)
    return [list(t) for t in transcripts]


def _end_complete(guide: Guide | None, tokens: torch.Tensor, active: torch.Tensor, rows: Rows, produced: int) -> bool:
    """Follow the grammar rows' new tokens (a host sync of those rows only); stop the rows whose
    value is now complete: frozen from the next step on, and finished at this token. Any ended?"""
    ended = guide.accept(tokens) if guide is not None else []
    for row in ended:
        rows.end_at(row, produced)
    if ended:
        active[ended] = False
    return bool(ended)


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
