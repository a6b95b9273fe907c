"""Gemma's SentencePiece tokenizer, and Gemma's chat turn template."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import sentencepiece

from .errors import InvalidArgumentError, ModelLoadError

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"


class Tokenizer:
    def __init__(self, model_file: str | Path, *, bos_id: int | None = None):
        """`bos_id`: the checkpoint's own <bos> id; default: the tokenizer's (which may not name one)."""
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as e:
            raise ModelLoadError(f"cannot read tokenizer {model_file}: {e}") from None
        self.bos_id = self.sp.bos_id() if bos_id is None else bos_id
        if not 0 <= self.bos_id < self.vocab_size:
            raise ModelLoadError(
                f"tokenizer {model_file} names no <bos> token and none was given; set bos_token_id in config.json"
            )

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def check_against(self, config) -> None:
        """Refuse a tokenizer that does not fit the model: a larger vocabulary, or another <bos>."""
        if self.vocab_size > config.vocab_size:
            raise ModelLoadError(
                f"the tokenizer has {self.vocab_size} pieces but the model's vocab_size is {config.vocab_size}: "
                "they belong to different checkpoints"
            )
        own_bos = self.sp.bos_id()
        if own_bos >= 0 and own_bos != config.bos_token_id:
            raise ModelLoadError(
                f"config.json says bos_token_id {config.bos_token_id}, but the tokenizer's <bos> is {own_bos}"
            )

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.sp.encode(text)
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: list[int]) -> str:
        # A model's vocabulary may be larger than its tokenizer's (Gemma 3 4B and up: 262208 rows
        # for 262144 pieces); the extra ids have no text.
        return self.sp.decode([i for i in ids if i < self.vocab_size])

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


def chat_messages_prompt(messages: Sequence[tuple[str, str]]) -> str:
    """A conversation in Gemma's template, ready for the model's next reply.

    `messages` are (role, text) pairs: an optional "system" first, then "user" and "assistant"
    turns alternating, starting and ending with "user". As in the template Google ships with the
    checkpoints, the system text is folded into the first user turn and each turn is trimmed.
    """
    system, turns = None, list(messages)
    if turns and turns[0][0] == "system":
        system, turns = turns[0][1], turns[1:]
    if not turns:
        raise InvalidArgumentError("a conversation needs at least one user message")
    parts = []
    for i, (role, text) in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            if role == "system":
                place = "a system message may only come first"
            else:
                place = f"message {i + (system is not None)} should be {expected!r}"
            raise InvalidArgumentError(
                f"roles must alternate user/assistant after an optional system message; {place}, got {role!r}"
            )
        prefix = f"{system}\n\n" if i == 0 and system is not None else ""
        parts.append(f"{START_OF_TURN}{'user' if role == 'user' else 'model'}\n{prefix}{text.strip()}{END_OF_TURN}\n")
    if turns[-1][0] != "user":
        raise InvalidArgumentError("the last message must be the user's: the model replies to it")
    return "".join(parts) + f"{START_OF_TURN}model\n"
