"""What `Engine.complete` returns: the text, the tokens, why it ended, log-probabilities, usage.

The field names follow the OpenAI API (finish_reason, usage.prompt_tokens, completion_tokens,
cached_tokens), so a server can return them as they are. `RowResult` builds one row's result as
blocks of tokens arrive from the runner, and gives the part that is new as a `CompletionChunk`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from .errors import InvalidArgumentError
from .text import TextStream


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV entries were reused instead of prefilled
    # With prediction= (speculative.py): predicted tokens the reply kept, and the rest of them.
    accepted_prediction_tokens: int | None = None
    rejected_prediction_tokens: int | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Completion:
    text: str | None  # None when the prompt was token ids
    token_ids: list[int]  # every generated token, an eos included
    finish_reason: str  # "stop" (eos or a stop string) or "length"
    usage: Usage
    logprobs: list[float] | None = None  # of each generated token, when asked for
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token: the top N (id, logprob)


@dataclass
class CompletionChunk:
    """The part of a completion that is new; the last chunk of a stream has finish_reason and usage."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass
class RowResult:
    """One row's completion, built block by block."""

    prompt_tokens: int
    text: TextStream | None  # None for token-id prompts
    with_logprobs: bool
    cached_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)

    @classmethod
    def for_prompt(cls, prompt: Sequence[int], text: Callable[[], TextStream] | None, with_logprobs: bool, cached: int = 0):
        return cls(len(prompt), text() if text else None, with_logprobs, cached)

    @property
    def stopped(self) -> bool:
        """A stop string was found: nothing after it is wanted."""
        return self.text is not None and self.text.stopped

    def add(self, tokens: list[int], logprobs=None, top=None) -> CompletionChunk:
        if self.stopped:
            return CompletionChunk("", [])
        self.token_ids.extend(tokens)
        shown = self.text.add(tokens) if self.text is not None else ""
        if self.with_logprobs:
            self.logprobs.extend(logprobs)
            self.top_logprobs.extend(top)
        return CompletionChunk(shown, list(tokens), logprobs if self.with_logprobs else None, top if self.with_logprobs else None)

    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, len(self.token_ids), self.cached_tokens)

    def last_chunk(self, reason: str) -> CompletionChunk:
        rest = self.text.flush() if self.text is not None else ""
        return CompletionChunk(rest, [], [] if self.with_logprobs else None, [] if self.with_logprobs else None,
                               self.finish_reason(reason), self.usage())

    def finish_reason(self, reason: str | None) -> str:
        return "stop" if self.stopped else reason or "length"

    def result(self, reason: str | None) -> Completion:
        return Completion(
            text=self.text.text if self.text is not None else None,
            token_ids=self.token_ids,
            finish_reason=self.finish_reason(reason),
            usage=self.usage(),
            logprobs=self.logprobs if self.with_logprobs else None,
            top_logprobs=self.top_logprobs if self.with_logprobs else None,
        )


def refuse_option(options: dict, name: str, message: str) -> None:
    """Raise InvalidArgumentError(message) when the call's `options` set `name`."""
    if options.get(name) not in (None, (), [], ""):
        raise InvalidArgumentError(message)


def row_logprobs(block, row: int) -> tuple:
    """One row's (logprobs, top alternatives) of a loop.Block, or (None, None) without logprobs."""
    return (None, None) if block.logprobs is None else (block.logprobs[row], block.top[row])


def texts_of(chunks: Iterator[CompletionChunk]) -> Iterator[str]:
    """The text pieces of a chunk stream, closing it when the consumer stops."""
    try:
        for chunk in chunks:
            if chunk.text:
                yield chunk.text
    finally:
        chunks.close()
