"""Images in, pixel values out: reading what callers pass and Gemma 3's preprocessing.

An image is a PIL image, a path, bytes (PNG, JPEG, WebP, GIF: its first frame, ...), or an
HxWx3 (or HxW) uint8 array. Preprocessing is that of the checkpoints: convert to RGB
(transparency composited onto white), resize to image_size x image_size with bilinear
resampling (stretched, not letterboxed), scale to [0, 1] and normalise with mean 0.5 and std
0.5, per channel. Pan and scan (extra crops of very wide or tall images) is not offered.

Pillow is the one image library (the `vision` extra). Everything that can go wrong with an
image (not an image, truncated, a decompression bomb) becomes an InvalidArgumentError here.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import InvalidArgumentError, MissingExtraError


def pillow():
    try:
        import PIL.Image
    except ImportError:
        raise MissingExtraError('images need Pillow: pip install "gemmalite[vision]"') from None
    return PIL.Image


def open_image(image, what: str = "image"):
    """A loaded PIL image from any accepted kind of input, or a clear InvalidArgumentError."""
    Image = pillow()
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise InvalidArgumentError(
                f"{what}: an array must be uint8 shaped HxWx3, HxWx4 or HxW, got {image.dtype} {list(image.shape)}"
            )
        return Image.fromarray(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        source, name = io.BytesIO(bytes(image)), f"{what} ({len(image)} bytes)"
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise InvalidArgumentError(f"{what}: no such file: {path}")
        source, name = path, str(path)
    else:
        raise InvalidArgumentError(
            f"{what} is {type(image).__name__}; give a PIL image, a path, bytes or an HxWx3 uint8 array"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(source)
            opened.seek(0)  # an animation's first frame
            opened.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidArgumentError(f"{name} is refused as a decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise InvalidArgumentError(f"{name} is not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InvalidArgumentError(f"{name} cannot be read as an image (truncated or corrupt?): {e}") from None
    return opened


def to_rgb(image):
    """RGB, with any transparency composited onto a white background."""
    Image = pillow()
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def pixel_values(image, size: int, what: str = "image") -> torch.Tensor:
    """Float32 pixels [3, size, size] in [-1, 1], as the vision tower takes them."""
    Image = pillow()
    rgb = to_rgb(open_image(image, what)).resize((size, size), resample=Image.BILINEAR)
    scaled = (np.asarray(rgb, dtype=np.float64) * (1 / 255)).astype(np.float32)  # [H, W, 3]
    normalised = (scaled - np.float32(0.5)) / np.float32(0.5)
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))
