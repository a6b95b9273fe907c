"""Generation: greedy tokens against transformers, batching, compiled against eager, stopping."""

import pytest
import torch

import gemmalite

from conftest import reference_greedy

WINDOW = 8  # the tiny model's sliding window


def random_prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(4, 400, (n - 1,), generator=g).tolist()


@pytest.mark.parametrize("length", [3, WINDOW - 1, WINDOW, WINDOW + 1, 5 * WINDOW + 3, 70])
def test_greedy_matches_transformers_for_prompts_around_the_window(tiny, tiny_engine, length):
    _, reference = tiny
    prompt = random_prompt(length, seed=length)
    got = tiny_engine.generate_ids([prompt], max_new_tokens=24, ignore_eos=True)[0]
    assert got == reference_greedy(reference, prompt, 24)


def test_greedy_matches_transformers_across_many_ring_wraps(tiny, tiny_engine):
    _, reference = tiny
    prompt = random_prompt(5, seed=7)
    got = tiny_engine.generate_ids([prompt], max_new_tokens=200, ignore_eos=True)[0]  # 25 wraps of the ring
    assert got == reference_greedy(reference, prompt, 200)


@pytest.fixture(scope="module")
def wide_window(tmp_path_factory):
    """A tiny model whose window (300) makes a ring (556 slots) longer than the shortest span (256)."""
    from conftest import MARGIN, make_checkpoint

    directory, reference = make_checkpoint(tmp_path_factory.mktemp("wide_window"), sliding_window=300)
    engine = gemmalite.load(directory, dtype="float32", compile=False, max_seq_len=2048, rewind_margin=MARGIN)
    return engine, reference


@pytest.mark.parametrize("length, new", [(200, 80), (500, 90)])
def test_greedy_matches_transformers_while_rings_are_read_through_a_prefix(wide_window, length, new):
    # Sliding layers read the ring's first 256 slots, then 512, then (past 512 tokens) all 556,
    # and the ring wraps: each switch happens inside one of these replies.
    engine, reference = wide_window
    assert engine.runner.new_cache(1).ring == 556
    prompt = random_prompt(length, seed=length)
    got = engine.generate_ids([prompt], max_new_tokens=new, ignore_eos=True)[0]
    assert got == reference_greedy(reference, prompt, new)


def test_prefill_longer_than_a_chunk_matches_one_forward(tiny_engine):
    """Chunked prefill (chunks of at most W tokens) gives the logits of one full forward."""
    prompt = random_prompt(37, seed=3)
    cache = tiny_engine.kv_cache(1)
    cache.reset()
    last = tiny_engine.prefill(cache, [prompt])
    full = tiny_engine.logits(torch.tensor([prompt]))[:, -1]
    torch.testing.assert_close(last, full, atol=1e-5, rtol=1e-4)


def test_rows_of_a_batch_give_what_they_give_alone(tiny_engine):
    prompts = [random_prompt(n, seed=n) for n in (4, 21, 9, 2)]
    batched = tiny_engine.generate_ids(prompts, max_new_tokens=30, ignore_eos=True)
    alone = [tiny_engine.generate_ids([p], max_new_tokens=30, ignore_eos=True)[0] for p in prompts]
    assert batched == alone


def test_rows_of_a_batch_stop_independently_at_eos(tiny_engine):
    prompts = [random_prompt(n, seed=n) for n in (6, 13)]
    free = tiny_engine.generate_ids(prompts, max_new_tokens=12, ignore_eos=True)
    # Declare one row's 4th token an eos id: that row must stop there, the other run on.
    stopper = free[0][3]
    engine = gemmalite.Engine(
        tiny_engine.model, tiny_engine.tokenizer, device=tiny_engine.device, dtype=tiny_engine.dtype,
        compile=False, max_seq_len=tiny_engine.max_seq_len, eos_ids=[stopper],
    )
    out = engine.generate_ids(prompts, max_new_tokens=12)
    assert out[0] == free[0][: free[0].index(stopper) + 1]
    expected_other = free[1][: free[1].index(stopper) + 1] if stopper in free[1] else free[1]
    assert out[1] == expected_other
    assert engine.last_stats.finish_reasons[0] == "stop"


def test_generation_stops_with_length_at_max_seq_len(tiny):
    engine = gemmalite.load(tiny[0], dtype="float32", max_seq_len=32)
    out = engine.generate_ids([random_prompt(20, seed=1)], max_new_tokens=100, ignore_eos=True)[0]
    assert len(out) == 12  # prompt + new tokens fill max_seq_len exactly
    assert engine.last_stats.finish_reasons == ["length"]
    alone = gemmalite.load(tiny[0], dtype="float32", max_seq_len=64)
    assert out == alone.generate_ids([random_prompt(20, seed=1)], max_new_tokens=12, ignore_eos=True)[0]


def test_max_new_tokens_zero_gives_nothing(tiny_engine):
    assert tiny_engine.generate_ids([[2, 5]], max_new_tokens=0) == [[]]


def test_compiled_decode_equals_eager_and_compiles_a_bounded_number_of_graphs(tiny_engine, compiled_engine):
    prompts = [[random_prompt(n, seed=n)] for n in (3, 17, 40)]
    settings = [dict(), dict(temperature=0.7, seed=1), dict(temperature=1.3, top_k=5, top_p=0.9, min_p=0.05, seed=2)]
    for prompt, kw in zip(prompts, settings):
        eager = tiny_engine.generate_ids(prompt, max_new_tokens=60, ignore_eos=True, **kw)
        compiled = compiled_engine.generate_ids(prompt, max_new_tokens=60, ignore_eos=True, **kw)
        assert compiled == eager
    # One graph per way of choosing (greedy, temperature only, top-k), whatever the prompt
    # lengths, settings and steps.
    graphs = compiled_engine.graph_count()
    assert 1 <= graphs <= 3
    compiled_engine.generate_ids([random_prompt(9, seed=9)], max_new_tokens=200, ignore_eos=True)
    assert compiled_engine.graph_count() == graphs


def test_stop_strings_cut_the_text(tiny_engine):
    full = tiny_engine.generate("The quick", max_new_tokens=30, ignore_eos=True)
    stop = full[5:8]
    assert stop and stop in full
    cut = tiny_engine.generate("The quick", max_new_tokens=30, ignore_eos=True, stop=stop)
    assert cut == full[: full.index(stop)]
    assert tiny_engine.last_stats.finish_reasons == ["stop"]


def test_stream_yields_the_same_text_as_generate(tiny_engine):
    pieces = list(tiny_engine.stream("Once upon a time", max_new_tokens=40, ignore_eos=True))
    assert len(pieces) > 1
    assert "".join(pieces) == tiny_engine.generate("Once upon a time", max_new_tokens=40, ignore_eos=True)


def test_stream_never_yields_half_a_utf8_character(tiny_engine):
    """Byte-fallback tokens of a multi-byte character arrive one per step; none may leak alone."""
    tok = tiny_engine.tokenizer
    text = "héllo 字 🙂 done"
    ids = tok.encode(text, bos=False)
    assert len(ids) > len(text) // 2  # byte fallback is in play
    from gemmalite.text import TextStream

    tail = TextStream(tiny_engine.decode)
    pieces = [tail.add([i]) for i in ids] + [tail.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_chat_prompt_uses_gemma_turn_template(tiny_engine):
    ids = tiny_engine.encode("hi", chat=True, system="be brief")
    text = tiny_engine.tokenizer.decode(ids)
    assert text == "<start_of_turn>user\nbe brief\n\nhi<end_of_turn>\n<start_of_turn>model\n"
    assert ids[0] == 2
    assert tiny_engine.tokenizer.token_id("<end_of_turn>") in ids


def test_same_seed_same_tokens_on_fresh_engines(tiny, tiny_engine):
    kw = dict(max_new_tokens=40, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    first = tiny_engine.generate_ids([[2, 10, 11]], **kw)
    again = tiny_engine.generate_ids([[2, 10, 11]], **kw)
    fresh = gemmalite.load(tiny[0], dtype="float32").generate_ids([[2, 10, 11]], **kw)
    other = tiny_engine.generate_ids([[2, 10, 11]], **{**kw, "seed": 99})
    assert first == again == fresh
    assert first != other


def test_generation_config_sets_the_defaults_and_extra_eos(tiny, tmp_path):
    import json
    import shutil

    directory = shutil.copytree(tiny[0], tmp_path / "ckpt")
    (directory / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "eos_token_id": [1, 106]})
    )
    engine = gemmalite.load(directory, dtype="float32")
    assert (engine.defaults.temperature, engine.defaults.top_k, engine.defaults.top_p) == (0.7, 5, 0.9)
    assert 106 in engine.eos_ids and 1 in engine.eos_ids
    prompt = [[2, 30, 31, 32]]
    by_default = engine.generate_ids(prompt, max_new_tokens=20, seed=5, ignore_eos=True)
    explicit = engine.generate_ids(prompt, max_new_tokens=20, seed=5, ignore_eos=True, temperature=0.7, top_k=5, top_p=0.9)
    greedy = engine.generate_ids(prompt, max_new_tokens=20, ignore_eos=True, temperature=0)
    assert by_default == explicit != greedy
    plain = gemmalite.load(tiny[0], dtype="float32")  # no generation_config.json: greedy
    assert plain.defaults.greedy
    assert plain.generate_ids(prompt, max_new_tokens=20, ignore_eos=True) == greedy
