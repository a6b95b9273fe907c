"""config.json and generation_config.json from a GGUF's `gemma3.*` and `tokenizer.ggml.*` metadata."""

from __future__ import annotations

import numpy as np

from ..config import DEFAULT_GLOBAL_ROPE_BASE, DEFAULT_LOCAL_ROPE_BASE, DEFAULT_SLIDING_WINDOW_PATTERN
from ..errors import ModelLoadError
from .reader import field

# llama.cpp recognises the 27B by its layer count (src/llama-model.cpp, LLM_ARCH_GEMMA3).
_LAYERS_OF_27B = 62


def config_from_metadata(reader) -> dict:
    """config.json, in the shape transformers 5 writes for Gemma3TextConfig."""

    def meta(key, default=...):
        return field(reader, f"gemma3.{key}", default)

    hidden = int(meta("embedding_length"))
    layers = int(meta("block_count"))
    heads = int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", hidden // heads))

    # vocab_size is the embedding's row count; the tokenizer is checked against it later.
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ModelLoadError("the GGUF has no token_embd.weight tensor")

    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": int(embed.shape[-1]),  # GGUF dims run innermost first: [hidden, vocab]
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        # llama.cpp: the 27B scales queries by hidden/heads (168), every other size by head_dim.
        "query_pre_attn_scalar": hidden // heads if layers == _LAYERS_OF_27B else head_dim,
        "sliding_window": int(meta("attention.sliding_window", 4096)),
        "layer_types": _layer_types(meta("attention.sliding_window_pattern", DEFAULT_SLIDING_WINDOW_PATTERN), layers),
        "rope_parameters": _rope_parameters(meta),
        "rms_norm_eps": _clean_float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(meta("context_length", 32_768)),
        "bos_token_id": int(field(reader, "tokenizer.ggml.bos_token_id", 2)),
        "eos_token_id": int(field(reader, "tokenizer.ggml.eos_token_id", 1)),
        "pad_token_id": int(field(reader, "tokenizer.ggml.padding_token_id", 0)),
        "tie_word_embeddings": True,
        "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_bidirectional_attention": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": "float32",
    }


def generation_config(config: dict, model_proto) -> dict:
    """Token ids only; eos is both the file's eos and <end_of_turn>, as Google's checkpoints list."""
    eos = [config["eos_token_id"]]
    end_of_turn = next((i for i, p in enumerate(model_proto.pieces) if p.piece == "<end_of_turn>"), None)
    if end_of_turn is not None and end_of_turn not in eos:
        eos.append(end_of_turn)
    return {"bos_token_id": config["bos_token_id"], "eos_token_id": eos, "pad_token_id": config["pad_token_id"]}


def _layer_types(pattern, layers: int) -> list[str]:
    if isinstance(pattern, list):  # newer files may list, per layer, whether it is sliding
        sliding = [bool(x) for x in pattern]
    else:  # every pattern-th layer is global
        sliding = [bool((i + 1) % int(pattern)) for i in range(layers)]
    return ["sliding_attention" if s else "full_attention" for s in sliding]


def _rope_parameters(meta) -> dict:
    full = {"rope_type": "default", "rope_theta": _clean_float(meta("rope.freq_base", DEFAULT_GLOBAL_ROPE_BASE))}
    # The 4B/12B/27B stretch global-layer positions linearly (factor 8); sliding layers never.
    if meta("rope.scaling.type", None) == "linear" and meta("rope.scaling.factor", None):
        full.update(rope_type="linear", factor=_clean_float(meta("rope.scaling.factor")))
    local = {"rope_type": "default", "rope_theta": _clean_float(meta("rope.freq_base_swa", DEFAULT_LOCAL_ROPE_BASE))}
    return {"full_attention": full, "sliding_attention": local}


def _clean_float(value) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999997e-07 -> 1e-06)."""
    return float(str(np.float32(value)))
