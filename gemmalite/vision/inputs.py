"""One call's images: matched to the prompts' image blocks, checked, and encoded once.

`prepare` runs where the images enter (the engine's generating calls), before any work: it
reads every image (clear errors for anything Pillow cannot take), checks that each prompt has
as many image blocks as images, and runs the tower once over all of them, batched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InvalidArgumentError
from .config import VisionConfig
from .images import pixel_values
from .prompt import ImageSpan, image_spans
from .tower import ImageEncoder


@dataclass
class ImageInputs:
    """Per prompt, the (span, features [tokens_per_image, text_hidden]) of each of its images,
    and each image's digest (what prompt reuse compares instead of the placeholder ids)."""

    rows: list[list[tuple[ImageSpan, torch.Tensor]]]
    digests: list[list[bytes]]

    def first_image(self, row: int) -> int | None:
        """Where the row's first image starts, or None when it has none."""
        return self.rows[row][0][0].start if self.rows[row] else None

    def fed(self, row: int, kept: int) -> list[tuple[ImageSpan, torch.Tensor]]:
        """The row's images after its first `kept` tokens (which a cache already holds), counted from there."""
        return [(ImageSpan(span.start - kept, span.length), f) for span, f in self.rows[row] if span.start >= kept]

    def keyed(self, row: int, ids: list[int]) -> list:
        """`ids` with each image token replaced by a key of its image's content and place in it:
        what prompt reuse compares, so that only the same image is taken from a cache."""
        keyed = list(ids)
        for (span, _), digest in zip(self.rows[row], self.digests[row]):
            base = int.from_bytes(digest[:8], "big") * span.length
            keyed[span.start : span.end] = [-1 - base - i for i in range(span.length)]
        return keyed


def per_prompt(images, prompts: int, single: bool) -> list[list]:
    """`images` as one list per prompt: a single prompt takes a list (or one image), a batch a list of lists."""
    if single:
        return [list(images) if isinstance(images, (list, tuple)) else [images]]
    if not isinstance(images, (list, tuple)) or len(images) != prompts or not all(isinstance(i, (list, tuple)) for i in images):
        raise InvalidArgumentError(f"for a batch of {prompts} prompts, images= takes {prompts} lists (one per prompt; [] for none)")
    return [list(i) for i in images]


def prepare(encoder: ImageEncoder, prompts: Sequence[list[int]], images: list[list]) -> ImageInputs:
    """Match each prompt's image blocks to its images, read and encode them (once, batched)."""
    config: VisionConfig = encoder.config
    spans = [image_spans(p, config) for p in prompts]
    for row, (found, given) in enumerate(zip(spans, images)):
        if len(found) != len(given):
            where = f"prompt {row} has" if len(prompts) > 1 else "the prompt has"
            raise InvalidArgumentError(
                f"{where} {len(found)} image block(s) (one per <start_of_image>) but {len(given)} image(s) were given; "
                "put one <start_of_image> in the text for each image, in order"
            )
    pixels = [
        pixel_values(image, config.image_size, f"image {i}" + (f" of prompt {row}" if len(prompts) > 1 else ""))
        for row, given in enumerate(images)
        for i, image in enumerate(given)
    ]
    digests = [hashlib.sha256(np.ascontiguousarray(p.numpy()).tobytes()).digest() for p in pixels]
    features = encode(encoder, pixels)
    rows, digest_rows, at = [], [], 0
    for found in spans:
        rows.append([(span, features[at + i]) for i, span in enumerate(found)])
        digest_rows.append(digests[at : at + len(found)])
        at += len(found)
    return ImageInputs(rows, digest_rows)


@torch.no_grad()
def encode(encoder: ImageEncoder, pixels: list[torch.Tensor]) -> torch.Tensor:
    """Soft tokens [N, tokens_per_image, text_hidden] of N images' pixels, in one batch."""
    if not pixels:
        return torch.empty(0)
    return encoder(torch.stack(pixels))


def remember(cache, compared: list[list]) -> None:
    """After a call, let each row's record of its tokens name its images by content (see keyed),
    so that a later prompt reuses the cache only up to the first image that differs."""
    for row, keyed in enumerate(compared):
        held = cache.tokens[row]
        if held is not None:
            n = min(len(held), len(keyed))
            held[:n] = [k if k < 0 else t for k, t in zip(keyed[:n], held[:n])]


def check_fits(config: VisionConfig, width: int) -> None:
    """Refuse an engine whose prefill chunks could not hold an image's tokens whole."""
    if config.tokens_per_image > width:
        raise InvalidArgumentError(
            f"an image takes {config.tokens_per_image} tokens, but this engine prefills at most {width} at once "
            "(its sliding window, max_seq_len or rewind margin bound that); load with a larger rewind_margin"
            " or max_seq_len, or with vision=False"
        )


def no_vision(engine) -> str:
    if engine.vision_skipped:
        return "this engine was loaded with vision=False, so it takes no images; load it again without vision=False"
    return "this model is text-only (its checkpoint has no vision tower), so it takes no images; use a Gemma 3 4B, 12B or 27B checkpoint"
