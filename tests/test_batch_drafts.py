"""Speculative decoding in the scheduler (batch_drafts.py): requests that draft, by prompt lookup,
a prediction or a draft model, get exactly what they get alone decoding plainly, batched with others that do
not, and the cache's books stay exact when a request ends inside an accepted run."""

from __future__ import annotations

import pytest

from gemmalite import batching
from gemmalite.batching import Scheduler

from test_batching import run, submit
from test_speculative import PENALIZED, REPEATING, SAMPLED, AlwaysDraft, assert_growing_pauses, slow_pace

OTHER = [2, 40, 41, 42, 43, 44, 45, 46, 47, 48]


@pytest.fixture(autouse=True)
def steps_always_draft(monkeypatch):
    """The structure tests want every step with a draft to verify, however it is timed."""
    monkeypatch.setattr(batching, "Pace", AlwaysDraft)


@pytest.fixture
def scheduler(tiny_engine):
    return Scheduler(tiny_engine, parallel=4, max_queue=8)


def alone(engine, prompt, **options):
    return engine.generate_ids([prompt], speculative="off", **options)[0]


def books_match(scheduler) -> bool:
    """Every row's token books hold exactly what its cache holds."""
    return all(len(scheduler.cache.tokens[s.row] or []) == int(scheduler.cache.lengths[s.row]) for s in scheduler.slots)


@pytest.mark.parametrize("sampling", [{}, SAMPLED, {**SAMPLED, **PENALIZED}], ids=["greedy", "sampled", "penalized"])
def test_drafting_requests_batched_with_plain_ones_get_what_they_get_alone(tiny_engine, scheduler, sampling):
    n = 24
    spec_options = dict(max_new_tokens=n, ignore_eos=True, speculative="lookup", **sampling)
    plain_options = dict(max_new_tokens=n, ignore_eos=True, **sampling)
    expected = [alone(tiny_engine, REPEATING, **plain_options), alone(tiny_engine, OTHER, **plain_options)]
    prediction = list(expected[1][:10])  # right for its first 10 tokens, then nothing
    outcomes = [
        submit(scheduler, REPEATING, **spec_options),
        submit(scheduler, OTHER, **plain_options),
        submit(scheduler, OTHER, prediction=prediction, **plain_options),
        submit(scheduler, REPEATING, **plain_options),
    ]
    run(scheduler, *outcomes)
    assert [o.tokens for o in outcomes] == [expected[0], expected[1], expected[1], expected[0]]
    assert scheduler.draft_counts.rounds > 0 and scheduler.draft_counts.accepted >= 7  # the prediction: 9 tokens after the first, in runs of k=3 and a choice
    assert books_match(scheduler)


@pytest.mark.parametrize("limit", [5, 6, 7])
def test_a_request_ending_inside_an_accepted_run_ends_where_plain_decoding_does(tiny_engine, scheduler, limit):
    """An exact prediction is accepted in runs of k; the budget lands inside one. The tokens fed
    past the end are stepped back, so a request sent again reuses the cache and gets the same."""
    expected = alone(tiny_engine, OTHER, max_new_tokens=limit, ignore_eos=True)
    prediction = alone(tiny_engine, OTHER, max_new_tokens=20, ignore_eos=True)
    first = submit(scheduler, OTHER, max_new_tokens=limit, ignore_eos=True, prediction=prediction)
    run(scheduler, first)
    assert first.tokens == expected and first.last.finish_reason == "length"
    assert books_match(scheduler)
    again = submit(scheduler, OTHER + expected, max_new_tokens=6, ignore_eos=True, prediction=prediction[limit:])
    run(scheduler, again)
    assert again.tokens == alone(tiny_engine, OTHER + expected, max_new_tokens=6, ignore_eos=True)
    assert again.last.usage.cached_tokens >= len(OTHER)


def test_a_stop_string_inside_an_accepted_run_and_logprobs_equal_complete(tiny_engine, scheduler):
    text = "ab ab ab ab ab ab"
    prompt = tiny_engine.encode(text)
    plain = tiny_engine.complete(text, max_new_tokens=16, ignore_eos=True, logprobs=2, speculative="off")
    stop = tiny_engine.tokenizer.decode(plain.token_ids[4:6])
    stopped_plain = tiny_engine.complete(text, max_new_tokens=16, ignore_eos=True, stop=[stop], speculative="off")
    assert stopped_plain.finish_reason == "stop" and len(stopped_plain.token_ids) < 10  # it ends inside a run
    logged = submit(scheduler, prompt, max_new_tokens=16, ignore_eos=True, logprobs=2, prediction=plain.token_ids)
    stopped = submit(scheduler, prompt, max_new_tokens=16, ignore_eos=True, stop=[stop], prediction=plain.token_ids)
    run(scheduler, logged, stopped)
    assert logged.tokens == plain.token_ids
    assert [lp for c in logged.chunks for lp in c.logprobs] == pytest.approx(plain.logprobs, abs=1e-5)
    top = [t for c in logged.chunks for t in c.top_logprobs]
    assert [[i for i, _ in t] for t in top] == [[i for i, _ in t] for t in plain.top_logprobs]
    assert stopped.text == stopped_plain.text and stopped.last.finish_reason == "stop"
    assert books_match(scheduler)


def test_a_step_with_a_grammar_row_decodes_plainly(tiny_engine, scheduler):
    pytest.importorskip("llguidance")
    n = 12
    guided = submit(scheduler, OTHER, max_new_tokens=n, regex="[ab]+")
    drafting = submit(scheduler, REPEATING, max_new_tokens=n, ignore_eos=True, speculative="lookup")
    run(scheduler, guided, drafting)
    assert drafting.tokens == alone(tiny_engine, REPEATING, max_new_tokens=n, ignore_eos=True)
    assert guided.tokens == tiny_engine.generate_ids([OTHER], max_new_tokens=n, regex="[ab]+")[0]


def test_the_server_speculates_with_lookup_and_predictions_and_counts_it(tiny_engine):
    """A server started with --lookup: replies equal plain decoding, a prediction is accepted and
    reported, a request with a schema decodes plainly instead of being refused, and /metrics counts drafts."""
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from gemmalite.options import GenerationOptions
    from gemmalite.serve.app import create_app

    scheduler = Scheduler(tiny_engine, parallel=2)
    scheduler.start()
    app = create_app(tiny_engine, scheduler, model="tiny", defaults=GenerationOptions(speculative="lookup"), log_format=None)
    text = "ab ab ab ab ab ab"
    plain = tiny_engine.complete(text, max_new_tokens=12, ignore_eos=True, speculative="off")
    try:
        with TestClient(app) as http:
            body = {"prompt": text, "max_tokens": 12, "ignore_eos": True, "temperature": 0}
            looked_up = http.post("/v1/completions", json=body).json()
            predicted = http.post("/v1/completions", json={**body, "prediction": {"type": "content", "content": plain.text}}).json()
            schema = {**body, "response_format": {"type": "json_object"}}
            assert http.post("/v1/completions", json=schema).status_code == 200
            metrics = http.get("/metrics").text
    finally:
        scheduler.close()
    assert looked_up["choices"][0]["text"] == plain.text
    assert predicted["choices"][0]["text"] == plain.text
    details = predicted["usage"]["completion_tokens_details"]  # counted on the prediction's own tokens
    assert details["accepted_prediction_tokens"] > 0
    assert details["accepted_prediction_tokens"] + details["rejected_prediction_tokens"] == len(tiny_engine.tokenizer.encode(plain.text, bos=False))
    accepted = [line for line in metrics.splitlines() if line.startswith("gemmalite:spec_decode_num_accepted_tokens_total")]
    assert accepted and float(accepted[0].split()[-1]) >= 4


def test_the_scheduler_pauses_drafting_while_verifying_is_slower(tiny_engine, monkeypatch):
    """With the real Pace, and verification steps made to look 100x slower, the scheduler drafts
    less and less often; the request still gets plain decoding's tokens."""
    steps = []
    monkeypatch.setattr(batching, "Pace", slow_pace(steps))
    scheduler = Scheduler(tiny_engine, parallel=2)
    outcome = submit(scheduler, REPEATING, max_new_tokens=60, ignore_eos=True, speculative="lookup")
    run(scheduler, outcome)
    assert outcome.tokens == alone(tiny_engine, REPEATING, max_new_tokens=60, ignore_eos=True)
    assert_growing_pauses(steps)


@pytest.fixture(scope="module", params=["itself", "other weights"])
def model_drafted(request, tiny_engine, tmp_path_factory):
    """The tiny model with a draft model: itself (every draft right) or other random weights (few right)."""
    import gemmalite
    from conftest import MARGIN, make_checkpoint
    from test_speculative import engine_like

    if request.param == "itself":
        return engine_like(tiny_engine, draft=engine_like(tiny_engine))
    other = make_checkpoint(tmp_path_factory.mktemp("other_draft"), seed=1)[0]
    return engine_like(tiny_engine, draft=gemmalite.load(other, dtype="float32", compile=False, max_seq_len=1024, rewind_margin=MARGIN))


def test_a_draft_model_drafts_for_batched_requests_and_each_gets_what_it_gets_alone(model_drafted):
    """Rows drafting with the model, greedy, sampled and penalized, beside a plain one; then the
    same slots again with longer prompts (reused prefixes, the draft's cache catching up), and
    steps of several batch sizes as requests end."""
    scheduler = Scheduler(model_drafted, parallel=4, max_queue=8)
    cases = [(REPEATING, {}, 24), (OTHER, SAMPLED, 12), (OTHER, {}, 18), (REPEATING, {**SAMPLED, **PENALIZED}, 30)]
    for extra in ([], [7, 8, 9]):
        outcomes = [
            submit(scheduler, prompt + extra, max_new_tokens=n, ignore_eos=True, speculative="off" if i == 2 else "draft", **options)
            for i, (prompt, options, n) in enumerate(cases)
        ]
        run(scheduler, *outcomes)
        expected = [alone(model_drafted, prompt + extra, max_new_tokens=n, ignore_eos=True, **options) for prompt, options, n in cases]
        assert [o.tokens for o in outcomes] == expected
        assert books_match(scheduler)
    assert scheduler.draft_counts.drafted > 0 and set(scheduler.drafters) >= {4}
    if model_drafted.draft.model is model_drafted.model:  # drafting for itself: its greedy drafts are all right
        assert scheduler.draft_counts.accepted > 0


def test_a_server_started_with_a_draft_model_drafts_with_it_and_replies_as_plain_decoding(tiny, tiny_engine):
    """`gemmalite serve --draft` (an int8 draft with a shortlisted head): replies equal plain
    decoding, greedy and seeded, and /metrics counts the model's drafts."""
    import re

    import httpx

    from conftest import launch_server

    proc, log, started, _ = launch_server(
        tiny[0], "--dtype", "float32", "--draft", str(tiny[0]), "--draft-quantize", "int8", "--draft-shortlist", "96"
    )
    try:
        assert started.wait(120) and proc.poll() is None, "".join(log)
        url = re.search(r"(http://[\d.]+:\d+)/v1", "".join(log)).group(1)
        text = "ab ab ab ab ab ab"
        for sampling in ({"temperature": 0}, {"temperature": 0.9, "top_p": 0.9, "seed": 7}):
            body = {"prompt": text, "max_tokens": 16, "ignore_eos": True, **sampling}
            reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
            plain = tiny_engine.complete(text, max_new_tokens=16, ignore_eos=True, speculative="off", **sampling)
            assert reply["choices"][0]["text"] == plain.text
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
    finally:
        proc.kill()
        proc.wait()
    drafted = [line for line in metrics.splitlines() if line.startswith("gemmalite:spec_decode_num_draft_tokens_total")]
    assert drafted and float(drafted[0].split()[-1]) > 0
