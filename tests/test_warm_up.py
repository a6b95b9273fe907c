"""Compiling is announced, and done before a reply starts rather than in the middle of it."""

import re

import pytest

import gemmalite
from gemmalite import cli

from conftest import MARGIN

DECODE = "the decode step (greedy, batch 1, 256 keys)"


@pytest.fixture(scope="module")
def fresh_compiled(tiny):
    """A compiled engine no test has called yet (the suite's shared one has run many shapes)."""
    return gemmalite.load(tiny[0], dtype="float32", compile=True, max_seq_len=1024, rewind_margin=MARGIN)


def test_warm_up_compiles_the_decode_step_so_the_call_compiles_nothing_mid_reply(fresh_compiled, tiny_engine):
    heard = []
    fresh_compiled.runner.on_compile = lambda what, seconds: heard.append((what, seconds))
    fresh_compiled.warm_up(max_new_tokens=50, stop=["x"])  # the call's own length and stops do not matter
    started = [what for what, seconds in heard if seconds is None]
    finished = [what for what, seconds in heard if seconds is not None]
    assert DECODE in started and started == finished  # each notice before is followed by one after
    assert all(seconds > 0 for _, seconds in heard if seconds is not None)

    heard.clear()
    prompt = [[2, 7, 8, 9, 10]]
    got = fresh_compiled.generate_ids(prompt, max_new_tokens=30, ignore_eos=True)
    assert heard == []  # every graph this call needs was compiled by the warm-up
    assert got == tiny_engine.generate_ids(prompt, max_new_tokens=30, ignore_eos=True)
    assert fresh_compiled.last_stats.cached_tokens == [0]  # the warm-up left nothing for prompt reuse

    fresh_compiled.generate_ids(prompt, max_new_tokens=3, temperature=0.7, seed=1)  # a new way of sampling
    assert [what for what, seconds in heard if seconds is None] == ["the decode step (plain, batch 1, 256 keys)"]


def test_an_eager_engine_has_nothing_to_warm_up(tiny_engine):
    heard = []
    tiny_engine.runner.on_compile = lambda what, seconds: heard.append(what)
    try:
        tiny_engine.warm_up(temperature=0.5)
        tiny_engine.generate_ids([[2, 5]], max_new_tokens=2)
    finally:
        tiny_engine.runner.on_compile = None
    assert heard == []


def test_the_cli_says_what_it_compiles_and_how_long_it_took(capsys, tiny, tiny_engine):
    args = ["The quick brown", "--model", tiny[0], "--dtype", "float32", "--device", "cpu", "--temperature", "0", "-n", 8]
    status = cli.main([str(a) for a in [*args, "--compile"]])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert out == tiny_engine.generate("The quick brown", max_new_tokens=8)
    assert f"gemmalite: compiling {DECODE}; the first time" in err
    assert re.search(rf"gemmalite: compiled {re.escape(DECODE)} in [0-9.]+ s", err)

    status = cli.main([str(a) for a in [*args, "--compile", "-q"]])
    out_quiet, err = capsys.readouterr()
    assert status == 0 and out_quiet == out and "compil" not in err
