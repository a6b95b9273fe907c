"""The continuous-batching scheduler alone, without HTTP: each request gets what it gets alone.

Most tests drive `Scheduler.step()` from the test's own thread, so the interleaving of joins,
prefills and decode steps is exact; one runs the background thread as the server does.
"""

from __future__ import annotations

import queue

import pytest

from gemmalite.batching import Scheduler
from gemmalite.errors import QueueFullError
from gemmalite.slots import Request
from gemmalite.options import GenerationOptions

PROMPTS = [[2, 5, 6, 7], [2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51], [2, 9], [2, 77, 78, 79, 80, 81, 82]]


class Outcome:
    """A request's deliveries: chunks, or an error."""

    def __init__(self):
        self.chunks, self.error = [], None

    def __call__(self, item):
        if isinstance(item, BaseException):
            self.error = item
        else:
            self.chunks.append(item)

    @property
    def done(self) -> bool:
        return self.error is not None or bool(self.chunks and self.chunks[-1].finish_reason)

    @property
    def tokens(self) -> list[int]:
        return [t for c in self.chunks for t in c.token_ids]

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.chunks)

    @property
    def last(self):
        return self.chunks[-1]


def submit(scheduler, prompt, chat=False, reuse=True, **options) -> Outcome:
    outcome = Outcome()
    scheduler.submit(Request(list(prompt), GenerationOptions(**options), outcome, chat=chat, reuse=reuse))
    return outcome


def run(scheduler, *outcomes, steps=10_000) -> None:
    for _ in range(steps):
        if all(o.done for o in outcomes):
            return
        scheduler.step()
    raise AssertionError("the requests did not finish")


@pytest.fixture
def scheduler(tiny_engine):
    return Scheduler(tiny_engine, parallel=3, max_queue=8)


def test_requests_joining_mid_flight_get_what_they_get_alone(tiny_engine, scheduler):
    n = [12, 5, 20, 9]
    alone = [tiny_engine.generate_ids([p], max_new_tokens=k, ignore_eos=True)[0] for p, k in zip(PROMPTS, n)]
    first = submit(scheduler, PROMPTS[0], max_new_tokens=n[0], ignore_eos=True)
    for _ in range(3):  # the first request is decoding when the others arrive
        scheduler.step()
    assert len(first.tokens) == 4  # the first turn prefills and decodes one step
    rest = [submit(scheduler, p, max_new_tokens=k, ignore_eos=True) for p, k in zip(PROMPTS[1:], n[1:])]
    scheduler.step()
    assert scheduler.status() == {"slots": 3, "busy": 3, "queued": 1}  # four requests, three slots
    run(scheduler, first, *rest)
    assert [o.tokens for o in (first, *rest)] == alone
    assert [o.last.finish_reason for o in (first, *rest)] == ["length"] * 4
    assert scheduler.status()["busy"] == 0


def test_rows_stop_independently_at_eos_and_free_their_slot(tiny_engine, scheduler):
    alone = [tiny_engine.generate_ids([p], max_new_tokens=40)[0] for p in PROMPTS[:3]]
    outcomes = [submit(scheduler, p, max_new_tokens=40) for p in PROMPTS[:3]]
    run(scheduler, *outcomes)
    assert [o.tokens for o in outcomes] == alone
    for o, tokens in zip(outcomes, alone):
        assert o.last.finish_reason == ("stop" if tokens[-1] in tiny_engine.eos_ids else "length")


SAMPLED = [
    dict(temperature=0.9, seed=1),
    dict(temperature=1.2, top_k=20, seed=2, presence_penalty=0.5),
    dict(temperature=0.7, top_p=0.8, min_p=0.05, seed=3, repetition_penalty=1.3),
    dict(temperature=0, frequency_penalty=0.7),
]


def test_seeded_sampling_and_penalties_are_the_same_batched_and_alone(tiny_engine):
    scheduler = Scheduler(tiny_engine, parallel=4)
    alone = [tiny_engine.generate_ids([p], max_new_tokens=15, ignore_eos=True, **o)[0] for p, o in zip(PROMPTS, SAMPLED)]
    outcomes = [submit(scheduler, p, max_new_tokens=15, ignore_eos=True, **o) for p, o in zip(PROMPTS, SAMPLED)]
    run(scheduler, *outcomes)
    assert [o.tokens for o in outcomes] == alone


def test_text_stop_strings_and_logprobs_equal_complete(tiny_engine, scheduler):
    text = "The quick brown"
    expected = tiny_engine.complete(text, chat=True, max_new_tokens=24, logprobs=3)
    stop = expected.text[5:8]
    assert stop
    cut = tiny_engine.complete(text, chat=True, max_new_tokens=24, stop=stop)
    prompt = tiny_engine.encode(text, chat=True)
    with_logprobs = submit(scheduler, prompt, chat=True, max_new_tokens=24, logprobs=3)
    stopped = submit(scheduler, prompt, chat=True, max_new_tokens=24, stop=stop)
    run(scheduler, with_logprobs, stopped)
    assert with_logprobs.text == expected.text and with_logprobs.tokens == expected.token_ids
    got = [lp for c in with_logprobs.chunks for lp in c.logprobs]
    assert got == pytest.approx(expected.logprobs, abs=1e-5)
    top = [t for c in with_logprobs.chunks for t in c.top_logprobs]
    assert [[i for i, _ in t] for t in top] == [[i for i, _ in t] for t in expected.top_logprobs]
    assert stopped.text == cut.text and stopped.last.finish_reason == "stop"


def test_a_finished_slot_serves_a_longer_prompt_from_its_cache(tiny_engine, scheduler):
    first = submit(scheduler, PROMPTS[1], max_new_tokens=6, ignore_eos=True)
    run(scheduler, first)
    assert first.last.usage.cached_tokens == 0
    # The reply's last token was never fed; the next prompt carries it and goes on.
    longer = PROMPTS[1] + first.tokens + [60, 61, 62]
    second = submit(scheduler, longer, max_new_tokens=8, ignore_eos=True)
    run(scheduler, second)
    assert second.last.usage.cached_tokens == len(PROMPTS[1]) + len(first.tokens) - 1
    assert second.last.usage.prompt_tokens == len(longer)
    assert second.tokens == tiny_engine.generate_ids([longer], max_new_tokens=8, ignore_eos=True)[0]


def test_the_slot_with_the_longest_shared_prefix_is_chosen(tiny_engine, scheduler):
    runs = [submit(scheduler, p, max_new_tokens=3, ignore_eos=True) for p in PROMPTS[:3]]
    run(scheduler, *runs)
    follow = PROMPTS[1] + runs[1].tokens[:2] + [90, 91]
    again = submit(scheduler, follow, max_new_tokens=5, ignore_eos=True)
    run(scheduler, again)
    assert again.last.usage.cached_tokens == len(PROMPTS[1]) + 2  # not the 1 token (<bos>) the others share
    assert again.tokens == tiny_engine.generate_ids([follow], max_new_tokens=5, ignore_eos=True)[0]


def test_a_short_shared_start_takes_a_free_slot_and_keeps_the_conversation(tiny_engine, scheduler):
    talk = submit(scheduler, PROMPTS[1], max_new_tokens=6, ignore_eos=True)
    run(scheduler, talk)
    other = submit(scheduler, PROMPTS[1][:3] + [90, 91, 92, 93], max_new_tokens=4, ignore_eos=True)
    run(scheduler, other)
    assert other.last.usage.cached_tokens == 0  # 3 shared tokens are too few to evict 18: an empty slot
    follow = PROMPTS[1] + talk.tokens + [60]
    again = submit(scheduler, follow, max_new_tokens=4, ignore_eos=True)
    run(scheduler, again)
    assert again.last.usage.cached_tokens == len(follow) - 2


def test_a_divergence_is_reused_within_the_rewind_margin_only(tiny_engine, scheduler):
    # tiny_engine's caches can step back 3 tokens (conftest.MARGIN); its rings have long wrapped.
    base = submit(scheduler, PROMPTS[1], max_new_tokens=10, ignore_eos=True)
    run(scheduler, base)
    held = PROMPTS[1] + base.tokens[:-1]  # what the slot's cache holds: 22 tokens
    near = held[:-2] + [99, 98]  # differs in the last two
    far = held[:-6] + [99, 98]  # differs six back: more than the margin
    outcomes = []
    for prompt in (near, far):
        outcome = submit(scheduler, prompt, max_new_tokens=6, ignore_eos=True)
        run(scheduler, outcome)
        outcomes.append(outcome)
        # Put the same transcript back for the next case.
        restore = submit(scheduler, PROMPTS[1], max_new_tokens=10, ignore_eos=True, reuse=False)
        run(scheduler, restore)
    assert outcomes[0].last.usage.cached_tokens == len(held) - 2
    assert outcomes[1].last.usage.cached_tokens <= 1  # at most <bos>, from another slot
    for prompt, outcome in zip((near, far), outcomes):
        assert outcome.tokens == tiny_engine.generate_ids([prompt], max_new_tokens=6, ignore_eos=True)[0]


def test_requests_past_the_queue_are_refused(tiny_engine):
    scheduler = Scheduler(tiny_engine, parallel=1, max_queue=1)
    submit(scheduler, PROMPTS[0], max_new_tokens=50)
    submit(scheduler, PROMPTS[1], max_new_tokens=50)  # one slot free, one place in the queue
    with pytest.raises(QueueFullError, match="busy"):
        submit(scheduler, PROMPTS[2], max_new_tokens=50)


def test_a_cancelled_request_frees_its_slot_and_harms_no_other(tiny_engine):
    scheduler = Scheduler(tiny_engine, parallel=2, max_queue=0)
    other_alone = tiny_engine.generate_ids([PROMPTS[0]], max_new_tokens=20, ignore_eos=True)[0]
    gone = Outcome()
    request = Request(PROMPTS[1], GenerationOptions(max_new_tokens=500, ignore_eos=True), gone)
    scheduler.submit(request)
    other = submit(scheduler, PROMPTS[0], max_new_tokens=20, ignore_eos=True)
    for _ in range(4):
        scheduler.step()
    scheduler.cancel(request)
    scheduler.step()
    assert scheduler.status()["busy"] == 1
    produced = len(gone.tokens)
    late = submit(scheduler, PROMPTS[3], max_new_tokens=5, ignore_eos=True)  # takes the freed slot
    run(scheduler, other, late)
    assert len(gone.tokens) == produced and not gone.done
    assert other.tokens == other_alone
    assert late.tokens == tiny_engine.generate_ids([PROMPTS[3]], max_new_tokens=5, ignore_eos=True)[0]


def test_a_receiver_that_fails_only_loses_its_own_request(tiny_engine, scheduler):
    def broken(item):
        raise RuntimeError("the client's event loop is closed")

    scheduler.submit(Request(PROMPTS[1], GenerationOptions(max_new_tokens=30, ignore_eos=True), broken))
    fine = submit(scheduler, PROMPTS[0], max_new_tokens=10, ignore_eos=True)
    run(scheduler, fine)
    scheduler.step()
    assert scheduler.status()["busy"] == 0
    assert fine.tokens == tiny_engine.generate_ids([PROMPTS[0]], max_new_tokens=10, ignore_eos=True)[0]


def test_a_prompt_too_long_fails_alone(tiny_engine, scheduler):
    bad = submit(scheduler, [2] * tiny_engine.max_seq_len, max_new_tokens=3)
    fine = submit(scheduler, PROMPTS[2], max_new_tokens=3)
    run(scheduler, bad, fine)
    assert "1 to 1023 tokens" in str(bad.error)
    assert fine.last.finish_reason


def test_the_background_thread_serves_concurrent_requests(tiny_engine):
    scheduler = Scheduler(tiny_engine, parallel=2)
    scheduler.start()
    try:
        inbox = [queue.Queue() for _ in PROMPTS]
        for prompt, box in zip(PROMPTS, inbox):
            scheduler.submit(Request(prompt, GenerationOptions(max_new_tokens=8, ignore_eos=True), box.put))
        got = []
        for box in inbox:
            tokens = []
            while True:
                chunk = box.get(timeout=60)
                tokens += chunk.token_ids
                if chunk.finish_reason:
                    break
            got.append(tokens)
    finally:
        scheduler.close()
    assert got == [tiny_engine.generate_ids([p], max_new_tokens=8, ignore_eos=True)[0] for p in PROMPTS]
