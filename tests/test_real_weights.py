"""The real Gemma 3 270M (Q4_K_M GGUF) through gemmalite, against transformers reading the same file.

fp32 on both sides: logits close and greedy tokens equal token for token, including a prompt
longer than the 512-token sliding window, and a batch.
"""

import pytest
import torch

import gemmalite

from conftest import reference_greedy

STORY = (
    "The lighthouse keeper had lived on the island for thirty years. Every evening he climbed the "
    "spiral stairs, trimmed the wick, and watched the ships pass along the dark coast. "
)


@pytest.fixture(scope="module")
def engine(real_270m_dir):
    return gemmalite.load(real_270m_dir, dtype="float32", max_seq_len=2048)


@pytest.fixture(scope="module")
def long_prompt(engine):
    ids = engine.tokenizer.encode(STORY * 20 + "One night, a storm", bos=True)
    assert len(ids) > 600  # past the 512-token window
    return ids


def test_logits_match_transformers(engine, real_270m_reference, long_prompt):
    ids = torch.tensor([long_prompt[:700]])
    with torch.no_grad():
        expected = real_270m_reference(ids).logits
    got = engine.logits(ids)
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=1e-3)


def test_greedy_matches_transformers_on_a_short_prompt(engine, real_270m_reference):
    prompt = engine.tokenizer.encode("The capital of France is", bos=True)
    got = engine.generate_ids([prompt], max_new_tokens=24, ignore_eos=True)[0]
    assert got == reference_greedy(real_270m_reference, prompt, 24)


def test_greedy_matches_transformers_past_the_window(engine, real_270m_reference, long_prompt):
    got = engine.generate_ids([long_prompt], max_new_tokens=16, ignore_eos=True)[0]
    assert got == reference_greedy(real_270m_reference, long_prompt, 16)


def test_batched_rows_match_single_rows(engine, long_prompt):
    short = engine.tokenizer.encode("def fibonacci(n):", bos=True)
    batched = engine.generate_ids([short, long_prompt], max_new_tokens=12, ignore_eos=True)
    assert batched[0] == engine.generate_ids([short], max_new_tokens=12, ignore_eos=True)[0]
    assert batched[1] == engine.generate_ids([long_prompt], max_new_tokens=12, ignore_eos=True)[0]


def test_text_round_trip_and_stream(engine):
    text = engine.generate("The three primary colours are", max_new_tokens=20, ignore_eos=True)
    assert text.strip()
    assert "".join(engine.stream("The three primary colours are", max_new_tokens=20, ignore_eos=True)) == text


def test_bf16_logits_stay_finite_and_close_to_fp32(real_270m_dir, engine, long_prompt):
    bf16 = gemmalite.load(real_270m_dir, dtype="bfloat16", max_seq_len=2048)
    ids = torch.tensor([long_prompt[:700]])
    low, high = bf16.logits(ids), engine.logits(ids)
    assert torch.isfinite(low).all()
    agree = (low.argmax(-1) == high.argmax(-1)).float().mean().item()
    assert agree > 0.9, agree
