"""Gemma's SentencePiece tokenizer, and Gemma's chat turn template."""

from __future__ import annotations

from pathlib import Path

import sentencepiece

from .errors import ModelLoadError

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"


class Tokenizer:
    def __init__(self, model_file: str | Path):
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as e:
            raise ModelLoadError(f"cannot read tokenizer {model_file}: {e}") from None
        self.bos_id = self.sp.bos_id()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.sp.encode(text)
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def token_id(self, piece: str) -> int | None:
        """The id of a whole piece such as '<end_of_turn>', or None when the vocab lacks it."""
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i


def chat_prompt(user: str, system: str | None = None) -> str:
    """One user turn in Gemma's template, ready for the model's reply.

    Gemma has no system role: a system prompt is folded into the first user turn.
    """
    if system:
        user = f"{system}\n\n{user}"
    return f"{START_OF_TURN}user\n{user}{END_OF_TURN}\n{START_OF_TURN}model\n"
