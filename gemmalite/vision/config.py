"""What the vision part of a checkpoint is: the tower's shape, the projector's, the image tokens.

Read from a multimodal config.json (`Gemma3ForConditionalGeneration`): `vision_config`, with
`mm_tokens_per_image` and the three image token ids at the top level. A text-only config has
none of it, and `VisionConfig.from_hf` returns None.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelLoadError


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int  # the tower's width (1152 for Gemma 3)
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int  # images are resized to image_size x image_size (896)
    patch_size: int  # (14): image_size / patch_size patches per side
    layer_norm_eps: float
    text_hidden_size: int  # what the projector maps to
    tokens_per_image: int  # soft tokens per image after pooling (256): a square number
    image_token_id: int  # the placeholder each soft token replaces (262144)
    start_of_image_id: int  # <start_of_image> (255999)
    end_of_image_id: int  # <end_of_image> (256000)

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_side(self) -> int:
        return round(self.tokens_per_image**0.5)

    @property
    def pool(self) -> int:
        """The average-pooling kernel (and stride) that turns patches into soft tokens (4 for 64 -> 16)."""
        return self.patches_per_side // self.tokens_per_side

    @classmethod
    def from_hf(cls, raw: dict, text_hidden_size: int) -> "VisionConfig | None":
        vision = raw.get("vision_config") if isinstance(raw, dict) else None
        if not vision:
            return None
        try:
            config = cls(
                hidden_size=int(vision.get("hidden_size", 1152)),
                intermediate_size=int(vision.get("intermediate_size", 4304)),
                num_layers=int(vision.get("num_hidden_layers", 27)),
                num_heads=int(vision.get("num_attention_heads", 16)),
                image_size=int(vision.get("image_size", 896)),
                patch_size=int(vision.get("patch_size", 14)),
                layer_norm_eps=float(vision.get("layer_norm_eps", 1e-6)),
                text_hidden_size=text_hidden_size,
                tokens_per_image=int(raw.get("mm_tokens_per_image") or 256),
                image_token_id=int(raw.get("image_token_index", raw.get("image_token_id", 262_144))),
                start_of_image_id=int(raw.get("boi_token_index", raw.get("boi_token_id", 255_999))),
                end_of_image_id=int(raw.get("eoi_token_index", raw.get("eoi_token_id", 256_000))),
            )
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"config.json has an unreadable vision_config: {e}") from None
        act = vision.get("hidden_act", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu_new"):
            raise ModelLoadError(f"config.json's vision tower uses {act!r}; Gemma 3's SigLIP uses tanh GELU")
        side, pool = config.tokens_per_side, config.patches_per_side
        if (
            side * side != config.tokens_per_image
            or config.image_size % config.patch_size
            or pool % side
            or config.hidden_size % config.num_heads
        ):
            raise ModelLoadError(
                f"config.json's vision shapes do not fit together: {config.image_size}px images in "
                f"{config.patch_size}px patches cannot be pooled to {config.tokens_per_image} tokens "
                "(a square number whose side divides the patches per side)"
            )
        return config
