"""Image input for Gemma 3's 4B, 12B and 27B: the SigLIP tower, the projector and preprocessing.

The text model does not know about images. It takes embeddings with the image features merged
in, and for each query the span of the image it belongs to (see mask.py); the runner feeds an
image's tokens in one prefill chunk. Everything else lives here:

- `config.py`: the vision part of config.json;
- `tower.py`: the SigLIP encoder and the projector (pixels -> soft tokens);
- `images.py`: reading images (Pillow) and their pixel values;
- `prompt.py`: image markers in prompts, expanded to each image's block of tokens;
- `inputs.py`: one call's images, checked against its prompts and encoded once.
"""

from __future__ import annotations

import torch

from .config import VisionConfig
from .inputs import ImageInputs, prepare
from .prompt import MARKER, ImageSpan, expand, image_spans
from .tower import ImageEncoder

__all__ = ["ImageEncoder", "ImageInputs", "ImageSpan", "MARKER", "VisionConfig", "build_encoder", "expand", "image_spans", "prepare"]


def build_encoder(checkpoint, text_hidden_size: int, device: torch.device, dtype: torch.dtype) -> ImageEncoder | None:
    """The checkpoint's image encoder on `device` in `dtype`, or None for a text-only checkpoint."""
    from ..weights import load_state_dict, vision_weight_name

    config = VisionConfig.from_hf(checkpoint.raw_config, text_hidden_size)
    if config is None:
        return None
    with torch.device("meta"):
        encoder = ImageEncoder(config)
    expected = {name: t.shape for name, t in encoder.state_dict().items()}
    state = load_state_dict(checkpoint, expected, device, dtype, rename=vision_weight_name)
    encoder.load_state_dict(state, assign=True)
    return encoder.eval().requires_grad_(False)
