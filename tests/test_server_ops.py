"""`gemmalite serve` as something to deploy: keys, metrics, tokenize, limits, CORS, logs, shutdown,
and a decode step sized to the busy rows.

Two real server processes for the module, started together (eager, float32): the main one with 4
slots, its key in the environment, a --shutdown-timeout, an allowed CORS origin and JSON log
lines (its last test sends it SIGTERM); and a 1-slot one with a short --timeout. A few cases that need an app in a state a process rarely shows for long (still
loading, a route added later) run the app in-process; the step sizing is also checked on the
scheduler alone, step by step.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from starlette.responses import PlainTextResponse  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from conftest import launch_server  # noqa: E402
from gemmalite.batching import Scheduler  # noqa: E402
from gemmalite.options import GenerationOptions  # noqa: E402
from gemmalite.serve.app import create_app  # noqa: E402
from gemmalite.slots import Request  # noqa: E402

KEY = "test-key-0123456789"
TIMEOUT_S, SHUTDOWN_S = 2, 6
ORIGIN = "http://app.example"
SECRET_PROMPT = "Zebra quartz violin"  # must never reach the log
PARALLEL = 4


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: list[str], reader: threading.Thread):
        self.proc, self.url, self.log, self.reader = proc, url, log, reader
        headers = {"Authorization": f"Bearer {KEY}"}
        self.http = httpx.Client(base_url=url, timeout=60, headers=headers)
        self.anonymous = httpx.Client(base_url=url, timeout=60)
        self.client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample of /metrics: (name, sorted labels) -> value."""
        text = self.http.get("/metrics").text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def wait_idle(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.anonymous.get("/health").json()["busy"] and time.monotonic() < deadline:
            time.sleep(0.05)


def launch(tiny, *flags: str):
    return launch_server(tiny[0], "--dtype", "float32", *flags, env={"GEMMALITE_API_KEY": KEY})


@pytest.fixture(scope="module")
def servers(tiny):
    """(main, limited): started at once, so that their start-ups overlap."""
    launched = [
        launch(tiny, "--parallel", str(PARALLEL), "--queue", "4", "--shutdown-timeout", str(SHUTDOWN_S),
               "--cors-origin", ORIGIN, "--log-format", "json"),
        launch(tiny, "--parallel", "1", "--timeout", str(TIMEOUT_S)),
    ]  # fmt: skip
    running = []
    for proc, log, found, reader in launched:
        assert found.wait(180) and proc.poll() is None, "".join(log)
        url = re.search(r"(http://[\d.]+:\d+)/v1", "".join(log)).group(1)
        running.append(Server(proc, url, log, reader))
    yield running
    for proc, *_ in launched:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def limited(servers):
    return servers[1]


def user(text):
    return [{"role": "user", "content": text}]


def value(samples, name, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all(dict(ls).get(k) == w for k, w in labels.items()))


# ------------------------------------------------------------------ the key
ROUTES = [
    ("POST", "/v1/chat/completions", {"messages": user("hi"), "max_tokens": 2}),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/anything", None),
    ("POST", "/tokenize", {"prompt": "hi"}),
    ("POST", "/detokenize", {"tokens": [2, 5]}),
    ("GET", "/metrics", None),
    ("GET", "/v1/nowhere", None),  # an unknown path says nothing without the key
]


def test_every_route_but_health_needs_the_key(server):
    for method, path, body in ROUTES:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = server.anonymous.request(method, path, json=body, headers=headers)
            assert response.status_code == 401, (path, headers)
            error = response.json()["error"]
            assert error["code"] == "invalid_api_key" and set(error) == {"message", "type", "param", "code"}
            assert response.headers["www-authenticate"] == "Bearer"
        assert server.http.request(method, path, json=body).status_code != 401, path
    assert server.anonymous.get("/health").status_code == 200
    assert KEY not in " ".join(server.proc.args)  # from the environment: not on the command line, not in ps


def test_a_route_added_later_is_guarded_too_and_health_is_503_while_loading():
    app = create_app(model="m", api_key=KEY, log_format=None)  # no engine yet: loading
    app.add_route("/later", lambda request: PlainTextResponse("later"), methods=["GET"])
    with TestClient(app) as client:
        assert client.get("/later").status_code == 401
        assert client.get("/later", headers={"Authorization": f"Bearer {KEY}"}).text == "later"
        health = client.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "loading"}
        loading = client.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": f"Bearer {KEY}"})
        assert loading.status_code == 503 and loading.json()["error"]["code"] == "model_loading"
        assert loading.headers["retry-after"]


def test_an_empty_key_is_refused_rather_than_taken_for_no_key(capsys, monkeypatch, tiny):
    from gemmalite import cli

    monkeypatch.setenv("GEMMALITE_API_KEY", "")
    for extra in ([], ["--api-key", " "]):
        assert cli.main(["serve", "--model", str(tiny[0]), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("gemmalite: error: ") and "empty" in err and len(err.splitlines()) == 1


def test_an_image_directory_that_does_not_exist_is_refused_before_loading(capsys, tiny, tmp_path):
    from gemmalite import cli

    assert cli.main(["serve", "--model", str(tiny[0]), "--port", "0", "--image-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gemmalite: error: --image-dir") and "no such directory" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------ metrics, tokenize, limits
def test_the_metrics_counters_move_with_requests(server):
    before = server.metrics()
    prompt = "The quick brown fox jumps over the lazy dog."
    replies = [server.client.completions.create(model="m", prompt=prompt, max_tokens=6, extra_body={"ignore_eos": True})
               for _ in range(2)]  # fmt: skip
    replies.append(server.client.chat.completions.create(model="m", messages=user("Gemma is"), max_tokens=5,
                                                         extra_body={"ignore_eos": True}))  # fmt: skip
    after = server.metrics()

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    usages = [r.usage for r in replies]
    assert moved("gemmalite:prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert moved("gemmalite:generation_tokens_total") == sum(u.completion_tokens for u in usages) == 17
    cached = sum(u.prompt_tokens_details.cached_tokens for u in usages)
    assert cached > 0  # the second completion reused the first one's prompt
    assert moved("gemmalite:prefix_cache_hit_tokens_total") == cached
    assert moved("gemmalite:request_success_total", finished_reason="length") == 3
    assert moved("gemmalite:time_to_first_token_seconds_count") == 3
    assert moved("gemmalite:e2e_request_latency_seconds_count") == 3
    assert moved("gemmalite:inter_token_latency_seconds_count") == 17 - 3
    assert value(after, "gemmalite:num_requests_running") == 0 and value(after, "gemmalite:num_requests_waiting") == 0
    assert value(after, "gemmalite:num_slots") == PARALLEL
    assert 0 <= value(after, "gemmalite:kv_cache_usage_perc") <= 1


TEXTS = ["héllo wörld ✓", "日本語のテキスト 🙂🚀", "def add(a, b):\n    return a + b\n", "tabs\tand  spaces  "]


def test_tokenize_agrees_with_the_engine_and_round_trips_unicode(server, tiny_engine):
    for text in TEXTS:
        got = server.http.post("/tokenize", json={"model": "m", "prompt": text}).json()
        assert got["tokens"] == tiny_engine.encode(text) and got["count"] == len(got["tokens"])
        assert got["max_model_len"] == 4096
        assert server.http.post("/detokenize", json={"tokens": got["tokens"]}).json() == {"prompt": text}
        bare = server.http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
        assert bare["tokens"] == got["tokens"][1:]  # without <bos>
    chat = server.http.post("/tokenize", json={"messages": user(TEXTS[1]), "return_token_strs": True}).json()
    assert chat["tokens"] == tiny_engine.encode(TEXTS[1], chat=True)
    assert len(chat["token_strs"]) == chat["count"] and chat["token_strs"][0] == "<s>"
    reply = server.client.chat.completions.create(model="m", messages=user(TEXTS[1]), max_tokens=1)
    assert reply.usage.prompt_tokens == chat["count"]  # what a request is charged
    for path, body, param in (("/tokenize", {"prompt": 5}, "prompt"), ("/detokenize", {"tokens": [2, 10**9]}, "tokens")):
        bad = server.http.post(path, json=body)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param


def test_max_tokens_past_the_context_is_a_400_that_says_how_many_fit(server):
    response = server.http.post("/v1/completions", json={"prompt": [2, 5, 6], "max_tokens": 1_000_000_000})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    assert "at most 4093 new tokens fit" in error["message"]
    fits = server.http.post("/v1/completions", json={"prompt": [2, 5, 6], "max_tokens": 2})
    assert fits.status_code == 200


def test_a_request_past_the_timeout_is_cut_and_frees_its_slot(limited):
    started = time.monotonic()
    body = {"prompt": "lazy dog", "max_tokens": 4000, "ignore_eos": True}
    whole = limited.http.post("/v1/completions", json=body)
    assert whole.status_code == 504 and whole.json()["error"]["code"] == "timeout"
    assert TIMEOUT_S <= time.monotonic() - started < TIMEOUT_S + 10
    with limited.http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["error"]["code"] == "timeout"
    limited.wait_idle()
    assert limited.anonymous.get("/health").json()["busy"] == 0  # the one slot is free again


def test_streams_send_keep_alive_comments_while_they_wait_and_stop_at_the_timeout(tiny_engine):
    scheduler = Scheduler(tiny_engine, parallel=1)  # never started: nothing ever comes back
    app = create_app(tiny_engine, scheduler, model="m", timeout=0.4, keepalive_s=0.05, log_format=None)
    with TestClient(app) as client:
        with client.stream("POST", "/v1/completions", json={"prompt": "x", "stream": True, "max_tokens": 5}) as response:
            lines = [line for line in response.iter_lines() if line]
        whole = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 5})
    assert lines.count(": keep-alive") >= 2
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "timeout" and lines[-1] == "data: [DONE]"
    assert whole.status_code == 504


def test_cors_answers_the_allowed_origin_only(server):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = server.anonymous.options("/v1/chat/completions", headers=preflight)  # a preflight carries no key
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    other = server.anonymous.options("/v1/chat/completions", headers={**preflight, "Origin": "http://elsewhere.example"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    models = server.http.get("/v1/models", headers={"Origin": ORIGIN})
    assert models.headers["access-control-allow-origin"] == ORIGIN


# ------------------------------------------------------------------ a step sized to the busy rows
def test_concurrent_requests_get_what_they_get_alone_at_a_few_batch_sizes(server, tiny_engine):
    before = server.metrics()
    lengths = [3, 20, 6, 14, 9, 24]
    prompts = ["The quick brown", "Gemma is a family", "def add(a, b):", "Once upon a time", "Numbers: 0 1 2", "lazy dog"]
    expected = [tiny_engine.generate(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(prompts, lengths)]

    def ask(i):
        reply = server.client.completions.create(model="m", prompt=prompts[i], max_tokens=lengths[i], extra_body={"ignore_eos": True})
        return reply.choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(ask, range(len(prompts)))) == expected
    after = server.metrics()
    steps = {dict(ls)["batch_size"]: v - before.get((n, ls), 0) for (n, ls), v in after.items() if n == "gemmalite:decode_steps_total"}
    assert set(steps) <= {"1", "2", "4"}  # the bounded set for 4 slots: one compiled graph each
    assert steps.get("4", 0) > 0 and steps.get("1", 0) + steps.get("2", 0) > 0  # full, then fewer rows
    server.wait_idle()


PROMPTS = [[2, 5, 6, 7], [2, 40, 41, 42, 43, 44], [2, 9], [2, 77, 78, 79, 80], [2, 11, 12]]


def test_finished_rows_make_room_and_the_rest_move_down_without_changing_a_token(tiny_engine, monkeypatch):
    lengths = [2, 3, 12, 16]
    alone = [tiny_engine.generate_ids([p], max_new_tokens=n, ignore_eos=True)[0] for p, n in zip(PROMPTS, [*lengths, 5])]
    scheduler = Scheduler(tiny_engine, parallel=4)
    sizes = []
    step = scheduler.runner.step
    monkeypatch.setattr(scheduler.runner, "step", lambda cache, tokens, *a: sizes.append(len(tokens)) or step(cache, tokens, *a))
    inbox = [[] for _ in PROMPTS]
    for prompt, n, box in zip(PROMPTS, lengths, inbox):
        scheduler.submit(Request(prompt, GenerationOptions(max_new_tokens=n, ignore_eos=True), box.append, reuse=False))
    for _ in range(5):
        scheduler.step()
    busy = [s for s in scheduler.slots if s.decoding]
    assert sorted(s.row for s in busy) == [0, 1]  # rows 2 and 3 moved down when 0 and 1 finished
    scheduler.submit(Request(PROMPTS[4], GenerationOptions(max_new_tokens=5, ignore_eos=True), inbox[4].append))
    while any(not (box and box[-1].finish_reason) for box in inbox):
        scheduler.step()
    got = [[t for c in box for t in c.token_ids] for box in inbox]
    assert got == alone
    assert set(sizes) <= set(scheduler.sizes) == {1, 2, 4}
    assert sizes[0] == 4 and 2 in sizes and sizes[-1] == 1  # four rows, then two (three: four), then one
    assert sum(scheduler.decode_steps.values()) == len(sizes)


# ------------------------------------------------------------------ shutdown (last: it ends the server)
def test_sigterm_lets_a_stream_finish_refuses_new_work_aborts_the_rest_and_exits_0(server, tiny_engine):
    expected = tiny_engine.generate(SECRET_PROMPT, max_new_tokens=16, ignore_eos=True)
    with ThreadPoolExecutor(2) as pool:
        short = server.client.completions.create(model="m", prompt=SECRET_PROMPT, max_tokens=16, stream=True,
                                                 extra_body={"ignore_eos": True})  # fmt: skip
        long = server.client.completions.create(model="m", prompt="lazy dog", max_tokens=4000, stream=True,
                                                extra_body={"ignore_eos": True})  # fmt: skip
        first = [next(short), next(long)]  # both are decoding
        server.proc.send_signal(signal.SIGTERM)
        rest = [pool.submit(list, short), pool.submit(list, long)]
        deadline = time.monotonic() + 10
        while server.anonymous.get("/health").json()["status"] != "draining" and time.monotonic() < deadline:
            time.sleep(0.02)
        health = server.anonymous.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "draining"
        refused = server.http.post("/v1/completions", json={"prompt": "new", "max_tokens": 2})
        assert refused.status_code == 503 and refused.headers["retry-after"]
        short_chunks, long_chunks = first[0:1] + rest[0].result(), first[1:] + rest[1].result()
    assert "".join(c.choices[0].text for c in short_chunks) == expected
    assert short_chunks[-1].choices[0].finish_reason == "length"
    assert long_chunks[-1].choices[0].finish_reason == "abort"
    assert server.proc.wait(timeout=30) == 0
    server.reader.join(timeout=10)

    log = "".join(server.log)
    assert "Traceback" not in log and "stopped" in log
    assert SECRET_PROMPT not in log and KEY not in log
    lines = [json.loads(line) for line in server.log if line.startswith("{")]
    generations = [line for line in lines if line.get("id")]
    assert {line["finish_reason"] for line in generations} >= {"length", "abort"}
    for line in generations:
        assert line["status"] == 200 and line["prompt_tokens"] > 0 and line["completion_tokens"] >= 0
        assert {"cached_tokens", "ttft_s", "duration_s", "path", "time"} <= set(line)
    assert any(line["status"] == 503 and line["path"] == "/v1/completions" for line in lines)
