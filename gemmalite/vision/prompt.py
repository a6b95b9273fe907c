"""Image markers in prompts: each `<start_of_image>` becomes one image's block of tokens.

In text, a marker expands to "\\n\\n" <start_of_image>, tokens_per_image image tokens,
<end_of_image> "\\n\\n", and the text around the markers is tokenized with those newlines
attached, so that "\\n\\n" merges with neighbouring newlines just as when the expanded string is
tokenized whole: the special tokens split the text, the pieces between them are tokenized
alone. A chat prompt without markers gets its images at the start of the user's turn, where
Gemma's chat template puts them.

A prompt of token ids carries its images as runs of tokens_per_image image tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidArgumentError
from .config import VisionConfig

MARKER = "<start_of_image>"


@dataclass(frozen=True)
class ImageSpan:
    """Where one image's soft tokens sit in a prompt: positions [start, start + length)."""

    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


def with_markers(text: str, count: int) -> str:
    """A chat user turn with `count` images: at the start, unless the text places them itself."""
    return text if MARKER in text else MARKER * count + text


def expand(text: str, encode, config: VisionConfig) -> list[int]:
    """Token ids (no <bos>) of `text` with every marker expanded; `encode` tokenizes plain text."""
    pieces = text.split(MARKER)
    block = [config.start_of_image_id, *[config.image_token_id] * config.tokens_per_image, config.end_of_image_id]
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        before = "\n\n" if i > 0 else ""
        after = "\n\n" if i < len(pieces) - 1 else ""
        ids += encode(before + piece + after)
        if after:
            ids += block
    return ids


def image_spans(ids: list[int], config: VisionConfig) -> list[ImageSpan]:
    """The runs of image tokens in `ids`; each must be exactly one image long."""
    spans, start = [], None
    for i, token in enumerate([*ids, None]):
        if token == config.image_token_id and start is None:
            start = i
        elif token != config.image_token_id and start is not None:
            spans.append(ImageSpan(start, i - start))
            start = None
    for span in spans:
        if span.length != config.tokens_per_image:
            raise InvalidArgumentError(
                f"a run of {span.length} image tokens (id {config.image_token_id}) at position {span.start}; "
                f"each image takes exactly {config.tokens_per_image}"
            )
    return spans
