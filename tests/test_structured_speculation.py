"""Structured output under speculative decoding: each draft position is chosen under the grammar's
mask after the drafts before it, so a constrained reply has plain constrained decoding's tokens.

float32, the tiny checkpoint (random weights: the replies' shape is the mask's doing), compared
with the same engine decoding plainly; the replies are checked with the jsonschema library.
"""

from __future__ import annotations

import json

import pytest
import torch

from gemmalite import speculative
from gemmalite.batching import Scheduler
from gemmalite.grammar import Grammars, Guide
from gemmalite.schemas import Constraint

from test_batching import run, submit
from test_speculative import AlwaysDraft, engine_like
from test_structured import PERSON as RECORD, PROMPT, valid  # skips this module without llguidance

SAMPLED = dict(temperature=1.0, top_k=50, top_p=0.9, seed=3)
PENALIZED = dict(temperature=0.9, seed=5, repetition_penalty=1.3, presence_penalty=0.4)


@pytest.fixture(autouse=True)
def rounds_always_draft(monkeypatch):
    monkeypatch.setattr(speculative, "Pace", AlwaysDraft)
    monkeypatch.setattr("gemmalite.batching.Pace", AlwaysDraft)


@pytest.fixture(scope="module")
def self_drafted(tiny_engine):
    """The tiny model drafting for itself, unmasked: its drafts are often refused by the grammar."""
    return engine_like(tiny_engine, draft=engine_like(tiny_engine))


@pytest.mark.parametrize("sampling", [{}, SAMPLED, PENALIZED], ids=["greedy", "topk_topp", "penalties"])
@pytest.mark.parametrize("source", ["exact prediction", "wrong prediction", "lookup", "draft"])
def test_constrained_speculation_gives_plain_constrained_tokens(self_drafted, source, sampling):
    options = dict(json_schema=RECORD, max_new_tokens=300, **sampling)
    plain = self_drafted.complete(PROMPT, speculative="off", **options)
    valid(plain.text, RECORD)
    assert plain.finish_reason == "stop"
    if source == "exact prediction":
        options["prediction"] = plain.token_ids  # every draft right: masks at every position of each chunk
    elif source == "wrong prediction":  # right, then every fourth token wrong (often one the grammar refuses)
        options["prediction"] = [t if i % 4 != 3 else (t + 17) % 300 for i, t in enumerate(plain.token_ids)]
    else:
        options["speculative"] = source
    spec = self_drafted.complete(PROMPT, **options)
    assert (spec.token_ids, spec.finish_reason) == (plain.token_ids, plain.finish_reason)
    stats = self_drafted.last_stats
    if source == "exact prediction":
        assert 0 < sum(stats.accepted_tokens) == sum(stats.draft_tokens)  # every draft right, to the value's end
        assert spec.usage.accepted_prediction_tokens == len(plain.token_ids)
    if source == "wrong prediction":
        assert 0 < sum(stats.accepted_tokens) < sum(stats.draft_tokens)


def test_logprobs_streams_and_ignore_eos_agree_with_plain(self_drafted):
    plain = self_drafted.complete(PROMPT, json_schema=RECORD, max_new_tokens=300, logprobs=3, ignore_eos=True, **SAMPLED)
    spec = self_drafted.complete(PROMPT, json_schema=RECORD, max_new_tokens=300, logprobs=3, ignore_eos=True,
                                 prediction=plain.token_ids, **SAMPLED)  # fmt: skip
    assert spec.token_ids == plain.token_ids
    assert spec.logprobs == pytest.approx(plain.logprobs, abs=1e-5)
    streamed = "".join(c.text for c in self_drafted.complete_stream(
        PROMPT, json_schema=RECORD, max_new_tokens=300, ignore_eos=True, speculative="draft", **SAMPLED))  # fmt: skip
    assert streamed == plain.text


def test_max_new_tokens_inside_an_accepted_run(self_drafted):
    plain = self_drafted.complete(PROMPT, json_schema=RECORD, max_new_tokens=300)
    for limit in (5, 6, 7):
        cut = self_drafted.complete(PROMPT, json_schema=RECORD, max_new_tokens=limit, prediction=plain.token_ids)
        assert (cut.token_ids, cut.finish_reason) == (plain.token_ids[:limit], "length")


def test_a_batch_and_a_session_mix_schemas_under_speculation(self_drafted):
    prompts = [PROMPT, "Once upon a time"]
    plain = self_drafted.complete(prompts, json_schema=RECORD, max_new_tokens=300, speculative="off", **SAMPLED)
    spec = self_drafted.complete(prompts, json_schema=RECORD, max_new_tokens=300, speculative="draft", **SAMPLED)
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
    flags = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    replies = {}
    for mode in ("off", "draft", "lookup"):
        session = self_drafted.session(chat=False)
        replies[mode] = [
            session.send("A record:", json_schema=RECORD, max_new_tokens=300, speculative=mode),
            session.send(" And a flag:", json_schema=flags, max_new_tokens=40, speculative=mode),
            session.send(" Free text:", max_new_tokens=6, ignore_eos=True, speculative=mode),
        ]
    assert replies["draft"] == replies["off"] and replies["lookup"] == replies["off"]
    valid(replies["off"][0], RECORD)


def test_draft_masks_cut_refused_drafts_and_leave_the_matcher_as_it_was(tiny_engine):
    tokenizer = tiny_engine.tokenizer
    grammars = Grammars(tokenizer, tiny_engine.config.vocab_size, eos_id=1)
    row = grammars.compile(Constraint("json_schema", json.dumps(RECORD))).matcher(stop_ids=(1,))
    guide = Guide(2, grammars.words, "cpu")
    guide.set(1, row)
    start = tokenizer.encode('{"name": "Ada", "age": 3', bos=False)
    for token in start[:2]:
        row.accept(token)
    before = guide.allowed().clone()
    good, refused = start[2:], tokenizer.encode("}}}", bos=False)
    drafts = [[5, 6, 7], good + refused]
    masks = guide.draft_masks(drafts, 1 + len(drafts[1]))
    assert drafts == [[5, 6, 7], good]  # the grammar-free row keeps its draft; the other is cut at "}"
    assert (masks[0] == -1).all() and torch.equal(masks[1, 0], before[1])
    assert torch.equal(guide.allowed(), before)  # the matcher stepped back
    for position, token in enumerate(good):  # each position's mask is the state after the drafts before it
        row.accept(token)
        assert torch.equal(masks[1, position + 1], guide.allowed()[1])


def test_the_server_speculates_for_constrained_requests(self_drafted):
    alone = self_drafted.complete(PROMPT, json_schema=RECORD, max_new_tokens=300, speculative="off", **SAMPLED)
    free = self_drafted.complete("lazy dog", max_new_tokens=12, ignore_eos=True, speculative="off")
    scheduler = Scheduler(self_drafted, parallel=2, max_queue=4)
    constrained = submit(scheduler, self_drafted.encode(PROMPT), json_schema=RECORD, max_new_tokens=300, speculative="draft", **SAMPLED)
    plain = submit(scheduler, self_drafted.encode("lazy dog"), max_new_tokens=12, ignore_eos=True, speculative="draft")
    run(scheduler, constrained, plain)
    scheduler.close()
    assert (constrained.tokens, plain.tokens) == (alone.token_ids, free.token_ids)
    assert constrained.last.finish_reason == "stop"
    assert scheduler.draft_counts.drafted > 0
