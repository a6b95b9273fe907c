"""Generation controls: penalties, log-probabilities, complete() with usage, and threads."""

import threading

import pytest
import torch

import gemmalite
from gemmalite.errors import InvalidArgumentError, ModelLoadError

from conftest import CORPUS, make_checkpoint


def random_prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(4, 400, (n - 1,), generator=g).tolist()


def reference_repetition_greedy(model, prompt, n, penalty):
    from transformers import GenerationConfig

    ids = torch.tensor([prompt])
    settings = GenerationConfig(
        max_new_tokens=n, do_sample=False, repetition_penalty=penalty, eos_token_id=None, pad_token_id=0
    )
    with torch.no_grad():
        out = model.generate(ids, generation_config=settings, attention_mask=torch.ones_like(ids))
    return out[0, len(prompt) :].tolist()


def reference_openai_penalties_greedy(engine, prompt, n, presence, frequency):
    """Greedy with logit -= presence * (count > 0) + frequency * count, one full forward per token."""
    tokens = list(prompt)
    counts = torch.zeros(engine.config.vocab_size)
    for _ in range(n):
        logits = engine.logits(torch.tensor([tokens]))[0, -1]
        logits = logits - presence * (counts > 0).float() - frequency * counts
        token = int(logits.argmax())
        counts[token] += 1
        tokens.append(token)
    return tokens[len(prompt) :]


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_matches_transformers(tiny, tiny_engine, penalty):
    _, reference = tiny
    prompt = random_prompt(12, seed=5)
    got = tiny_engine.generate_ids([prompt], max_new_tokens=40, ignore_eos=True, repetition_penalty=penalty)[0]
    assert got == reference_repetition_greedy(reference, prompt, 40, penalty)
    assert got != tiny_engine.generate_ids([prompt], max_new_tokens=40, ignore_eos=True)[0]


def reference_windowed_repetition_greedy(engine, prompt, n, penalty, last_n):
    """Greedy with transformers' repetition rule over the last `last_n` tokens of prompt and reply."""
    tokens = list(prompt)
    for _ in range(n):
        logits = engine.logits(torch.tensor([tokens]))[0, -1]
        seen = torch.tensor(sorted(set(tokens[-last_n:])))
        logits[seen] = torch.where(logits[seen] > 0, logits[seen] / penalty, logits[seen] * penalty)
        tokens.append(int(logits.argmax()))
    return tokens[len(prompt) :]


def test_repeat_last_n_penalizes_only_the_latest_tokens(tiny_engine):
    prompt = random_prompt(12, seed=5)
    kw = dict(max_new_tokens=30, ignore_eos=True, repetition_penalty=3.0)
    windowed = tiny_engine.generate_ids([prompt], **kw, repeat_last_n=4)[0]
    assert windowed == reference_windowed_repetition_greedy(tiny_engine, prompt, 30, 3.0, 4)
    whole = tiny_engine.generate_ids([prompt], **kw)[0]
    assert windowed != whole
    assert tiny_engine.generate_ids([prompt], **kw, repeat_last_n=-1)[0] == whole
    assert tiny_engine.generate_ids([prompt], **kw, repeat_last_n=0)[0] == tiny_engine.generate_ids(
        [prompt], max_new_tokens=30, ignore_eos=True
    )[0]


def test_presence_and_frequency_penalties_follow_the_openai_formula(tiny_engine):
    prompt = random_prompt(6, seed=8)
    for presence, frequency in [(0.7, 0.0), (0.5, 0.3)]:
        got = tiny_engine.generate_ids(
            [prompt], max_new_tokens=16, ignore_eos=True, presence_penalty=presence, frequency_penalty=frequency
        )[0]
        assert got == reference_openai_penalties_greedy(tiny_engine, prompt, 16, presence, frequency)


def test_penalties_compiled_equal_eager_and_never_recompile(tiny_engine, compiled_engine):
    prompt = random_prompt(9, seed=11)
    kw = dict(max_new_tokens=30, ignore_eos=True)
    first = dict(repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.2)
    assert compiled_engine.generate_ids([prompt], **kw, **first) == tiny_engine.generate_ids([prompt], **kw, **first)
    graphs = compiled_engine.graph_count()
    with torch.compiler.set_stance("fail_on_recompile"):
        for values in [dict(repetition_penalty=1.5, repeat_last_n=5), dict(presence_penalty=1.0, frequency_penalty=0.5), {}]:
            got = compiled_engine.generate_ids([prompt], **kw, **values)
            assert got == tiny_engine.generate_ids([prompt], **kw, **values)
    assert compiled_engine.graph_count() == graphs


def test_logprobs_agree_with_the_logits(tiny_engine):
    prompt = random_prompt(7, seed=3)
    done = tiny_engine.complete(prompt, max_new_tokens=12, ignore_eos=True, temperature=0.9, seed=4, logprobs=5)
    assert done.text is None and len(done.token_ids) == len(done.logprobs) == len(done.top_logprobs) == 12
    full = torch.log_softmax(tiny_engine.logits(torch.tensor([prompt + done.token_ids]))[0], -1)
    for i, token in enumerate(done.token_ids):
        row = full[len(prompt) - 1 + i]
        assert abs(done.logprobs[i] - row[token].item()) < 1e-4
        ids = [t for t, _ in done.top_logprobs[i]]
        assert ids == row.topk(5).indices.tolist()
        assert all(abs(v - row[t].item()) < 1e-4 for t, v in done.top_logprobs[i])


def test_logprobs_are_the_models_own_before_penalties(tiny_engine):
    prompt = random_prompt(7, seed=3)
    done = tiny_engine.complete(prompt, max_new_tokens=6, ignore_eos=True, repetition_penalty=2.0, logprobs=0)
    full = torch.log_softmax(tiny_engine.logits(torch.tensor([prompt + done.token_ids]))[0], -1)
    expected = [full[len(prompt) - 1 + i, t].item() for i, t in enumerate(done.token_ids)]
    assert done.logprobs == pytest.approx(expected, abs=1e-4)
    assert done.top_logprobs == [[]] * 6


def test_complete_returns_usage_and_finish_reasons(tiny_engine):
    text = tiny_engine.complete("Once upon a time", max_new_tokens=7, ignore_eos=True)
    prompt_tokens = len(tiny_engine.encode("Once upon a time"))
    assert text.text == tiny_engine.generate("Once upon a time", max_new_tokens=7, ignore_eos=True)
    assert (text.usage.prompt_tokens, text.usage.completion_tokens, text.usage.cached_tokens) == (prompt_tokens, 7, 0)
    assert text.finish_reason == "length" and text.logprobs is None
    batch = tiny_engine.complete([[2, 5, 6], [2, 9]], max_new_tokens=4, ignore_eos=True)
    assert [c.usage.prompt_tokens for c in batch] == [3, 2]
    assert [c.token_ids for c in batch] == tiny_engine.generate_ids([[2, 5, 6], [2, 9]], max_new_tokens=4, ignore_eos=True)
    full = tiny_engine.generate("The quick", max_new_tokens=30, ignore_eos=True)
    cut = tiny_engine.complete("The quick", max_new_tokens=30, ignore_eos=True, stop=full[4:7])
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(full[4:7])]


def test_complete_stream_ends_with_usage(tiny_engine):
    chunks = list(tiny_engine.complete_stream([2, 7, 8], max_new_tokens=5, ignore_eos=True, logprobs=2))
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    last = chunks[-1]
    assert last.finish_reason == "length" and last.usage.completion_tokens == 5
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == tiny_engine.generate_ids([[2, 7, 8]], max_new_tokens=5, ignore_eos=True)[0]
    assert len([lp for c in chunks for lp in c.logprobs]) == 5


def test_threads_sharing_one_engine_each_get_what_they_get_alone(tiny_engine):
    prompts = [f"Thread {i} says" for i in range(4)]
    kw = dict(max_new_tokens=24, ignore_eos=True)
    alone = [tiny_engine.generate(p, **kw) for p in prompts]
    results = [None] * 4
    start = threading.Barrier(4)

    def work(i):
        start.wait()
        for _ in range(3):
            results[i] = tiny_engine.generate(prompts[i], **kw)
            assert tiny_engine.last_stats.new_tokens == [24]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone


def test_two_interleaved_streams_in_one_thread_do_not_mix(tiny_engine):
    kw = dict(max_new_tokens=20, ignore_eos=True)
    a_alone = tiny_engine.generate("The quick brown", **kw)
    b_alone = tiny_engine.generate("Numbers: 0 1 2", **kw)
    a, b = tiny_engine.stream("The quick brown", **kw), tiny_engine.stream("Numbers: 0 1 2", **kw)
    a_text, b_text = "", ""
    for piece_a, piece_b in zip(a, b):
        a_text, b_text = a_text + piece_a, b_text + piece_b
    a_text += "".join(a)
    b_text += "".join(b)
    assert (a_text, b_text) == (a_alone, b_alone)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda e: e.generate_ids([[2]], repetition_penalty=0), "repetition_penalty"),
        (lambda e: e.generate_ids([[2]], presence_penalty=-0.5), "presence_penalty"),
        (lambda e: e.generate_ids([[2]], frequency_penalty=float("nan")), "frequency_penalty"),
        (lambda e: e.generate_ids([[2]], presence_penalty=1e308), "presence_penalty"),
        (lambda e: e.generate_ids([[2]], repeat_last_n=-2), "repeat_last_n"),
        (lambda e: e.generate_ids([[2]], repeat_last_n=1.5), "repeat_last_n"),
        (lambda e: e.complete([2], logprobs=21), "logprobs"),
        (lambda e: e.generate("hi", logprobs=2), "complete"),
        (lambda e: e.generate_ids([[2]], stop="x"), "stop"),
        (lambda e: e.complete([2, 3], stop="x"), "stop strings need a text prompt"),
        (lambda e: e.complete([2, 3], chat=True), "chat"),
        (lambda e: e.generate("hi", max_tokens=3), "unknown generation option"),
    ],
)
def test_nonsense_controls_are_refused_before_any_work(tiny_engine, call, message):
    with pytest.raises(InvalidArgumentError, match=message):
        call(tiny_engine)
    assert len(tiny_engine.generate_ids([[2, 5]], max_new_tokens=2, ignore_eos=True)[0]) == 2


def test_bos_comes_from_the_config_when_the_tokenizer_names_none(tmp_path):
    import sentencepiece as spm

    directory, _ = make_checkpoint(tmp_path / "oddbos", tokenizer=False, bos_token_id=5)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(directory / "tokenizer"),
        vocab_size=60, hard_vocab_limit=False, bos_id=-1, eos_id=1, pad_id=0, unk_id=3, minloglevel=2,
    )
    engine = gemmalite.load(directory, dtype="float32")
    assert engine.tokenizer.sp.bos_id() == -1
    assert engine.encode("some text")[0] == 5
    assert engine.generate("some text", max_new_tokens=3, ignore_eos=True) is not None


def test_a_tokenizer_larger_than_the_vocab_is_refused(tmp_path, tiny):
    import shutil

    directory, _ = make_checkpoint(tmp_path / "small", tokenizer=False, vocab_size=300)
    shutil.copy(tiny[0] / "tokenizer.model", directory / "tokenizer.model")  # 400 pieces
    with pytest.raises(ModelLoadError, match="400 pieces"):
        gemmalite.load(directory, dtype="float32")
