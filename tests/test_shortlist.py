"""A draft model's shortlisted head: the listed tokens' logits are the whole head's, the rest -inf,
the transcript's own tokens join the list, and speculation with it still gives plain decoding's tokens."""

from __future__ import annotations

import pytest
import torch

import gemmalite
from gemmalite import InvalidArgumentError
from gemmalite import speculative
from gemmalite.shortlist import ShortlistHead, frequent_tokens

from conftest import MARGIN
from test_speculative import OTHER, REPEATING, SAMPLED, AlwaysDraft, plain_and_speculative

SHORT = 96  # of the tiny tokenizer's 400 pieces: 72 fixed, 24 spare


@pytest.fixture(autouse=True)
def rounds_always_draft(monkeypatch):
    monkeypatch.setattr(speculative, "Pace", AlwaysDraft)


def load_tiny(path, **options):
    return gemmalite.load(path, dtype="float32", compile=False, max_seq_len=1024, rewind_margin=MARGIN, **options)


@pytest.fixture(scope="module", params=[None, "int8"], ids=["float", "int8"])
def shortlisted(request, tiny):
    return load_tiny(tiny[0], quantize=request.param, shortlist=SHORT)


def whole_head_logits(tiny, quantize, hidden):
    whole = load_tiny(tiny[0], quantize=quantize)
    if quantize is None:
        return hidden @ whole.model.embed_tokens.weight.T
    return whole.model.embed_tokens.head(hidden)  # the int8 rows, before the engine's rescoring


def test_listed_logits_are_the_whole_heads_and_the_rest_are_minus_infinity(shortlisted, tiny):
    head = shortlisted.model.embed_tokens.head
    assert isinstance(head, ShortlistHead)
    hidden = torch.randn(2, 3, shortlisted.config.hidden_size)
    logits = shortlisted.model.embed_tokens.attend(hidden)
    whole = whole_head_logits(tiny, "int8" if head.rows is not None else None, hidden)
    listed = torch.zeros(logits.shape[-1], dtype=torch.bool)
    listed[head.ids] = True
    assert 8 < int(listed.sum()) < logits.shape[-1]
    torch.testing.assert_close(logits[..., listed], whole[..., listed], rtol=1e-5, atol=1e-5)
    assert torch.isneginf(logits[..., ~listed]).all()


def test_the_transcripts_tokens_join_the_list_with_the_whole_heads_logit(shortlisted, tiny):
    head = shortlisted.model.embed_tokens.head
    vocab = shortlisted.tokenizer.vocab_size
    missing = [t for t in range(vocab) if t not in set(head.ids.tolist())][:5]
    assert missing
    head.include(missing)
    hidden = torch.randn(1, 1, shortlisted.config.hidden_size)
    logits = shortlisted.model.embed_tokens.attend(hidden)
    whole = whole_head_logits(tiny, "int8" if head.rows is not None else None, hidden)
    torch.testing.assert_close(logits[..., missing], whole[..., missing], rtol=1e-5, atol=1e-5)
    # More new tokens than spare rows: the latest stay listed, the oldest spares give way.
    spare = len(head.ids) - head.fixed
    others = [t for t in range(vocab) if t not in set(head.ids.tolist())][: spare + 3]
    head.include(others)
    assert set(others[-spare:]) <= set(head.ids.tolist())
    assert head.listed == set(head.ids.tolist())


def test_the_likeliest_tokens_come_first(tiny_engine):
    sp = tiny_engine.tokenizer.sp
    ranked = frequent_tokens(sp, 60)
    assert len(ranked) == len(set(ranked)) == 60
    assert 1 in ranked[:5]  # <eos>, a control token, always
    assert not any(sp.is_byte(t) for t in ranked)
    pieces = [sp.id_to_piece(t) for t in ranked if not sp.is_control(t)]
    merges = [t for t in ranked if len(sp.id_to_piece(t)) > 1 and not sp.is_control(t)]
    assert all(len(p) == 1 for p in pieces[: len(pieces) - len(merges)])  # characters, then merges
    assert merges == sorted(merges)  # merges in the order they were learned


# Sampled, the random tiny model spreads its choices over the whole vocabulary, so a list of 96
# would rarely hold them: it lists most of it, so that drafts are accepted there too.
@pytest.mark.parametrize("sampling, size", [({}, SHORT), (SAMPLED, 360)], ids=["greedy", "sampled"])
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_a_shortlisted_draft_gives_plain_decodings_tokens(tiny, quantize, sampling, size):
    draft = load_tiny(tiny[0], quantize=quantize, shortlist=size)
    engine = load_tiny(tiny[0], draft=draft)
    plain, spec, stats = plain_and_speculative(
        engine, [REPEATING, OTHER], speculative="draft", max_new_tokens=24, ignore_eos=True, **sampling
    )
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
    assert sum(stats.accepted_tokens) > 0  # the draft is the target's own model: often right


def test_a_draft_loaded_from_a_source_is_shortlisted_by_default_when_its_vocabulary_is_larger(tiny, monkeypatch):
    from gemmalite import loading

    monkeypatch.setattr(loading, "DEFAULT_SHORTLIST", SHORT)
    engine = load_tiny(tiny[0], draft=tiny[0])
    assert isinstance(engine.draft.model.embed_tokens.head, ShortlistHead)
    monkeypatch.setattr(loading, "DEFAULT_SHORTLIST", 10**6)  # past the vocabulary: the whole head
    engine = load_tiny(tiny[0], draft=tiny[0])
    assert not isinstance(getattr(engine.draft.model.embed_tokens, "head", None), ShortlistHead)
    assert load_tiny(tiny[0], shortlist=10**6).model.embed_tokens.attend(torch.zeros(1, 64)).isfinite().all()


@pytest.mark.parametrize("bad", [0, 3, True, 2.5, "many"])
def test_a_bad_shortlist_is_refused(tiny, bad):
    with pytest.raises(InvalidArgumentError, match="shortlist"):
        load_tiny(tiny[0], shortlist=bad)


def test_the_cli_drafts_with_a_shortlisted_int8_draft_and_gives_plain_output(capsys, tiny, tiny_engine):
    from gemmalite import cli

    base = ["--model", tiny[0], "--dtype", "float32", "--device", "cpu", "--no-compile", "--temperature", "0", "-n", 16]
    args = [str(a) for a in ["def add(a, b):", *base]]
    assert cli.main(args) == 0
    plain = capsys.readouterr().out
    assert cli.main([*args, "--draft", str(tiny[0]), "--draft-quantize", "int8", "--draft-shortlist", str(SHORT)]) == 0
    out, err = capsys.readouterr()
    assert out == plain
    assert "drafts accepted" in err
    assert cli.main([*args, "--draft", str(tiny[0]), "--draft-shortlist", "-5"]) == 2
    assert "shortlist" in capsys.readouterr().err
