"""bf16 weights packed for oneDNN on CPU: the same model, read faster."""

import pytest
import torch
import torch.nn.functional as F

import gemmalite
from gemmalite import loading
from gemmalite.packing import PackedLinear, PackedTiedEmbedding, can_pack, weight_bytes

needs_onednn_bf16 = pytest.mark.skipif(
    not can_pack(torch.device("cpu"), torch.bfloat16), reason="this CPU or build has no oneDNN bf16 linear"
)


@needs_onednn_bf16
def test_packed_linear_computes_the_plain_linear():
    torch.manual_seed(0)
    weight = torch.randn(96, 64, dtype=torch.bfloat16)
    layer = PackedLinear(weight)
    for x in (torch.randn(1, 64, dtype=torch.bfloat16), torch.randn(2, 7, 64, dtype=torch.bfloat16)):
        got, plain = layer(x), F.linear(x, weight)
        assert got.shape == plain.shape and got.dtype == torch.bfloat16
        assert torch.allclose(got.float(), plain.float(), rtol=1e-2, atol=1e-2)


@needs_onednn_bf16
def test_bf16_on_cpu_is_packed_and_float32_is_not(tiny, tiny_engine):
    engine = gemmalite.load(tiny[0], dtype="bfloat16", device="cpu")
    assert not any(isinstance(m, torch.nn.Linear) for m in engine.model.modules())
    assert isinstance(engine.model.embed_tokens, PackedTiedEmbedding)
    assert not any(isinstance(m, PackedLinear) for m in tiny_engine.model.modules())  # float32: plain matmuls
    # A forward reads the same weights as a plain bf16 engine, two bytes each; the tied rows are
    # held twice (lookups read plain rows, the head packed ones).
    assert weight_bytes(engine.model) == weight_bytes(tiny_engine.model) // 2
    embedding = engine.model.embed_tokens
    assert embedding.head.packed_bytes == embedding.weight.numel() * 2

    ids = torch.randint(4, 400, (2, 30), generator=torch.Generator().manual_seed(3))
    got, exact = engine.logits(ids), tiny_engine.logits(ids)
    assert torch.nn.functional.cosine_similarity(got.flatten(), exact.flatten(), dim=0) > 0.999


@needs_onednn_bf16
def test_packed_engine_matches_the_plain_bf16_engine(tiny, monkeypatch):
    packed = gemmalite.load(tiny[0], dtype="bfloat16", device="cpu")
    monkeypatch.setattr(loading, "can_pack", lambda device, dtype: False)
    plain = gemmalite.load(tiny[0], dtype="bfloat16", device="cpu")
    assert any(isinstance(m, torch.nn.Linear) for m in plain.model.modules())
    ids = torch.randint(4, 400, (1, 40), generator=torch.Generator().manual_seed(4))
    a, b = packed.logits(ids), plain.logits(ids)
    assert (a - b).abs().max() < 0.05 * b.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95


@needs_onednn_bf16
def test_compiled_packed_decode_computes_what_eager_does(tiny):
    """The packed matmul runs inside the compiled graphs (as a custom op). In bf16 the compiler's
    fusions round differently, so the check is on log-probabilities, not on long greedy runs."""
    eager = gemmalite.load(tiny[0], dtype="bfloat16", device="cpu")
    compiled = gemmalite.Engine(
        eager.model, eager.tokenizer, device=eager.device, dtype=eager.dtype, compile=True, max_seq_len=eager.max_seq_len
    )
    for prompt in ([2, 33, 34, 35], [2, 7, 8, 9, 10, 11, 12], [2, 100]):
        a = eager.complete(prompt, max_new_tokens=2, ignore_eos=True, logprobs=5)
        b = compiled.complete(prompt, max_new_tokens=2, ignore_eos=True, logprobs=5)
        assert a.token_ids[0] == b.token_ids[0]  # from the prefill graph
        # The first decode step, on the same token: the same top tokens and log-probabilities.
        top_a, top_b = dict(a.top_logprobs[1]), dict(b.top_logprobs[1])
        assert len(top_a.keys() & top_b.keys()) >= 4
        assert all(abs(top_a[t] - top_b[t]) < 0.05 for t in top_a.keys() & top_b.keys())
    assert compiled.graph_count() == 1
