"""Sessions append turns to a live cache; their tokens must equal generation from scratch."""

import pytest
import torch

from gemmalite.errors import ContextLengthError

from conftest import reference_greedy

W = 8  # the tiny model's sliding window


def turn(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 400, (n,), generator=g).tolist()


def from_scratch(engine, transcript, n):
    return engine.generate_ids([transcript], max_new_tokens=n, ignore_eos=True)[0]


@pytest.mark.parametrize("sizes", [[1, 3, W - 1, W, W + 1, 5 * W], [5 * W, 1, 1, W + 1, 3]], ids=["growing", "mixed"])
def test_session_turns_equal_generation_from_scratch(tiny_engine, sizes):
    session = tiny_engine.session(chat=False)
    for i, size in enumerate(sizes):
        ids = ([2] if i == 0 else []) + turn(size, seed=i)
        transcript = session.tokens + ids
        reply = session.send_ids(ids, max_new_tokens=5, ignore_eos=True)
        assert reply == from_scratch(tiny_engine, transcript, 5), f"turn {i} of {size} tokens"
        assert session.tokens == transcript + reply
    # The cache holds everything but the last reply token, which the next turn feeds first.
    assert int(session.cache.lengths[0]) == len(session.tokens) - 1


def test_session_matches_transformers_after_many_ring_wraps(tiny, tiny_engine):
    _, reference = tiny
    session = tiny_engine.session(chat=False)
    session.send_ids([2] + turn(3, seed=1), max_new_tokens=60, ignore_eos=True)  # ~8 wraps while decoding
    session.send_ids(turn(2 * W + 3, seed=2), max_new_tokens=40, ignore_eos=True)
    transcript = session.tokens
    reply = session.send_ids(turn(W, seed=3), max_new_tokens=30, ignore_eos=True)
    assert reply == reference_greedy(reference, transcript + turn(W, seed=3), 30)


def test_chat_session_templates_each_turn(tiny_engine):
    session = tiny_engine.session(system="Be brief.")
    session.send("hello", max_new_tokens=4)
    session.send("again", max_new_tokens=4)
    text = tiny_engine.tokenizer.decode(session.tokens)
    assert text.startswith("<start_of_turn>user\nBe brief.\n\nhello<end_of_turn>\n<start_of_turn>model\n")
    assert "<start_of_turn>user\nagain<end_of_turn>\n<start_of_turn>model\n" in text
    assert text.count("Be brief.") == 1
    # The reply after the template matches a fresh engine on the same ids.
    transcript = session.tokens
    reply_text = session.send("third", max_new_tokens=6, ignore_eos=True)
    ids = session.tokens[len(transcript) :]
    assert reply_text == tiny_engine.decode(ids[-6:])


def test_fork_branches_independently(tiny_engine):
    session = tiny_engine.session(chat=False)
    session.send_ids([2] + turn(12, seed=4), max_new_tokens=6, ignore_eos=True)
    branch = session.fork()
    a = session.send_ids(turn(5, seed=5), max_new_tokens=8, ignore_eos=True)
    b = branch.send_ids(turn(9, seed=6), max_new_tokens=8, ignore_eos=True)
    assert a == from_scratch(tiny_engine, session.tokens[: -len(a)], 8)
    assert b == from_scratch(tiny_engine, branch.tokens[: -len(b)], 8)
    assert session.tokens[:19] == branch.tokens[:19] and session.tokens != branch.tokens


def test_reset_clears_the_conversation(tiny_engine):
    session = tiny_engine.session(chat=False)
    first = session.send_ids([2, 9, 10], max_new_tokens=5, ignore_eos=True)
    session.send_ids(turn(20, seed=7), max_new_tokens=5, ignore_eos=True)
    session.reset()
    assert session.tokens == [] and int(session.cache.lengths[0]) == 0
    assert session.send_ids([2, 9, 10], max_new_tokens=5, ignore_eos=True) == first


def test_a_turn_past_max_seq_len_fails_clearly_and_keeps_the_session(tiny):
    import gemmalite

    engine = gemmalite.load(tiny[0], dtype="float32", max_seq_len=48)
    session = engine.session(chat=False)
    session.send_ids([2] + turn(20, seed=8), max_new_tokens=5, ignore_eos=True)
    before = session.tokens
    with pytest.raises(ContextLengthError, match=r"only 21 left"):
        session.send_ids(turn(30, seed=9), max_new_tokens=5)
    assert session.tokens == before
    reply = session.send_ids(turn(4, seed=10), max_new_tokens=3, ignore_eos=True)
    assert reply == from_scratch(engine, session.tokens[:-3], 3)


def test_stopping_a_reply_early_keeps_the_session_exact(tiny_engine):
    session = tiny_engine.session()
    pieces = session.stream("tell me a story", max_new_tokens=50, ignore_eos=True)
    next(pieces)
    next(pieces)
    pieces.close()  # what Ctrl-C in the chat CLI does
    transcript = session.tokens
    reply = session.send_ids(turn(3, seed=11), max_new_tokens=6, ignore_eos=True)
    assert reply == from_scratch(tiny_engine, transcript + turn(3, seed=11), 6)


def test_compiled_sessions_keep_a_bounded_number_of_graphs(compiled_engine, tiny_engine):
    compiled_engine.generate_ids([[2, 3]], max_new_tokens=3)  # make sure the greedy graph exists
    graphs = compiled_engine.graph_count()
    session = compiled_engine.session(chat=False)
    for i, size in enumerate([1, W, 5 * W, 3]):
        ids = ([2] if i == 0 else []) + turn(size, seed=20 + i)
        transcript = session.tokens + ids
        assert session.send_ids(ids, max_new_tokens=4, ignore_eos=True) == from_scratch(tiny_engine, transcript, 4)
    assert compiled_engine.graph_count() == graphs
