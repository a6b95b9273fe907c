"""Structured output (grammar.py): replies that parse and fit the caller's schema, regex or grammar.

The tiny checkpoint's weights are random, so whatever shape the replies have is the mask's doing.
Outputs are checked with the jsonschema library, never with gemmalite's own code.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

llguidance = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from gemmalite import cli  # noqa: E402
from gemmalite.batching import Scheduler  # noqa: E402
from gemmalite.errors import InvalidArgumentError  # noqa: E402
from gemmalite.grammar import Grammars, Guide, mask_logits, token_bytes  # noqa: E402
from gemmalite.schemas import Constraint  # noqa: E402
from gemmalite.options import GenerationOptions  # noqa: E402
from gemmalite.slots import Request  # noqa: E402

PROMPT = "The quick brown"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "none"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 2},
        "address": {
            "type": "object",
            "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}, "main": {"type": "boolean"}},
            "required": ["zip", "main"],
        },
        "score": {"type": "number", "minimum": -1, "maximum": 1},
    },
    "required": ["name", "age", "pet", "tags", "address", "score"],
}
NESTED = {
    "type": "object",
    "properties": {"inner": {"type": "object", "properties": {"pet": {"enum": ["cat", "dog"]}}, "required": ["pet"]},
                   "bits": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}},
    "required": ["inner", "bits"],
}  # fmt: skip
FLAGS = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 9}}, "required": ["ok", "n"]}
SPACED = {"type": "object", "properties": {"animal": {"enum": ["lazy dog", "brown fox"]}}, "required": ["animal"]}


def valid(text: str, schema: dict) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


# ------------------------------------------------------------------ the vocabulary and the mask
def test_token_bytes_turn_pieces_into_the_bytes_they_add(tiny_engine):
    tokenizer = tiny_engine.tokenizer
    sp, rows = tokenizer.sp, tiny_engine.config.vocab_size + 45  # a head wider than the tokenizer
    pieces = token_bytes(tokenizer, rows)
    assert len(pieces) == rows and pieces[sp.get_piece_size() :] == [None] * 45
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_control(i) or piece in ("<start_of_turn>", "<end_of_turn>", "<unk>"):
            assert pieces[i] is None, piece
        elif sp.is_byte(i):
            assert pieces[i] == bytes([int(piece[3:5], 16)])
        else:
            assert pieces[i] == sp.decode([i]).encode() and b"\xe2\x96\x81" not in pieces[i], piece  # no raw "▁"
    assert any(p and p.startswith(b" ") for p in pieces)


def test_the_mask_allows_exactly_what_the_grammar_accepts_and_covers_the_head(tiny_engine):
    rows = tiny_engine.config.vocab_size + 45
    grammars = Grammars(tiny_engine.tokenizer, rows, eos_id=1)
    compiled = grammars.compile(Constraint("json_schema", json.dumps(FLAGS)))
    row = compiled.matcher(stop_ids=(1,))
    for token in tiny_engine.tokenizer.encode('{"ok": true', bos=False):
        assert not row.accept(token)
    guide = Guide(2, grammars.words, "cpu")
    guide.set(0, row)
    allowed = guide.allowed()
    assert allowed.shape == (2, -(-rows // 32)) and (allowed[1] == -1).all()  # no grammar: every bit
    bits = [(int(allowed[0, t // 32]) >> (t % 32)) & 1 for t in range(rows)]
    accepted = [int(t < 400 and t != 1 and row.matcher.deep_copy().consume_token(t)) for t in range(rows)]
    assert bits == accepted and sum(bits) > 1

    logits = torch.randn(2, rows)
    masked = mask_logits(logits, allowed)
    keep = torch.tensor(bits, dtype=torch.bool)
    assert torch.equal(masked[0, keep], logits[0, keep]) and torch.isinf(masked[0, ~keep]).all()
    assert torch.equal(masked[1], logits[1])


def test_integers_without_bounds_are_held_to_the_safe_range(tiny_engine):
    """An unbounded integer may have at most 16 digits (2**53 - 1), so a model cannot write zeros
    until max_new_tokens; a bound the schema sets itself is kept."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "big": {"type": "integer", "maximum": 10**18}},
              "required": ["n", "big"]}  # fmt: skip
    compiled = Grammars(tiny_engine.tokenizer, tiny_engine.config.vocab_size, eos_id=1).compile(Constraint("json_schema", json.dumps(schema)))

    def takes(text: str) -> bool:
        matcher = compiled.matcher(stop_ids=(1,)).matcher
        return all(matcher.consume_token(t) for t in tiny_engine.tokenizer.encode(text, bos=False))

    assert takes('{"n": -9007199254740991, "big": 1000000000000000000}')
    assert not takes('{"n": 9007199254740992')  # one past the safe range
    assert not takes('{"n": 10000000000000000')  # 17 digits
    assert takes('{"n": 12, "big": 3}')


# ------------------------------------------------------------------ replies
@pytest.mark.parametrize("schema", [PERSON, FLAGS, True], ids=["nested", "flags", "any-object"])
def test_replies_parse_and_validate_greedy_and_sampled(tiny_engine, schema):
    expected = {"type": "object"} if schema is True else schema
    greedy = tiny_engine.complete(PROMPT, json_schema=schema, max_new_tokens=300)
    text = schema if schema is True else json.dumps(schema)
    sampled = tiny_engine.complete([PROMPT] * 2, json_schema=text, temperature=1.0, top_k=50, seed=3, max_new_tokens=300)
    for done in [greedy, *sampled]:
        valid(done.text, expected)
        assert done.finish_reason == "stop"
    assert len({d.text for d in sampled}) > 1  # the rows really sampled


def test_a_reply_ends_at_the_token_that_completes_the_value(tiny_engine):
    for ignore_eos in (False, True):
        done = tiny_engine.complete(PROMPT, json_schema=FLAGS, max_new_tokens=200, ignore_eos=ignore_eos)
        valid(done.text, FLAGS)
        assert done.finish_reason == "stop" and done.text.endswith("}")
        assert not done.text.startswith(" ") and "  " not in done.text  # at most one blank between tokens
        with pytest.raises(ValueError):  # one token less is not yet a value
            json.loads(tiny_engine.decode(done.token_ids[:-1]))


def test_spaces_inside_strings_come_from_real_bytes(tiny_engine):
    # A vocabulary handed over as raw pieces ("▁dog") would have no token for a space at all.
    for seed in range(2):
        done = tiny_engine.complete(PROMPT, json_schema=SPACED, temperature=1.0, seed=seed, max_new_tokens=100)
        assert valid(done.text, SPACED)["animal"] in ("lazy dog", "brown fox")
        pieces = token_bytes(tiny_engine.tokenizer, tiny_engine.config.vocab_size)
        assert b"".join(pieces[t] for t in done.token_ids) == done.text.encode()


def test_regex_and_grammar_constrain_the_whole_reply(tiny_engine):
    done = tiny_engine.complete(PROMPT, regex=r"(cat|dog) [0-9]{2}", temperature=1.0, seed=1, max_new_tokens=40)
    assert re.fullmatch(r"(cat|dog) [0-9]{2}", done.text) and done.finish_reason == "stop"
    gbnf = 'root ::= answer " " answer\nanswer ::= "yes" | "no"'
    text = tiny_engine.generate(PROMPT, grammar=gbnf, max_new_tokens=40)
    assert re.fullmatch(r"(yes|no) (yes|no)", text)


def test_streams_sessions_and_token_ids_follow_the_schema(tiny_engine):
    whole = tiny_engine.generate(PROMPT, json_schema=FLAGS, max_new_tokens=200)
    chunks = list(tiny_engine.complete_stream(PROMPT, json_schema=FLAGS, max_new_tokens=200))
    assert "".join(c.text for c in chunks) == whole and chunks[-1].finish_reason == "stop"
    ids = tiny_engine.generate_ids([tiny_engine.encode(PROMPT)], json_schema=FLAGS, max_new_tokens=200)[0]
    assert tiny_engine.decode(ids) == whole

    chat = tiny_engine.session()
    first = valid(chat.send("Describe yourself.", json_schema=SPACED, max_new_tokens=100), SPACED)
    second = valid(chat.send("Again, briefly.", json_schema=FLAGS, max_new_tokens=200), FLAGS)
    assert first and second
    chat.send("And now in words.", max_new_tokens=5)  # a turn without a schema is unconstrained again
    assert len(chat.tokens) > 0


def test_a_batch_mixes_rows_with_and_without_and_with_other_schemas(tiny_engine):
    alone_plain = tiny_engine.generate_ids([tiny_engine.encode("lazy dog")], max_new_tokens=12, ignore_eos=True)[0]
    alone_flags = tiny_engine.generate(PROMPT, json_schema=FLAGS, max_new_tokens=200)
    scheduler = Scheduler(tiny_engine, parallel=3, max_queue=4)
    outcomes = []
    for prompt, options in [
        (PROMPT, dict(json_schema=FLAGS, max_new_tokens=200)),
        ("lazy dog", dict(max_new_tokens=12, ignore_eos=True)),
        ("Once upon", dict(json_schema=NESTED, temperature=1.0, seed=5, max_new_tokens=100)),
    ]:
        chunks = []
        scheduler.submit(Request(tiny_engine.encode(prompt), GenerationOptions(**options), chunks.append))
        outcomes.append(chunks)
    for _ in range(2000):
        if all(c and (isinstance(c[-1], BaseException) or c[-1].finish_reason) for c in outcomes):
            break
        scheduler.step()
    flags, plain, person = (("".join(c.text for c in chunks), chunks) for chunks in outcomes)
    assert flags[0] == alone_flags and flags[1][-1].finish_reason == "stop"
    assert [t for c in plain[1] for t in c.token_ids] == alone_plain  # no other row's mask leaks into it
    valid(person[0], NESTED)
    assert scheduler.guide.rows == {}  # finished requests leave no grammar behind


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "options, words",
    [
        (dict(json_schema={"type": "strng"}), "strng"),
        (dict(json_schema={"type": "object", "dependentSchemas": {"a": {}}}), "dependentSchemas"),
        (dict(json_schema='{"type": '), "not valid JSON"),
        (dict(json_schema=5), "JSON Schema object"),
        (dict(json_schema=FLAGS, regex="a+"), "cannot be combined"),
        (dict(regex="a("), "unclosed group"),
        (dict(grammar="root ::= (("), "grammar"),
    ],
)
def test_bad_constraints_are_clear_errors_before_any_work(tiny_engine, options, words):
    with pytest.raises(InvalidArgumentError, match=re.escape(words)):
        tiny_engine.complete(PROMPT, max_new_tokens=4, **options)
    assert tiny_engine.generate(PROMPT, max_new_tokens=3)  # still usable


# ------------------------------------------------------------------ the server
@pytest.fixture(scope="module")
def client(tiny_engine):
    openai = pytest.importorskip("openai")
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from gemmalite.serve.app import create_app

    scheduler = Scheduler(tiny_engine, parallel=2, max_queue=4)
    scheduler.start()
    http = TestClient(create_app(tiny_engine, scheduler, model="tiny"))
    yield openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0), http
    scheduler.close()


def test_the_server_takes_response_format_on_both_endpoints(client):
    openai_client, http = client
    messages = [{"role": "user", "content": "Describe a pet."}]
    reply = openai_client.chat.completions.create(model="tiny", messages=messages, max_tokens=200, response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), dict) and reply.choices[0].finish_reason == "stop"
    spec = {"type": "json_schema", "json_schema": {"name": "flags", "schema": FLAGS, "strict": True}}
    plain = openai_client.completions.create(model="tiny", prompt=PROMPT, max_tokens=200, extra_body={"response_format": spec})
    valid(plain.choices[0].text, FLAGS)
    stream = openai_client.chat.completions.create(model="tiny", messages=messages, max_tokens=200, response_format=spec, stream=True)
    valid("".join(c.choices[0].delta.content or "" for c in stream if c.choices), FLAGS)
    llama = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 200, "json_schema": SPACED}).json()
    valid(llama["choices"][0]["text"], SPACED)


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"response_format": {"type": "json_object"}, "json_schema": FLAGS}, "json_schema"),
    ],
)
def test_the_server_answers_bad_schemas_with_400(client, extra, param):
    _, http = client
    response = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


# ------------------------------------------------------------------ the CLI
def test_cli_json_schema_and_json_object(capsys, tiny, tmp_path):
    base = [PROMPT, "--model", tiny[0], "--dtype", "float32", "--device", "cpu", "--no-compile", "--temperature", "0", "-q", "-n", 200]
    schema_file = tmp_path / "flags.json"
    schema_file.write_text(json.dumps(FLAGS))
    outs = []
    for extra in (["--json-schema", schema_file], ["--json-schema", json.dumps(FLAGS)], ["--json-object"]):
        assert cli.main([str(a) for a in base + extra]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and valid(outs[0], FLAGS)
    assert isinstance(json.loads(outs[2]), dict)
    for extra, words in ((["--json-schema", tmp_path / "missing.json"], "neither"), (["--json-object", "--json-schema", "{}"], "cannot be combined")):
        assert cli.main([str(a) for a in base + extra]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err


# ------------------------------------------------------------------ compiled
def test_changing_or_dropping_the_schema_never_recompiles(compiled_engine, tiny_engine):
    greedy = dict(max_new_tokens=200)
    first = compiled_engine.generate(PROMPT, json_schema=FLAGS, **greedy)
    assert first == tiny_engine.generate(PROMPT, json_schema=FLAGS, **greedy)  # compiled == eager (float32)
    compiled_engine.generate(PROMPT, max_new_tokens=4)
    graphs = compiled_engine.graph_count()
    for schema in (NESTED, SPACED, None, FLAGS):
        compiled_engine.generate(PROMPT, json_schema=schema, **greedy)
    assert compiled_engine.graph_count() == graphs
