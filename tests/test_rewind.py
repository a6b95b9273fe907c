"""Caches that step back, sessions that end at a stop string, and prompt reuse across calls."""

import pytest
import torch

import gemmalite
from gemmalite.errors import InvalidArgumentError

from conftest import MARGIN

W = 8  # the tiny model's sliding window


def ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 400, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def fresh(tiny):
    """An engine that never reuses: every call prefills from scratch."""
    return gemmalite.load(tiny[0], dtype="float32", max_seq_len=1024, rewind_margin=MARGIN, reuse_prompts=False)


@pytest.mark.parametrize("which", ["eager", "compiled"])
@pytest.mark.parametrize("drop", [1, MARGIN])
@pytest.mark.parametrize("fed_since", [True, False], ids=["drop-new-tokens", "drop-into-history"])
def test_rewind_inside_the_margin_equals_never_having_fed(tiny_engine, compiled_engine, which, drop, fed_since):
    engine = tiny_engine if which == "eager" else compiled_engine
    runner = engine.runner
    history, after = [2] + ids(60, seed=1), ids(5, seed=2)  # 61 tokens: many wraps of an 11-slot ring
    cache = runner.new_cache(1)
    runner.prefill(cache, [history])
    if fed_since:
        for token in ids(drop, seed=3):  # one-token chunks are written in place, as decode steps are
            runner.prefill(cache, [[token]])
    cache.rewind(drop)
    kept = history if fed_since else history[:-drop]
    got = runner.prefill(cache, [after])
    expected = engine.logits(torch.tensor([kept + after]))[:, -1]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert int(cache.lengths[0]) == len(kept) + len(after) and cache.tokens[0] == kept + after


def test_rewinding_too_far_or_an_empty_cache_is_refused_and_changes_nothing(tiny_engine):
    runner = tiny_engine.runner
    cache = runner.new_cache(1)
    with pytest.raises(InvalidArgumentError, match="empty"):
        cache.rewind(1)
    runner.prefill(cache, [[2] + ids(30, seed=5)])
    cache.rewind(2)
    with pytest.raises(InvalidArgumentError, match="at most 1"):
        cache.rewind(MARGIN)  # counted from the furthest the row has reached: 2 + 3 > 3
    assert int(cache.lengths[0]) == 29
    assert cache.tokens[0] == ([2] + ids(30, seed=5))[:29]


@pytest.mark.parametrize("which", ["eager", "compiled"])
def test_a_session_ends_exactly_where_its_text_stops(tiny_engine, compiled_engine, fresh, which):
    engine = tiny_engine if which == "eager" else compiled_engine
    session = engine.session(chat=False)
    full = fresh.generate("Once upon a time", max_new_tokens=30, ignore_eos=True)
    stop = full[10:13]
    reply = session.send("Once upon a time", max_new_tokens=30, ignore_eos=True, stop=stop)
    assert reply == full[: full.index(stop)]
    assert engine.decode(session.tokens) == "Once upon a time" + reply
    assert int(session.cache.lengths[0]) <= len(session.tokens)
    nxt = session.send_ids(ids(3, seed=6), max_new_tokens=12, ignore_eos=True)
    transcript = session.tokens[: -len(nxt)]
    assert nxt == fresh.generate_ids([transcript], max_new_tokens=12, ignore_eos=True)[0]


@pytest.mark.parametrize("which", ["eager", "compiled"])
@pytest.mark.parametrize("reply_tokens", [2, 40], ids=["inside-margin", "re-prefilled"])
def test_undo_removes_the_last_exchange(tiny_engine, compiled_engine, fresh, reply_tokens, which):
    engine = tiny_engine if which == "eager" else compiled_engine
    session = engine.session(chat=False)
    session.send_ids([2] + ids(10, seed=7), max_new_tokens=6, ignore_eos=True)
    before = session.tokens
    session.send_ids([9], max_new_tokens=reply_tokens - 1, ignore_eos=True)  # one turn token + the reply
    session.undo()
    assert session.tokens == before
    reply = session.send_ids(ids(4, seed=8), max_new_tokens=10, ignore_eos=True)
    assert reply == fresh.generate_ids([before + ids(4, seed=8)], max_new_tokens=10, ignore_eos=True)[0]
    session.undo()
    session.undo()
    assert session.tokens == []
    with pytest.raises(InvalidArgumentError, match="no exchange"):
        session.undo()


@pytest.mark.parametrize("which", ["eager", "compiled"])
def test_extended_prompts_reuse_the_cache_and_give_what_a_fresh_engine_gives(tiny_engine, compiled_engine, fresh, which):
    engine = tiny_engine if which == "eager" else compiled_engine
    prompt = [2] + ids(25, seed=9)
    first = engine.complete(prompt, max_new_tokens=15, ignore_eos=True)
    longer = prompt + first.token_ids + ids(4, seed=10)
    second = engine.complete(longer, max_new_tokens=15, ignore_eos=True)
    assert second.usage.cached_tokens == len(prompt) + 14  # the last reply token was never fed
    assert engine.last_stats.cached_tokens == [len(prompt) + 14]
    assert second.token_ids == fresh.generate_ids([longer], max_new_tokens=15, ignore_eos=True)[0]
    kw = dict(max_new_tokens=15, ignore_eos=True, temperature=0.9, top_k=20, seed=3)
    third = longer + second.token_ids + ids(2, seed=11)
    sampled = engine.complete(third, **kw)
    assert sampled.usage.cached_tokens == len(longer) + 14
    assert sampled.token_ids == fresh.generate_ids([third], **kw)[0]


def test_a_re_tokenized_reply_is_reused_up_to_the_first_difference(tiny_engine, fresh):
    """A chat client re-sends the reply as text; its last tokens may tokenize differently."""
    prompt = [2] + ids(20, seed=12)
    reply = tiny_engine.generate_ids([prompt], max_new_tokens=12, ignore_eos=True)[0]
    respelled = reply[:-3] + [reply[-3] % 300 + 7, 5]  # the same text, other tokens at the end
    nxt = prompt + respelled + ids(6, seed=13)
    done = tiny_engine.complete(nxt, max_new_tokens=10, ignore_eos=True)
    assert done.usage.cached_tokens == len(prompt) + len(reply) - 3
    assert done.token_ids == fresh.generate_ids([nxt], max_new_tokens=10, ignore_eos=True)[0]


def test_a_divergence_beyond_the_margin_prefills_from_scratch(tiny_engine, fresh):
    prompt = [2] + ids(30, seed=14)
    tiny_engine.generate_ids([prompt], max_new_tokens=10, ignore_eos=True)
    other = prompt[:10] + ids(25, seed=15)
    done = tiny_engine.complete(other, max_new_tokens=10, ignore_eos=True)
    assert done.usage.cached_tokens == 0
    assert done.token_ids == fresh.generate_ids([other], max_new_tokens=10, ignore_eos=True)[0]


def test_an_interrupted_call_leaves_nothing_wrong_to_reuse(tiny_engine, fresh):
    prompt = "The quick brown fox"
    pieces = tiny_engine.stream(prompt, max_new_tokens=40, ignore_eos=True)
    next(pieces), next(pieces)
    pieces.close()  # tokens may have been fed that nobody saw
    done = tiny_engine.complete(prompt + " jumps", max_new_tokens=12, ignore_eos=True)
    assert done.text == fresh.generate(prompt + " jumps", max_new_tokens=12, ignore_eos=True)
