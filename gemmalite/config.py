"""The one configuration the model sees: a frozen dataclass, with named presets.

Foreign config shapes stop here. `GemmaConfig.from_hf` reads both shapes of transformers'
config.json that exist for Gemma 3:

- transformers 5: `layer_types` and `rope_parameters` keyed by layer type;
- the older one on the Hub: `rope_theta`, `rope_local_base_freq`, `rope_scaling` and
  `sliding_window_pattern`.

Multimodal checkpoints (`Gemma3ForConditionalGeneration`) nest the text part under
`text_config`; only that part is read. Unknown keys are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ModelLoadError

# Gemma 3 constants that config files leave implicit.
DEFAULT_LOCAL_ROPE_BASE = 10_000.0
DEFAULT_GLOBAL_ROPE_BASE = 1_000_000.0
DEFAULT_SLIDING_WINDOW_PATTERN = 6  # five sliding layers, then one global


@dataclass(frozen=True)
class GemmaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    query_pre_attn_scalar: float
    sliding_window: int
    # One flag per layer: True for a sliding-window layer, False for a global one.
    sliding_layers: tuple[bool, ...]
    rope_local_base: float = DEFAULT_LOCAL_ROPE_BASE
    rope_global_base: float = DEFAULT_GLOBAL_ROPE_BASE
    # Linear RoPE scaling factor (positions divided by it); global layers only.
    rope_global_scale: float = 1.0
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    max_position_embeddings: int = 32_768
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1,)
    pad_token_id: int = 0

    def __post_init__(self):
        if len(self.sliding_layers) != self.num_layers:
            raise ModelLoadError(
                f"config has {len(self.sliding_layers)} layer types for {self.num_layers} layers"
            )
        special = (self.bos_token_id, *self.eos_token_ids)
        if not all(0 <= i < self.vocab_size for i in special):
            raise ModelLoadError(
                f"config.json's bos/eos token ids {list(special)} must lie in [0, vocab_size={self.vocab_size})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @property
    def embed_scale(self) -> float:
        return self.hidden_size**0.5

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_hf(cls, raw: dict) -> "GemmaConfig":
        """Build from a transformers config.json dict (either shape, text or multimodal)."""
        if not isinstance(raw, dict):
            raise ModelLoadError("config.json does not hold a JSON object")
        model_type = raw.get("model_type")
        if "text_config" in raw:
            if model_type not in (None, "gemma3"):
                raise _not_gemma3(model_type)
            text = dict(raw["text_config"] or {})
            text.setdefault("model_type", "gemma3_text")
            # Multimodal configs keep the token ids at the top level.
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if key not in text and key in raw:
                    text[key] = raw[key]
            # The 4B/12B/27B text configs on the Hub omit the vocab; it is 262208 there.
            text.setdefault("vocab_size", 262_208)
            raw = text
            model_type = raw["model_type"]
        if model_type not in ("gemma3_text", "gemma3"):
            raise _not_gemma3(model_type)

        required = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        )
        missing = [k for k in required if k not in raw]
        if missing:
            raise ModelLoadError(f"config.json is missing required Gemma 3 fields: {', '.join(missing)}")

        num_layers = int(raw["num_hidden_layers"])
        heads = int(raw["num_attention_heads"])
        head_dim = int(raw.get("head_dim") or raw["hidden_size"] // heads)

        layer_types = raw.get("layer_types")
        if layer_types is None:
            pattern = int(raw.get("sliding_window_pattern") or DEFAULT_SLIDING_WINDOW_PATTERN)
            sliding = tuple(bool((i + 1) % pattern) for i in range(num_layers))
        else:
            unknown = set(layer_types) - {"sliding_attention", "full_attention"}
            if unknown:
                raise ModelLoadError(f"config.json has unknown layer types: {sorted(unknown)}")
            sliding = tuple(t == "sliding_attention" for t in layer_types)

        local_base, global_base, global_scale = _rope_settings(raw)
        eos = raw.get("eos_token_id", 1)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        return cls(
            vocab_size=int(raw.get("vocab_size", 262_144)),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=int(raw["num_key_value_heads"]),
            head_dim=head_dim,
            query_pre_attn_scalar=float(raw.get("query_pre_attn_scalar", head_dim)),
            sliding_window=int(raw.get("sliding_window") or 4096),
            sliding_layers=sliding,
            rope_local_base=local_base,
            rope_global_base=global_base,
            rope_global_scale=global_scale,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            final_logit_softcapping=raw.get("final_logit_softcapping"),
            attn_logit_softcapping=raw.get("attn_logit_softcapping"),
            max_position_embeddings=int(raw.get("max_position_embeddings", 32_768)),
            bos_token_id=int(raw.get("bos_token_id", 2) if raw.get("bos_token_id") is not None else 2),
            eos_token_ids=eos_ids,
            pad_token_id=int(raw.get("pad_token_id") or 0),
        )


def _not_gemma3(model_type) -> ModelLoadError:
    return ModelLoadError(
        f"this is not a Gemma 3 checkpoint (model_type {model_type!r}); "
        "gemmalite runs Gemma 3 only (model_type 'gemma3_text' or 'gemma3')"
    )


def _rope_settings(raw: dict) -> tuple[float, float, float]:
    """(local base, global base, global linear scale) from either config shape."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        full = params.get("full_attention") or {}
        local = params.get("sliding_attention") or {}
        scale = _linear_factor(full)
        return (
            float(local.get("rope_theta", DEFAULT_LOCAL_ROPE_BASE)),
            float(full.get("rope_theta", DEFAULT_GLOBAL_ROPE_BASE)),
            scale,
        )
    # Older shape: one rope_theta (global), rope_local_base_freq, and rope_scaling for global layers.
    scaling = raw.get("rope_scaling") or (params if isinstance(params, dict) else None) or {}
    return (
        float(raw.get("rope_local_base_freq", DEFAULT_LOCAL_ROPE_BASE)),
        float(raw.get("rope_theta", DEFAULT_GLOBAL_ROPE_BASE)),
        _linear_factor(scaling),
    )


def _linear_factor(rope: dict) -> float:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in (None, "default"):
        return 1.0
    if kind == "linear":
        return float(rope.get("factor", 1.0))
    raise ModelLoadError(f"unsupported RoPE type {kind!r}; Gemma 3 uses 'default' or 'linear'")


# ---------------------------------------------------------------------- presets
def _preset(hidden, inter, layers, heads, kv_heads, head_dim, window, *, scalar=256, scale=1.0, vocab=262_144):
    return GemmaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        query_pre_attn_scalar=scalar,
        sliding_window=window,
        sliding_layers=tuple(bool((i + 1) % DEFAULT_SLIDING_WINDOW_PATTERN) for i in range(layers)),
        rope_global_scale=scale,
        max_position_embeddings=32_768 if hidden <= 1152 else 131_072,
    )


def gemma3_270m() -> GemmaConfig:
    return _preset(640, 2048, 18, 4, 1, 256, 512)


def gemma3_1b() -> GemmaConfig:
    return _preset(1152, 6912, 26, 4, 1, 256, 512)


def gemma3_4b() -> GemmaConfig:
    return _preset(2560, 10240, 34, 8, 4, 256, 1024, scale=8.0, vocab=262_208)


def gemma3_12b() -> GemmaConfig:
    return _preset(3840, 15360, 48, 16, 8, 256, 1024, scale=8.0, vocab=262_208)


def gemma3_27b() -> GemmaConfig:
    return _preset(5376, 21504, 62, 32, 16, 128, 1024, scalar=168, scale=8.0, vocab=262_208)


PRESETS = {
    "270m": gemma3_270m,
    "1b": gemma3_1b,
    "4b": gemma3_4b,
    "12b": gemma3_12b,
    "27b": gemma3_27b,
}
