"""int8 weights: close to the float model, and honest about what they cost."""

import pytest
import torch

import gemmalite
from gemmalite.errors import InvalidArgumentError
from gemmalite.quantize import Int8Linear, Int8TiedEmbedding, _int8_rows


def test_int8_linear_error_is_within_quantization_bounds():
    torch.manual_seed(0)
    weight = torch.randn(96, 64)
    x = torch.randn(5, 64)
    layer = Int8Linear(_int8_rows(weight))
    got, exact = layer(x), x @ weight.T
    # Weight error <= scale/2 per element; activations are quantized per call to 7-8 bits.
    bound = (x.abs().sum(-1, keepdim=True) * weight.abs().amax(1) / 254) + exact.abs() * 0.05 + 0.05
    assert (got - exact).abs().le(bound).all()
    assert not torch.equal(got, exact)


def test_int8_embedding_rows_dequantize_to_the_weights():
    torch.manual_seed(1)
    weight = torch.randn(50, 16)
    emb = Int8TiedEmbedding(weight)
    rows = emb(torch.tensor([[3, 7, 49]]))
    step = weight.abs().amax(1)[[3, 7, 49]] / 127
    assert ((rows[0] - weight[[3, 7, 49]]).abs() <= step[:, None] / 2 + 1e-6).all()


def test_int8_engine_tracks_the_float_engine(tiny, tiny_engine):
    engine = gemmalite.load(tiny[0], quantize="int8", dtype="float32")
    assert any(isinstance(m, Int8Linear) for m in engine.model.modules())
    assert all(not isinstance(b.mlp.down_proj, Int8Linear) for b in engine.model.layers)  # kept in float
    ids = torch.randint(4, 400, (2, 30), generator=torch.Generator().manual_seed(3))
    got, exact = engine.logits(ids), tiny_engine.logits(ids)
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), exact.flatten(), dim=0)
    assert cosine > 0.99
    assert len(engine.generate_ids([[2, 5, 6]], max_new_tokens=20, ignore_eos=True)[0]) == 20


def test_int8_on_real_weights_keeps_most_top1_predictions(real_270m_dir):
    bf16 = gemmalite.load(real_270m_dir, dtype="bfloat16", max_seq_len=512)
    int8 = gemmalite.load(real_270m_dir, quantize="int8", max_seq_len=512)
    ids = torch.tensor([bf16.tokenizer.encode("The lighthouse keeper had lived on the island for thirty years. " * 4)])
    p, q = torch.log_softmax(bf16.logits(ids), -1), torch.log_softmax(int8.logits(ids), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    agree = (p.argmax(-1) == q.argmax(-1)).float().mean().item()
    assert kl < 0.2 and agree > 0.7, (kl, agree)


@pytest.mark.parametrize("kwargs, message", [(dict(quantize="int4"), "unknown quantize"), (dict(quantize=True), "unknown quantize")])
def test_bad_quantize_values(tiny, kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message):
        gemmalite.load(tiny[0], **kwargs)


def test_compiled_int8_decode_equals_eager_int8(tiny):
    """fbgemm's matmul runs inside the compiled graph (as a custom op) with the same results."""
    eager = gemmalite.load(tiny[0], quantize="int8", dtype="float32")
    compiled = gemmalite.Engine(
        eager.model, eager.tokenizer, device=eager.device, dtype=eager.dtype, compile=True, max_seq_len=eager.max_seq_len
    )
    prompt = [[2, 33, 34, 35]]
    assert compiled.generate_ids(prompt, max_new_tokens=40, ignore_eos=True) == eager.generate_ids(
        prompt, max_new_tokens=40, ignore_eos=True
    )
    assert compiled.graph_count() == 1
