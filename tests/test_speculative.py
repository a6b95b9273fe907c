"""Speculative decoding gives plain decoding's tokens, whatever drafts: lookup, a draft model, a prediction.

Every test compares against the same engine decoding plainly (speculative="off"), in float32,
on the tiny checkpoint whose rings (window 8, margin 3) wrap every few tokens.
"""

from __future__ import annotations

import pytest
import torch

import gemmalite
from gemmalite import Engine, InvalidArgumentError, ModelLoadError

from gemmalite import speculative
from gemmalite.speculative import Pace

from conftest import MARGIN, make_checkpoint

REPEATING = [2, 10, 20, 30, 40, 50, 10, 20, 30, 40, 50, 10, 20, 30]
OTHER = [2, 7, 99, 123, 7, 99, 5, 6]
SAMPLED = dict(temperature=0.9, top_k=40, top_p=0.9, seed=7)
PENALIZED = dict(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3)


def engine_like(engine: Engine, **kwargs) -> Engine:
    """Another engine on the same model (its own runner and caches), e.g. with other eos ids or a draft."""
    return Engine(
        engine.model, engine.tokenizer, device=engine.device, dtype=engine.dtype, compile=engine.compiled,
        max_seq_len=engine.max_seq_len, rewind_margin=MARGIN, **kwargs,
    )


class AlwaysDraft:
    """Pace's stand-in for the tests of round structure: every round drafts, however it is timed.
    (Pace only decides whether a round drafts; these tests prove the tokens do not depend on it.)"""

    def allows(self):
        return True

    def record(self, *args):
        pass


@pytest.fixture(autouse=True)
def rounds_always_draft(monkeypatch):
    monkeypatch.setattr(speculative, "Pace", AlwaysDraft)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are too small to split: on a busy machine, more threads only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory):
    """A second tiny checkpoint: other random weights (seed 1), the same tokenizer and vocabulary."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny_draft"), seed=1)[0]


@pytest.fixture(scope="module")
def drafted(tiny, other_tiny):
    """The tiny model with the second tiny checkpoint loaded as its draft model."""
    return gemmalite.load(tiny[0], dtype="float32", compile=False, max_seq_len=1024, rewind_margin=MARGIN, draft=other_tiny)


@pytest.fixture(scope="module")
def self_drafted(tiny_engine):
    """The tiny model drafting for itself: every draft is accepted, so runs are as long as k allows."""
    return engine_like(tiny_engine, draft=engine_like(tiny_engine))


def plain_and_speculative(engine, prompts, **options):
    plain_options = {k: v for k, v in options.items() if k not in ("speculative", "prediction")}
    plain = engine.complete(prompts, speculative="off", **plain_options)
    spec = engine.complete(prompts, **options)
    return plain, spec, engine.last_stats


@pytest.mark.parametrize("sampling", [{}, SAMPLED, {**SAMPLED, "top_k": 0, **PENALIZED}], ids=["greedy", "topk_topp", "topp_penalties"])
@pytest.mark.parametrize("source", ["lookup", "draft", "prediction"])
def test_tokens_equal_plain_decoding(drafted, source, sampling):
    prompts = [REPEATING, OTHER]
    options = dict(max_new_tokens=24, ignore_eos=True, **sampling)
    if source == "prediction":  # right at first, then off: the draft model's own greedy reply
        options["prediction"] = drafted.draft.complete(REPEATING, max_new_tokens=24, ignore_eos=True).token_ids
    else:
        options["speculative"] = source
    plain, spec, stats = plain_and_speculative(drafted, prompts, **options)
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
    if source != "lookup" or not sampling.get("presence_penalty"):  # penalties leave nothing to look up
        assert sum(stats.draft_tokens) > 0  # it did speculate


def test_greedy_equals_transformers_with_lookup(tiny, tiny_engine):
    from conftest import reference_greedy

    out = tiny_engine.generate_ids([REPEATING], max_new_tokens=30, ignore_eos=True, speculative="lookup")[0]
    assert tiny_engine.last_stats.accepted_tokens[0] > 0
    assert out == reference_greedy(tiny[1], REPEATING, 30)


def test_rows_of_a_batch_accept_different_counts(self_drafted):
    # A one-token prompt gives lookup nothing to find at first; the repeating one matches at once.
    prompts = [REPEATING, [2], OTHER]
    alone = [self_drafted.complete(p, speculative="off", max_new_tokens=30, ignore_eos=True).token_ids for p in prompts]
    batched = self_drafted.complete(prompts, speculative="lookup", max_new_tokens=30, ignore_eos=True)
    assert [c.token_ids for c in batched] == alone
    accepted = self_drafted.last_stats.accepted_tokens
    assert len(set(accepted)) > 1, accepted


@pytest.mark.parametrize("limit", [1, 3, 6, 7])
def test_max_new_tokens_landing_inside_an_accepted_run(self_drafted, limit):
    # The self-draft is always accepted: each forward yields 4 tokens, so most limits cut a run.
    plain, spec, stats = plain_and_speculative(self_drafted, [REPEATING], max_new_tokens=limit, ignore_eos=True, **SAMPLED)
    assert spec[0].token_ids == plain[0].token_ids and len(spec[0].token_ids) == limit
    assert spec[0].finish_reason == plain[0].finish_reason == "length"


def test_eos_inside_an_accepted_run(self_drafted, tiny_engine):
    plain = self_drafted.complete(REPEATING, speculative="off", max_new_tokens=30, ignore_eos=True).token_ids
    # With k = 3 always accepted, rounds emit tokens 1-4, 5-8, ...: tokens 2, 3, 6 and 7 are accepted drafts.
    at = next(i for i in (6, 7, 2, 3) if plain[i] not in plain[:i])
    target = engine_like(tiny_engine, eos_ids=(plain[at],), draft=engine_like(tiny_engine))
    spec = target.complete(REPEATING, speculative="draft", max_new_tokens=30)
    assert spec.token_ids == plain[: at + 1] and spec.finish_reason == "stop"
    assert target.last_stats.accepted_tokens[0] == at - (at - 1) // 4  # every token but the round's last


def test_logprobs_equal_plain(drafted):
    plain, spec, stats = plain_and_speculative(drafted, [REPEATING, OTHER], max_new_tokens=24, ignore_eos=True,
                                               logprobs=3, speculative="lookup")
    assert sum(stats.accepted_tokens) > 0
    for p, s in zip(plain, spec):
        assert s.token_ids == p.token_ids
        assert s.logprobs == pytest.approx(p.logprobs, abs=1e-4)
        assert [[i for i, _ in top] for top in s.top_logprobs] == [[i for i, _ in top] for top in p.top_logprobs]
        assert len(s.logprobs) == len(s.token_ids)


def test_stop_strings_end_where_plain_decoding_ends(drafted):
    text = "def add(a, b):\n    return a + b\ndef add(a, b):\n"
    full = drafted.complete(text, speculative="off", max_new_tokens=30, ignore_eos=True)
    stop = full.text[8:11]
    assert stop and stop in full.text
    plain, spec, _ = plain_and_speculative(drafted, text, max_new_tokens=30, ignore_eos=True, stop=stop, speculative="lookup")
    assert (spec.text, spec.finish_reason) == (plain.text, plain.finish_reason) == (full.text[: full.text.index(stop)], "stop")
    streamed = "".join(drafted.stream(text, max_new_tokens=30, ignore_eos=True, stop=stop, speculative="lookup"))
    assert streamed == plain.text


def test_a_wrong_prediction_still_gives_plain_tokens(drafted):
    plain = drafted.complete(REPEATING, speculative="off", max_new_tokens=30, ignore_eos=True, **SAMPLED)
    # Right for the first tokens, then every third token wrong: drafts are accepted and rejected.
    wrong = [t if i % 3 else (t + 1) % 400 for i, t in enumerate(plain.token_ids)]
    spec = drafted.complete(REPEATING, prediction=wrong, max_new_tokens=30, ignore_eos=True, **SAMPLED)
    assert spec.token_ids == plain.token_ids
    usage = spec.usage
    assert usage.accepted_prediction_tokens + usage.rejected_prediction_tokens == len(wrong)
    assert 0 < usage.rejected_prediction_tokens < len(wrong)


def test_an_exact_prediction_is_accepted_and_reported(drafted):
    plain = drafted.complete(REPEATING, speculative="off", max_new_tokens=30, ignore_eos=True)
    spec = drafted.complete(REPEATING, prediction=plain.token_ids, max_new_tokens=30, ignore_eos=True)
    assert spec.token_ids == plain.token_ids
    # Every predicted token appears in the reply.
    assert (spec.usage.accepted_prediction_tokens, spec.usage.rejected_prediction_tokens) == (30, 0)
    assert plain.usage.accepted_prediction_tokens is None  # reported only with a prediction
    last = list(drafted.complete_stream(REPEATING, prediction=plain.token_ids, max_new_tokens=30, ignore_eos=True))[-1]
    assert last.usage.accepted_prediction_tokens == 30
    text = "def add(a, b):\n    return a + b\n"
    done = drafted.complete(text, prediction=text, max_new_tokens=8, ignore_eos=True)
    assert done.token_ids == drafted.complete(text, speculative="off", max_new_tokens=8, ignore_eos=True).token_ids
    assert done.usage.accepted_prediction_tokens is not None


def test_session_over_several_turns_matches_plain(drafted):
    turns = [[10, 20, 30, 40, 10, 20], [30, 40, 50]]
    replies = {}
    for mode in ("off", "lookup", "draft"):
        session = drafted.session(chat=False)
        session.send_ids([2], max_new_tokens=4)  # a first turn, so later ones start from a live cache
        replies[mode] = [session.send_ids(t, max_new_tokens=12, ignore_eos=True, speculative=mode) for t in turns]
    assert replies["lookup"] == replies["off"] and replies["draft"] == replies["off"]


def test_bad_input_is_refused(tiny_engine, tiny, tmp_path):
    with pytest.raises(InvalidArgumentError, match="rewind margin"):
        tiny_engine.generate_ids([REPEATING], speculative="lookup", num_draft_tokens=MARGIN + 1)
    with pytest.raises(InvalidArgumentError, match="needs a draft model"):
        tiny_engine.generate_ids([REPEATING], speculative="draft")
    with pytest.raises(InvalidArgumentError, match="speculative must be"):
        tiny_engine.generate_ids([REPEATING], speculative="ngram")
    with pytest.raises(InvalidArgumentError, match="num_draft_tokens"):
        tiny_engine.generate_ids([REPEATING], speculative="lookup", num_draft_tokens=-1)
    with pytest.raises(InvalidArgumentError, match="prediction"):
        tiny_engine.complete("abc", prediction="abc", speculative="off")
    other_vocab = make_checkpoint(tmp_path / "other_vocab", seed=2, vocab_size=512, tokenizer=False)[0]
    with pytest.raises(ModelLoadError, match="vocabulary"):
        gemmalite.load(tiny[0], dtype="float32", max_seq_len=1024, draft=other_vocab)


@pytest.mark.slow
def test_compiled_verification_matches_eager_with_bounded_graphs(compiled_engine, tiny_engine):
    # Greedy at batch 1: the decode and prefill graphs are those the rest of the suite compiles.
    compiled = compiled_engine.generate_ids([REPEATING], max_new_tokens=16, ignore_eos=True, speculative="lookup")
    assert sum(compiled_engine.last_stats.accepted_tokens) > 0
    assert compiled == tiny_engine.generate_ids([REPEATING], max_new_tokens=16, ignore_eos=True, speculative="off")
    shapes = compiled_engine.runner.compiled_shapes("verify")
    assert {shape for _, shape in shapes} == {(1, 1 + MARGIN)}  # one width for every round: k + 1
    assert compiled_engine.runner.graph_count("verify") == len(shapes)


def test_server_reports_prediction_usage_and_refuses_a_bad_prediction(tiny_engine):
    from gemmalite.completion import CompletionChunk, Usage
    from gemmalite.options import GenerationOptions
    from gemmalite.serve.answers import Answer
    from gemmalite.serve.protocol import APIError, parse_completion

    predicted = tiny_engine.tokenizer.encode("return a + b", bos=False)
    body = {"prompt": "def add(a, b):\n    ", "max_tokens": 8, "prediction": {"type": "content", "content": "return a + b"}}
    job = parse_completion(body, tiny_engine, GenerationOptions())
    assert job.options.prediction == "return a + b"
    reply = predicted[:2] + [5, 6]  # the first two predicted tokens, then two others
    last = CompletionChunk("", [], finish_reason="length", usage=Usage(5, len(reply)))
    usage = Answer(job, "tiny", tiny_engine.tokenizer).whole([CompletionChunk("x", reply), last])["usage"]
    assert usage["completion_tokens_details"] == {"accepted_prediction_tokens": 2, "rejected_prediction_tokens": len(predicted) - 2}
    parts = {**body, "prediction": {"type": "content", "content": [{"type": "text", "text": "return a + b"}]}}
    assert parse_completion(parts, tiny_engine, GenerationOptions()).options.prediction == "return a + b"
    with pytest.raises(APIError) as refused:
        parse_completion({**body, "prediction": "return a + b"}, tiny_engine, GenerationOptions())
    assert refused.value.status == 400 and refused.value.param == "prediction"


def test_pace_pauses_drafting_while_rounds_are_slower_than_plain_steps():
    from gemmalite.speculative import MAX_PAUSE

    pace = Pace()
    assert pace.allows()
    pace.record(True, 0.30, 9)  # a round: 9 tokens in 0.30 s
    assert not pace.allows() and pace.allows()  # one plain step is timed next, to compare with
    pace.record(False, 0.045, 1)
    pace.record(True, 0.30, 9)  # 33 ms a token against 45: it pays, drafting goes on
    assert pace.allows()
    pauses = []
    for _ in range(7):  # rounds at 100 ms a token: each loss pauses for longer, up to MAX_PAUSE
        pace.record(True, 0.5, 5)
        pauses.append(pace.pause)
        while not pace.allows():
            pace.record(False, 0.045, 1)
    assert pauses == [2, 4, 8, 16, 32, MAX_PAUSE, MAX_PAUSE]
    pace.record(True, 0.1, 5)  # 20 ms a token: a probe that pays ends the pauses
    assert pace.losses == 0 and pace.allows()


def slow_pace(log: list):
    """A Pace that sees drafting rounds as 100x slower than they were, and logs which rounds drafted."""

    class SlowDrafting(Pace):
        def record(self, speculative, seconds, tokens):
            log.append(speculative)
            super().record(speculative, seconds * (100 if speculative else 1), tokens)

    return SlowDrafting


def assert_growing_pauses(log: list) -> None:
    """Drafting came back after each pause, the pauses grew, and most rounds did not draft."""
    drafting = "".join("d" if r else "." for r in log)
    gaps = [len(run) for run in drafting.strip(".").split("d") if run]
    assert drafting.count("d") >= 3 and gaps == sorted(gaps) and drafting.count("d") < len(drafting) // 3, drafting


def test_a_paced_call_still_gives_plain_decodings_tokens(drafted, monkeypatch):
    """With the real Pace, and drafting rounds made to look 100x slower, drafting pauses and
    resumes mid-call: the tokens are still plain decoding's."""
    rounds = []
    monkeypatch.setattr(speculative, "Pace", slow_pace(rounds))
    plain, spec, stats = plain_and_speculative(drafted, [REPEATING], max_new_tokens=60, ignore_eos=True, speculative="lookup")
    assert spec[0].token_ids == plain[0].token_ids
    assert_growing_pauses(rounds)
