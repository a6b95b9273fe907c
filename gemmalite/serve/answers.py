"""The OpenAI wire format, going out: response bodies and stream chunks from CompletionChunks.

protocol.py reads requests into a Job; an Answer turns the engine's CompletionChunks for that
Job into OpenAI's bodies (a whole response, or `chat.completion.chunk` / `text_completion`
chunks), with usage and logprobs in OpenAI's shapes.
"""

from __future__ import annotations

import math
import re
import time
import uuid

from ..completion import CompletionChunk, Usage
from ..drafts import prediction_usage
from .protocol import Job

NO_LOGPROB = -9999.0  # JSON has no -inf: a token no sampler could choose gets this, as OpenAI does


class Answer:
    """Builds the bodies of one response (whole, or as stream chunks) from CompletionChunks."""

    def __init__(self, job: Job, model: str, tokenizer):
        self.job, self.model, self.tokenizer = job, model, tokenizer
        self.id = f"{'chatcmpl' if job.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.offset = 0  # legacy logprobs: where the next token's text starts
        self.token_ids: list[int] = []  # every token sent so far (for the prediction's usage)
        self._names: dict[int, tuple[str, bytes, int]] = {}

    def _envelope(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.job.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def first_chunk(self) -> dict | None:
        """Chat streams open with the assistant's role, as OpenAI's do."""
        if not self.job.chat:
            return None
        return self._stream_body({"role": "assistant", "content": ""}, None, None)

    def chunk(self, piece: CompletionChunk) -> dict | None:
        """The stream chunk for new text (None when there is nothing to say)."""
        self.token_ids.extend(piece.token_ids)
        if not piece.text and not (self.job.options.logprobs is not None and piece.token_ids):
            return None
        delta = {"content": piece.text} if self.job.chat else piece.text
        return self._stream_body(delta, self.logprobs(piece), None)

    def last_chunks(self, last: CompletionChunk) -> list[dict]:
        """The chunk with the finish reason (and any held-back text), then the usage chunk when asked for."""
        bodies = []
        if last.text:
            bodies.append(self._stream_body({"content": last.text} if self.job.chat else last.text, None, None))
        bodies.append(self._stream_body({} if self.job.chat else "", None, last.finish_reason))
        if self.job.include_usage:
            bodies.append({**self._envelope(True), "choices": [], "usage": self.usage(last.usage, self.token_ids)})
        return bodies

    def _stream_body(self, delta, logprobs, finish_reason) -> dict:
        choice = {"index": 0, ("delta" if self.job.chat else "text"): delta, "logprobs": logprobs, "finish_reason": finish_reason}
        body = {**self._envelope(True), "choices": [choice]}
        if self.job.include_usage:
            body["usage"] = None
        return body

    def whole(self, pieces: list[CompletionChunk]) -> dict:
        """The non-streaming response, from every chunk of the request (the last has the usage)."""
        text = "".join(p.text for p in pieces)
        last = pieces[-1]
        merged = CompletionChunk(
            text,
            [t for p in pieces for t in p.token_ids],
            [x for p in pieces for x in p.logprobs or []],
            [x for p in pieces for x in p.top_logprobs or []],
        )
        content = {"message": {"role": "assistant", "content": text}} if self.job.chat else {"text": text}
        choice = {"index": 0, **content, "logprobs": self.logprobs(merged), "finish_reason": last.finish_reason}
        return {**self._envelope(False), "choices": [choice], "usage": self.usage(last.usage, merged.token_ids)}

    def usage(self, u: Usage, token_ids: list[int]) -> dict:
        """OpenAI's usage; with a prediction, how many of its tokens the reply has and has not."""
        body = usage(u)
        prediction = self.job.options.prediction
        if prediction is not None:
            predicted = self.tokenizer.encode(prediction, bos=False)
            accepted, rejected = prediction_usage(predicted, token_ids)
            body["completion_tokens_details"] = {"accepted_prediction_tokens": accepted, "rejected_prediction_tokens": rejected}
        return body

    def logprobs(self, piece: CompletionChunk) -> dict | None:
        if self.job.options.logprobs is None:
            return None
        names = [self.token(t) for t in piece.token_ids]
        if self.job.chat:
            return {
                "content": [
                    {
                        **self._entry(name, lp),
                        "top_logprobs": [self._entry(self.token(i), v) for i, v in top],
                    }
                    for name, lp, top in zip(names, piece.logprobs, piece.top_logprobs)
                ]
            }
        offsets = []
        for _, _, width in names:
            offsets.append(self.offset)
            self.offset += width
        return {
            "tokens": [name[0] for name in names],
            "token_logprobs": [_finite(lp) for lp in piece.logprobs],
            "top_logprobs": [{self.token(i)[0]: _finite(v) for i, v in top} for top in piece.top_logprobs],
            "text_offset": offsets,
        }

    @staticmethod
    def _entry(name: tuple[str, bytes, int], logprob: float) -> dict:
        return {"token": name[0], "logprob": _finite(logprob), "bytes": list(name[1])}

    def token(self, token_id: int) -> tuple[str, bytes, int]:
        """A token as text, bytes, and the number of characters it adds to the text.

        A byte piece (<0xE2>) that is not ASCII is "bytes:\\xe2", as in OpenAI's answers, and counts
        as a character at a character's first byte; a control token (<end_of_turn>) is its piece name.
        """
        if token_id not in self._names:
            piece = self.tokenizer.sp.id_to_piece(token_id) if token_id < self.tokenizer.vocab_size else ""
            byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
            if byte:
                value = int(byte.group(1), 16)
                name = f"bytes:\\x{value:02x}" if value >= 0x80 else chr(value)
                self._names[token_id] = name, bytes([value]), int(value < 0x80 or value >= 0xC0)
            else:
                text = self.tokenizer.decode([token_id])
                shown = text if text and "\ufffd" not in text else piece
                self._names[token_id] = shown, shown.encode(), len(text) if "\ufffd" not in text else 0
        return self._names[token_id]


def usage(u: Usage) -> dict:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def _finite(x: float) -> float:
    return x if math.isfinite(x) else NO_LOGPROB
