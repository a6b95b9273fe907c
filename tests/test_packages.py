"""The compile cache (packages.py): graphs compiled once per machine, run by later processes.

Each entry is built once per test module: an AOTInductor build of the tiny model takes tens of
seconds on two cores. float32 proves the packaged graphs against eager, token for token; bfloat16
holds packaged calls to themselves, fresh, reused and after eager calls.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import gemmalite
from gemmalite import packages
from gemmalite.builder import build, build_queue
from gemmalite.packages import Graph

from conftest import MARGIN, make_checkpoint
from test_invariance import SAMPLED, fresh_call, ids

PROMPT = [2, 17, 33, 91, 5, 240, 77, 12, 8, 150, 41]
BUILD_IN_BACKGROUND = packages.Packages.build_in_background
GREEDY = Graph("decode", 1, "greedy")
SORTED_WITH_LOGPROBS = Graph("decode", 1, "sorted", with_logprobs=True)
SMALL = dict(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], sliding_window=300)


@pytest.fixture(scope="module", autouse=True)
def no_builders_at_exit():
    """Engines here want graphs; no builder may start when the test process exits."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(packages.Packages, "build_in_background", lambda self: None)
        yield


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The tiny model cut to two layers, one sliding and one global, which builds in about two
    thirds of the time. Its window of 300 makes a ring (556 slots) longer than the shortest span,
    so its graphs take the rings' span as a size of their own (256, 512, then the whole ring)."""
    return make_checkpoint(tmp_path_factory.mktemp("small"), **SMALL)


@pytest.fixture(scope="module")
def small_engine(small):
    return gemmalite.load(small[0], dtype="float32", compile=False, max_seq_len=1024, rewind_margin=MARGIN)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A compile cache holding the float32 prefill and greedy step of the small model at batch 1."""
    path = tmp_path_factory.mktemp("compiled")
    with cache_at(path):
        yield path


class cache_at:
    """GEMMALITE_COMPILE_CACHE set to `path` while inside (conftest turns it off for the suite)."""

    def __init__(self, path):
        self.path = str(path)

    def __enter__(self):
        self.before = os.environ["GEMMALITE_COMPILE_CACHE"]
        os.environ["GEMMALITE_COMPILE_CACHE"] = self.path

    def __exit__(self, *exc):
        os.environ["GEMMALITE_COMPILE_CACHE"] = self.before


def cached(small, dtype="float32", **options):
    return gemmalite.load(small[0], dtype=dtype, compile="cached", max_seq_len=1024, rewind_margin=MARGIN, **options)


@pytest.fixture(scope="module")
def built(small, root):
    engine = cached(small)
    for graph in (Graph("prefill", 1), GREEDY):
        build(engine.runner, graph, root)
    return root


def test_cpu_defaults_to_the_compile_cache_and_off_means_eager(small, root, monkeypatch):
    assert cached(small).compile == "cached"
    assert gemmalite.load(small[0], dtype="float32").compile == "cached"
    monkeypatch.setenv("GEMMALITE_COMPILE_CACHE", "off")
    eager = gemmalite.load(small[0], dtype="float32")
    assert eager.compile is False and eager.runner.packages is None
    with pytest.raises(gemmalite.InvalidArgumentError, match="compile must be"):
        gemmalite.load(small[0], compile="yes")


def test_a_second_process_runs_the_packages_and_gets_eagers_tokens(small, built, small_engine):
    script = f"""
import json, gemmalite
engine = gemmalite.load({str(small[0])!r}, dtype="float32", max_seq_len=1024, rewind_margin={MARGIN})
done = engine.complete({PROMPT}, max_new_tokens=40, ignore_eos=True)
print(json.dumps({{"tokens": done.token_ids, "loaded": sorted(g.name for g in engine.runner.packages.loaded),
                  "wanted": len(engine.runner.packages.wanted)}}))
"""
    env = {**os.environ, "GEMMALITE_COMPILE_CACHE": str(built)}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["loaded"] == ["decode", "prefill"] and got["wanted"] == 0
    eager = small_engine.complete(PROMPT, max_new_tokens=40, ignore_eos=True).token_ids
    assert got["tokens"] == eager


def test_packaged_calls_cross_spans_and_chunks_with_eagers_tokens(small, built, small_engine):
    engine = cached(small)
    # Two prefill chunks; decode crosses spans of 256, 512 and 1024 slots (rings: 256, 512, all
    # 556), and the ring wraps.
    long_prompt = ids(300, 5)
    for prompt, new in ((PROMPT, 230), (long_prompt, 300), ([2], 230)):
        got = engine.complete(prompt, max_new_tokens=new, ignore_eos=True, repetition_penalty=1.3)
        assert engine.runner.packages.loaded and engine.runner.kernels(1, "greedy", False, False) is not None
        assert got.token_ids == small_engine.complete(prompt, max_new_tokens=new, ignore_eos=True, repetition_penalty=1.3).token_ids


def test_speculative_calls_run_a_packaged_verification_with_plain_decodings_tokens(small, built, small_engine, monkeypatch, tmp_path):
    """A lookup call wants its verification graph and runs eagerly; once built, the whole call runs
    packaged (prefill, steps, verification) and gives plain decoding's tokens."""
    repeating = [2, 10, 20, 30, 40, 50, 10, 20, 30, 40, 50, 10, 20, 30]
    expected = small_engine.complete(repeating, max_new_tokens=30, ignore_eos=True, speculative="off").token_ids
    verify, calls = Graph("verify", 1, width=1 + MARGIN), []
    shutil.copytree(built, tmp_path / "compiled")  # the module's entries, and this one's verification
    with cache_at(tmp_path / "compiled"):
        engine = cached(small)
        assert engine.complete(repeating, max_new_tokens=30, ignore_eos=True, speculative="lookup").token_ids == expected
        assert verify in engine.runner.packages.wanted
        build(engine.runner, verify, tmp_path / "compiled")
        engine = cached(small)
        packaged = packages.Kernels.verify
        monkeypatch.setattr(packages.Kernels, "verify", lambda self, *args: calls.append(1) or packaged(self, *args))
        got = engine.complete(repeating, max_new_tokens=30, ignore_eos=True, speculative="lookup")
    assert got.token_ids == expected and sum(engine.last_stats.accepted_tokens) > 0 and calls
    assert verify in engine.runner.packages.loaded


def test_a_call_whose_graphs_are_missing_runs_eagerly_and_wants_them(small, built, small_engine, monkeypatch):
    engine = cached(small)
    done = engine.complete(PROMPT, max_new_tokens=12, temperature=0.7, top_k=5, seed=3)
    assert engine.runner.packages.wanted == {Graph("decode", 1, "topk")}  # the prefill exists
    assert done.token_ids == small_engine.complete(PROMPT, max_new_tokens=12, temperature=0.7, top_k=5, seed=3).token_ids
    started = []
    monkeypatch.setattr(packages.subprocess, "Popen", lambda argv, **kw: started.append((argv, kw)))
    BUILD_IN_BACKGROUND(engine.runner.packages)
    (argv, kw), = started
    assert kw["start_new_session"] and kw["env"]["GEMMALITE_COMPILE_CACHE"] == str(built)
    queued = [json.loads(p.read_text()) for p in (built / "queue").glob("*.json")]
    assert [q["graph"]["kind"] for q in queued] == ["topk"] and queued[0]["recipe"]["source"] == str(small[0].resolve())
    shutil.rmtree(built / "queue")


@pytest.mark.parametrize("change", ["max_seq_len", "dtype", "torch", "gemmalite", "cpu"])
def test_a_change_to_anything_a_graph_depends_on_makes_a_new_entry(small, built, change, monkeypatch):
    name = cached(small).runner.packages.name(GREEDY)
    options = {"max_seq_len": dict(max_seq_len=512), "dtype": dict(dtype="bfloat16")}.get(change, {})
    if change == "torch":
        monkeypatch.setattr(torch, "__version__", torch.__version__ + ".other")
    if change == "gemmalite":
        monkeypatch.setattr(packages, "_source_digest", lambda: "edited")
    if change == "cpu":
        monkeypatch.setattr(packages, "_cpu", lambda: "another cpu")
    engine = gemmalite.load(small[0], compile="cached", rewind_margin=MARGIN, **{"dtype": "float32", "max_seq_len": 1024, **options})
    assert engine.runner.packages.name(GREEDY) != name
    assert engine.runner.kernels(1, "greedy", False, False) is None and GREEDY in engine.runner.packages.wanted


def test_a_corrupt_or_foreign_entry_is_announced_deleted_and_rebuilt(small, built, small_engine, tmp_path):
    other = tmp_path / "compiled"
    shutil.copytree(built, other)
    with cache_at(other):
        engine = cached(small)
        name = engine.runner.packages.name(GREEDY)
        (other / f"{name}.pt2").write_bytes(b"not a package")
        record = json.loads((other / f"{engine.runner.packages.name(Graph('prefill', 1))}.json").read_text())
        record["torch"] = "0.0"  # a record that is not this graph's
        (other / f"{engine.runner.packages.name(Graph('prefill', 1))}.json").write_text(json.dumps(record))
        notices = []
        engine.runner.packages.on_notice = notices.append
        done = engine.complete(PROMPT, max_new_tokens=20, ignore_eos=True)  # eager, and no crash
        assert len(notices) == 2 and all("unreadable" in n and "rebuilt" in n for n in notices)
        assert not list(other.glob("*.pt2"))
        assert engine.runner.packages.wanted == {GREEDY, Graph("prefill", 1)}

        # The prefill's entry is the one `built` holds: put it back, and rebuild only the decode step.
        prefill = engine.runner.packages.name(Graph("prefill", 1))
        for suffix in (".pt2", ".json"):
            shutil.copy(built / f"{prefill}{suffix}", other / f"{prefill}{suffix}")
        queue = other / "queue"
        queue.mkdir()
        for request in engine.runner.packages.requests():
            (queue / f"{request['name']}.json").write_text(json.dumps(request))
        assert build_queue(other) == 1 and not list(queue.iterdir())
        again = cached(small)
        assert again.complete(PROMPT, max_new_tokens=20, ignore_eos=True).token_ids == done.token_ids
        assert {g.name for g in again.runner.packages.loaded} == {"prefill", "decode"}


def test_bf16_packaged_replies_are_the_same_fresh_reused_and_after_eager_calls(small, root, tmp_path):
    engine = cached(small, dtype="bfloat16")
    for graph in (Graph("prefill", 1), SORTED_WITH_LOGPROBS):
        build(engine.runner, graph, root)
    eager_first = engine.complete(ids(20, 1), max_new_tokens=8, temperature=0.8, seed=1)  # "plain": not built
    assert engine.runner.kernels(1, "plain", False, False) is None
    transcript = ids(20, 1) + eager_first.token_ids + ids(9, 2)[1:]
    # The pool's cache was written eagerly: the packaged call feeds the whole transcript again.
    reused = engine.complete(transcript, seed=4, **SAMPLED)
    assert reused.usage.cached_tokens == 0 and [c.kernels for c in engine.runner._idle] == ["packaged"]
    alone = fresh_call(engine, transcript, seed=4, **SAMPLED)
    assert reused.token_ids == alone.token_ids and reused.top_logprobs == alone.top_logprobs
    longer = transcript + reused.token_ids + ids(7, 3)[1:]
    reused = engine.complete(longer, seed=5, **SAMPLED)
    assert reused.usage.cached_tokens > 0
    alone = fresh_call(engine, longer, seed=5, **SAMPLED)
    assert reused.token_ids == alone.token_ids and reused.top_logprobs == alone.top_logprobs

    # Another engine of the same shapes in this process, with other weights: where bf16 weights
    # are packed for oneDNN, they sit under other keys than those the packages were built with.
    other = make_checkpoint(tmp_path / "other", seed=7, **SMALL)
    packaged, plain = (gemmalite.load(other[0], dtype="bfloat16", compile=c, max_seq_len=1024, rewind_margin=MARGIN) for c in ("cached", False))
    mine = packaged.complete(transcript, seed=4, **SAMPLED)
    assert packaged.runner._idle[0].kernels == "packaged"
    expected = plain.complete(transcript, seed=4, **SAMPLED)  # eager bf16: the same weights, other kernels
    assert mine.token_ids[:4] == expected.token_ids[:4]
    chosen, chosen_eagerly = (torch.tensor([top[0][1] for top in c.top_logprobs[:4]]) for c in (mine, expected))
    torch.testing.assert_close(chosen, chosen_eagerly, atol=0.05, rtol=0)


def test_a_cache_that_cannot_be_written_leaves_calls_eager_with_a_notice(small, small_engine, tmp_path):
    blocked = tmp_path / "a file, not a directory"
    blocked.write_text("")
    with cache_at(blocked / "compiled"):
        engine = cached(small)
        notices = []
        engine.runner.packages.on_notice = notices.append
        done = engine.complete(PROMPT, max_new_tokens=8, ignore_eos=True)
        assert done.token_ids == small_engine.complete(PROMPT, max_new_tokens=8, ignore_eos=True).token_ids
        assert BUILD_IN_BACKGROUND(engine.runner.packages) is None
        assert len(notices) == 1 and "could not start" in notices[0]
