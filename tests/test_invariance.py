"""Reproducible in bfloat16: a token's K/V and logits do not depend on how it was fed.

float32 parity with transformers is proven elsewhere; here the engine is held to itself, bit for
bit, in the default dtype. A token's logits must come out the same whether it was the last of a
prefill chunk of any length, a one-token feed (a decode step), a row of a padded ragged batch,
or fed again after a rewind; a seeded generation must be the same alone, batched, fresh or from
a reused prompt. Eager and compiled are each held to themselves (see the README).
"""

from __future__ import annotations

import random

import pytest
import torch

import gemmalite
from gemmalite.batching import Scheduler

from conftest import MARGIN
from test_batching import run, submit

SAMPLED = dict(temperature=0.9, top_p=0.95, max_new_tokens=24, ignore_eos=True, logprobs=3)


def ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(4, 400, (n - 1,), generator=g).tolist()


@pytest.fixture(scope="module")
def bf16(tiny):
    return gemmalite.load(tiny[0], dtype="bfloat16", compile=False, max_seq_len=1024, rewind_margin=MARGIN)


@pytest.fixture(scope="module")
def bf16_compiled(tiny):
    return gemmalite.load(tiny[0], dtype="bfloat16", compile=True, max_seq_len=1024, rewind_margin=MARGIN)


def feed(engine, cache, tokens: list[int], sizes) -> dict[int, torch.Tensor]:
    """Feed `tokens` in chunks of the given sizes; {position: logits} of each chunk's last token."""
    out, at = {}, int(cache.lengths[0])
    for size in sizes:
        chunk = tokens[:size]
        tokens = tokens[size:]
        if not chunk:
            break
        out[at + len(chunk) - 1] = engine.prefill(cache, [chunk])[0]
        at += len(chunk)
    return out


def one_at_a_time(engine, tokens: list[int]):
    cache = engine.runner.new_cache(1)
    return feed(engine, cache, tokens, [1] * len(tokens)), cache


def held_slots(cache, row: int = 0):
    """Every layer's keys and values of the positions that later tokens of `row` can read
    (a ring's last window and rewind margin)."""
    length = int(cache.lengths[row])
    kept = cache.window + cache.rewind_margin
    out = []
    for sliding, k, v in zip(cache.sliding, cache.keys, cache.values):
        slots = torch.arange(max(0, length - kept), length) % cache.ring if sliding else torch.arange(length)
        out += [k[row, :, slots], v[row, :, slots]]
    return out


def assert_same_bits(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x, y), "not bit for bit equal"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_tokens_logits_and_kv_do_not_depend_on_the_chunk_it_came_in(bf16, seed):
    tokens = ids(60, seed)  # the tiny model's ring is 16 slots: many wraps
    reference, ref_cache = one_at_a_time(bf16, tokens)
    rng = random.Random(seed)
    sizes = [rng.randint(1, 20) for _ in range(60)]  # longer than a chunk too: split by the runner
    cache = bf16.runner.new_cache(1)
    got = feed(bf16, cache, tokens, sizes)
    assert len(got) > 5
    for position, logits in got.items():
        assert torch.equal(logits, reference[position]), f"position {position}"
    assert_same_bits(held_slots(cache), held_slots(ref_cache))


def test_a_ragged_batch_gives_every_row_what_it_gets_alone(bf16):
    prompts = [ids(n, seed) for n, seed in [(23, 5), (7, 6), (41, 7), (1, 8)]]
    cache = bf16.runner.new_cache(len(prompts))
    batched = bf16.prefill(cache, prompts)
    more = [ids(9, 9), ids(3, 10), ids(12, 11), ids(5, 12)]  # a second ragged chunk on top
    batched_more = bf16.prefill(cache, more)
    for row, (prompt, extra) in enumerate(zip(prompts, more)):
        alone = bf16.runner.new_cache(1)
        assert torch.equal(batched[row], bf16.prefill(alone, [prompt])[0]), f"row {row}"
        assert torch.equal(batched_more[row], bf16.prefill(alone, [extra])[0]), f"row {row}, second chunk"
        assert_same_bits(held_slots(cache, row), held_slots(alone))


def test_logits_after_a_rewind_equal_never_having_fed(bf16):
    history, after = ids(50, 3), ids(6, 4)[1:]
    cache = bf16.runner.new_cache(1)
    bf16.prefill(cache, [history + ids(MARGIN, 5)[1:]])
    cache.rewind(MARGIN - 1)
    got = bf16.prefill(cache, [after])[0]
    reference, _ = one_at_a_time(bf16, history + after)
    assert torch.equal(got, reference[len(history) + len(after) - 1])


def test_the_attended_span_of_the_global_buffer_changes_no_bit(bf16):
    tokens = ids(30, 13)
    logits = {}
    for span in (256, 1024):  # a prefix of the 1024-slot global buffers, or all of them
        cache = bf16.runner.new_cache(1)
        step = cache.longest_chunk
        with torch.no_grad():
            chunks = [torch.tensor([tokens[i : i + step]]) for i in range(0, len(tokens), step)]
            logits[span] = torch.cat([bf16.model(chunk, cache, span=span) for chunk in chunks], 1)
    assert torch.equal(logits[256], logits[1024])


def test_reading_a_ring_through_a_prefix_changes_no_bit(tmp_path):
    from conftest import make_checkpoint

    directory, _ = make_checkpoint(tmp_path, sliding_window=300)  # a ring of 556 slots, past the 256-slot span
    engine = gemmalite.load(directory, dtype="bfloat16", compile=False, max_seq_len=2048, rewind_margin=MARGIN)
    tokens = ids(120, 21)
    logits = {}
    for span in (256, 2048):  # the rings' first 256 slots, or all 556 (and the global buffers whole)
        cache = engine.runner.new_cache(1)
        step = cache.longest_chunk
        with torch.no_grad():
            chunks = [torch.tensor([tokens[i : i + step]]) for i in range(0, len(tokens), step)]
            logits[span] = torch.cat([engine.model(chunk, cache, span=span) for chunk in chunks], 1)
            steps = [engine.model(torch.tensor([[t]]), cache, span=span) for t in ids(8, 22)]  # decode steps too
        logits[span] = torch.cat([logits[span], *steps], 1)
    assert torch.equal(logits[256], logits[2048])


def test_spans_are_a_short_ladder_up_to_max_seq_len(bf16):
    cache = bf16.runner.new_cache(1)
    assert cache.spans() == [256, 512, 1024]
    assert [cache.span(n) for n in (1, 256, 257, 1000, 1023)] == [256, 256, 512, 1024, 1024]


@pytest.mark.parametrize("which", ["eager", "compiled"])
def test_a_seeded_reply_is_the_same_fresh_reused_and_batched(bf16, bf16_compiled, which):
    engine = bf16 if which == "eager" else bf16_compiled
    turns = [ids(17, 20), ids(9, 21)[1:], ids(30, 22)[1:]]
    transcript: list[int] = []
    for turn, seed in zip(turns, (1, 2, 3)):
        transcript = transcript + turn
        reused = engine.complete(transcript, seed=seed, **SAMPLED)  # the earlier turns come from the cache
        assert reused.usage.cached_tokens > 0 or transcript == turns[0]
        alone = fresh_call(engine, transcript, seed=seed, **SAMPLED)
        assert reused.token_ids == alone.token_ids and reused.top_logprobs == alone.top_logprobs
        if not engine.compiled:  # batches compile graphs of their own: proven eager, and in float32 compiled
            batch = engine.complete([transcript, ids(11, seed), ids(40, seed + 9)], seed=seed, **SAMPLED)
            assert batch[0].token_ids == alone.token_ids and batch[0].top_logprobs == alone.top_logprobs
            fresh_call(engine, transcript, seed=seed, **SAMPLED)  # the pool's newest cache holds the reply again
        transcript = transcript + reused.token_ids


def fresh_call(engine, prompt, **options):
    """A call that prefills its whole prompt, on the same engine (and graphs)."""
    engine.reuse_prompts = False
    try:
        done = engine.complete(prompt, **options)
    finally:
        engine.reuse_prompts = True
    assert done.usage.cached_tokens == 0
    return done


def test_the_scheduler_gives_a_seeded_request_the_same_reply_twice(bf16):
    scheduler = Scheduler(bf16, parallel=3)
    prompts = [ids(n, seed) for n, seed in [(25, 30), (12, 31), (33, 32), (25, 30)]]
    options = dict(temperature=0.9, top_p=0.95, max_new_tokens=16, ignore_eos=True, logprobs=3)
    alone = [bf16.complete(p, seed=i, **options) for i, p in enumerate(prompts)]
    for _ in range(2):  # the second round finds its prompts in the slots
        outcomes = [submit(scheduler, p, seed=i, **options) for i, p in enumerate(prompts)]
        run(scheduler, *outcomes)
        assert [o.tokens for o in outcomes] == [a.token_ids for a in alone]
        assert [[t for c in o.chunks for t in c.top_logprobs] for o in outcomes] == [a.top_logprobs for a in alone]
