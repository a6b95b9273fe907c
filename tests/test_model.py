"""The model's logits against transformers in fp32, across Gemma 3's configuration space."""

import dataclasses
import json

import pytest
import torch

import gemmalite
from gemmalite.config import GemmaConfig, PRESETS
from gemmalite.errors import ModelLoadError

from conftest import make_checkpoint

VARIANTS = {
    "gqa": {},
    "mqa": dict(num_key_value_heads=1),
    "mha_scalar_equals_head_dim": dict(num_key_value_heads=4, query_pre_attn_scalar=16),
    "linear_global_rope": dict(
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        }
    ),
    "final_softcapping": dict(final_logit_softcapping=3.0),
}


@pytest.mark.parametrize("old_shape", [False, True], ids=["transformers5_config", "hub_config"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(tmp_path, variant, old_shape):
    directory, reference = make_checkpoint(tmp_path, tokenizer=False, old_config_shape=old_shape, **VARIANTS[variant])
    engine = gemmalite.load(directory, dtype="float32", compile=False)
    torch.manual_seed(1)
    ids = torch.randint(0, 400, (2, 40))  # 40 tokens: five times the sliding window
    with torch.no_grad():
        expected = reference(ids).logits
    got = engine.logits(ids)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_old_and_new_config_shapes_give_the_same_config(tmp_path):
    new_dir, _ = make_checkpoint(tmp_path / "new", tokenizer=False, **VARIANTS["linear_global_rope"])
    old_dir, _ = make_checkpoint(tmp_path / "old", tokenizer=False, old_config_shape=True, **VARIANTS["linear_global_rope"])
    new = GemmaConfig.from_hf(json.loads((new_dir / "config.json").read_text()))
    old = GemmaConfig.from_hf(json.loads((old_dir / "config.json").read_text()))
    assert new == old
    assert new.rope_global_scale == 8.0 and new.rope_local_base == 10_000.0 and new.rope_global_base == 1_000_000.0
    assert new.sliding_layers == (True, True, True, True, True, False, True)


def test_multimodal_config_reads_the_text_part():
    raw = {
        "model_type": "gemma3",
        "architectures": ["Gemma3ForConditionalGeneration"],
        "eos_token_id": [1, 106],
        "text_config": {
            "model_type": "gemma3_text",
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "num_hidden_layers": 34,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "query_pre_attn_scalar": 256,
            "sliding_window": 1024,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "rope_theta": 1_000_000.0,
            "rope_local_base_freq": 10_000.0,
        },
        "vision_config": {"model_type": "siglip_vision_model"},
    }
    cfg = GemmaConfig.from_hf(raw)
    assert cfg == dataclasses.replace(PRESETS["4b"](), eos_token_ids=(1, 106), max_position_embeddings=cfg.max_position_embeddings)
    assert cfg.vocab_size == 262_208


def test_multimodal_checkpoint_loads_its_text_weights(tmp_path):
    """Weights under `language_model.model.` with vision tensors beside them load as the text model."""
    from safetensors.torch import load_file, save_file

    directory, reference = make_checkpoint(tmp_path, tokenizer=False)
    tensors = load_file(directory / "model.safetensors")
    renamed = {"language_model." + k: v for k, v in tensors.items()}
    renamed["vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(2, 3)
    renamed["multi_modal_projector.mm_input_projection_weight"] = torch.zeros(2, 2)
    save_file(renamed, directory / "model.safetensors")
    text = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text}))
    engine = gemmalite.load(directory, dtype="float32")
    ids = torch.randint(0, 400, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(engine.logits(ids), reference(ids).logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_non_gemma3_configs_are_refused(model_type):
    with pytest.raises(ModelLoadError, match="not a Gemma 3"):
        GemmaConfig.from_hf({"model_type": model_type, "hidden_size": 8})


def test_bf16_embedding_scale_is_rounded_like_the_reference(tmp_path):
    """sqrt(hidden) is cast to bf16 before the multiply: the first layer's input is bit-identical."""
    directory, reference = make_checkpoint(tmp_path, tokenizer=False, hidden_size=40)  # sqrt(40) is not a bf16
    engine = gemmalite.load(directory, dtype="bfloat16")
    reference = reference.to(torch.bfloat16)
    seen = {}

    def capture(key):
        def hook(module, args, kwargs):
            seen[key] = (args[0] if args else kwargs["hidden_states"]).clone()
        return hook

    handles = [
        engine.model.layers[0].register_forward_pre_hook(capture("ours"), with_kwargs=True),
        reference.model.layers[0].register_forward_pre_hook(capture("reference"), with_kwargs=True),
    ]
    ids = torch.arange(5, 25)[None]
    try:
        with torch.no_grad():
            engine.logits(ids)
            reference(ids)
    finally:
        for h in handles:
            h.remove()
    assert seen["ours"].dtype == torch.bfloat16
    assert torch.equal(seen["ours"], seen["reference"])
    # Scaling in float32 and rounding afterwards would differ: the cast order matters.
    unrounded = (engine.model.embed_tokens.weight[ids].float() * 40**0.5).to(torch.bfloat16)
    assert not torch.equal(unrounded, seen["ours"])


def test_attention_softcapping_is_applied(tmp_path):
    """transformers' Gemma 3 ignores attn_logit_softcapping; gemmalite honours it.

    A huge cap is the identity, so the soft-capped path must then equal the SDPA path; a small
    cap must change the output.
    """
    directory, _ = make_checkpoint(tmp_path, tokenizer=False)
    plain = gemmalite.load(directory, dtype="float32")
    ids = torch.randint(0, 400, (2, 30))
    expected = plain.logits(ids)
    config = json.loads((directory / "config.json").read_text())
    for cap, same in ((1e6, True), (0.5, False)):
        (directory / "config.json").write_text(json.dumps({**config, "attn_logit_softcapping": cap}))
        capped = gemmalite.load(directory, dtype="float32").logits(ids)
        assert torch.allclose(capped, expected, atol=1e-5) == same
