"""Multi-turn sessions: each turn appends only its new tokens to a live cache.

The history is never prefilled again. A turn may be any length, from one token to thousands,
whether or not the sliding layers' rings have wrapped: prefill appends in chunks after whatever
the cache holds (see cache.py), and decoding goes on from there with the same compiled step.

The cache's `lengths` is the authority on what it holds. The transcript (`tokens`) can be one
token ahead of it: the last token a reply produced has not been fed yet, and is fed at the start
of the next turn.

A reply cut at a stop string ends the transcript where its text ends: the tokens generated past
it are dropped, from the transcript and (by stepping back) from the cache. `undo` removes the
last exchange the same way. When the cache cannot step back that far (see the rewind margin in
cache.py), it is emptied and the next turn feeds the whole transcript again: slower, never wrong.

A session drives its engine through the engine's public pieces (`check_prompts`, `token_steps`,
`text_stream`, `stream_text`); it keeps its own cache and transcript.
"""

from __future__ import annotations

from collections.abc import Iterator

from .errors import ContextLengthError, InvalidArgumentError
from .loop import Block, Steps
from .options import GenerationOptions
from .tokenizer import END_OF_TURN, chat_prompt
from .vision import inputs as vision_inputs
from .vision.prompt import ImageSpan
from .vision import prompt as images_prompt


class Session:
    def __init__(self, engine, *, system: str | None = None, chat: bool = True):
        if system is not None and not chat:
            raise InvalidArgumentError("system= needs chat=True")
        self.engine = engine
        self.system = system
        self.chat = chat
        self.cache = engine.runner.new_cache(1)
        self._tokens: list[int] = []
        self._turn_starts: list[int] = []  # where each exchange begins in the transcript
        # The transcript's images: (span, features, digest), kept to feed them again after a reset.
        self._images: list[tuple] = []

    @property
    def tokens(self) -> list[int]:
        """The whole transcript's token ids, <bos> first."""
        return list(self._tokens)

    @property
    def remaining(self) -> int:
        """How many more tokens the transcript can take before it reaches max_seq_len."""
        return self.engine.max_seq_len - len(self._tokens)

    def reset(self) -> None:
        """Forget the conversation: an empty transcript and an empty cache."""
        self._tokens = []
        self._turn_starts = []
        self._images = []
        self.cache.reset()

    def undo(self) -> None:
        """Remove the last exchange (the last turn and its reply), as if it had never happened."""
        if not self._turn_starts:
            raise InvalidArgumentError("there is no exchange to undo")
        self._truncate(self._turn_starts.pop())

    def _truncate(self, length: int) -> None:
        """Cut the transcript to `length` tokens and the cache to match, stepping back when it can."""
        self._tokens = self._tokens[:length]
        self._images = [image for image in self._images if image[0].end <= length]
        drop = int(self.cache.lengths[0]) - length
        if drop > self.cache.rewindable(0):
            self.cache.reset()  # the next turn feeds the whole transcript again
        elif drop > 0:
            self.cache.rewind(drop)

    def fork(self) -> "Session":
        """An independent copy, for branching: both go on from here without touching each other."""
        other = Session.__new__(Session)
        other.engine, other.system, other.chat = self.engine, self.system, self.chat
        other.cache = self.cache.fork()
        other._tokens = list(self._tokens)
        other._turn_starts = list(self._turn_starts)
        other._images = list(self._images)
        return other

    def send(self, text: str, images=None, **options) -> str:
        """Add a user turn (or plain text when chat=False) and return the model's reply.

        `images`: the turn's images, one per <start_of_image> in `text` (a chat turn without one
        gets them at its start); see Engine.complete."""
        return "".join(self.stream(text, images, **options))

    def stream(self, text: str, images=None, **options) -> Iterator[str]:
        """Like `send`, yielding the reply in pieces. Stopping early keeps the session usable."""
        if not isinstance(text, str):
            raise InvalidArgumentError("a session turn is a string")
        opts = GenerationOptions.from_kwargs(options)
        engine = self.engine
        if images is not None and not engine.vision:
            raise InvalidArgumentError(vision_inputs.no_vision(engine))
        given = None if images is None else vision_inputs.per_prompt(images, 1, True)[0]
        turn = self._turn_tokens(text, None if given is None else len(given))
        new = None if given is None else vision_inputs.prepare(engine.image_encoder, [turn], [given])
        steps = self._turn(turn, opts, new)
        return self._reply_text(steps, self.engine.text_stream(opts, self.chat))

    def _reply_text(self, steps, text) -> Iterator[str]:
        reply_start = len(self._tokens)
        yield from self.engine.stream_text(steps, text)
        if text.stopped:
            self._end_at_text(reply_start, text.text)

    def _end_at_text(self, reply_start: int, text: str) -> None:
        """End the transcript where the reply's text ends (just before a stop string)."""
        reply = self._tokens[reply_start:]
        decode = self.engine.decode
        whole = len(reply)
        while whole > 0 and not (text.startswith(shown := decode(reply[:whole])) and "\ufffd" not in shown):
            whole -= 1
        rest = text[len(decode(reply[:whole])) :]  # the start of a token the stop string cut through
        self._truncate(reply_start + whole)
        if rest:
            self._tokens.extend(self.engine.tokenizer.encode(rest, bos=False))

    def send_ids(self, ids: list[int], **options) -> list[int]:
        """Append raw token ids (no template) and return the reply's token ids."""
        reply = []
        for (piece,) in self._turn(list(ids), GenerationOptions.from_kwargs(options)):
            reply.extend(piece)
        return reply

    def _turn(self, turn: list[int], options: GenerationOptions, new_images=None) -> Steps:
        """Append a turn's tokens and decode the reply: the engine's loop, on this session's cache."""
        engine = self.engine
        if not turn:
            raise InvalidArgumentError("a turn needs at least one token")
        if len(self._tokens) + len(turn) >= engine.max_seq_len:
            raise ContextLengthError(
                f"this turn has {len(turn)} tokens, but the session has only {max(self.remaining - 1, 0)} left "
                f"of max_seq_len={engine.max_seq_len}; reset() the session or load with a larger max_seq_len"
            )
        fed = int(self.cache.lengths[0])
        # Everything is checked before the transcript changes: a bad argument loses nothing.
        prompt = engine.check_prompts([self._tokens[fed:] + turn])
        history = [self._tokens + turn]
        images = self._images + [
            (ImageSpan(span.start + len(self._tokens), span.length), features, digest)
            for (span, features), digest in zip(new_images.rows[0], new_images.digests[0])
        ] if new_images is not None else self._images
        # The images among the tokens fed now: after a reset, the history's too.
        fed_images = [(ImageSpan(span.start - fed, span.length), f, d) for span, f, d in images if span.start >= fed]
        seen = None if not fed_images else vision_inputs.ImageInputs([[(span, f) for span, f, _ in fed_images]], [[d for *_, d in fed_images]])
        steps = engine.token_steps(prompt, options, chat=self.chat, cache=self.cache, sync_every=1, histories=history, images=seen)
        self._images = images
        self._turn_starts.append(len(self._tokens))
        self._tokens.extend(turn)
        return Steps(self._record(steps), steps.stats)

    def _record(self, steps: Steps) -> Iterator[Block]:
        """Pass the reply's tokens through, adding each to the transcript as it arrives."""
        prefilled = False
        try:
            for pieces in steps:
                prefilled = True
                self._tokens.extend(pieces[0])
                yield pieces
        finally:
            steps.close()
            if not prefilled:
                # Interrupted inside prefill: some layers may hold a half-written chunk. Start the
                # cache over; the next turn feeds the whole transcript again.
                self.cache.reset()

    def _turn_tokens(self, text: str, images: int | None = None) -> list[int]:
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise InvalidArgumentError("text turns need a tokenizer.model; this checkpoint has none (use send_ids)")

        def encode(text: str, bos: bool) -> list[int]:
            if images is None:
                return tokenizer.encode(text, bos=bos)
            plain = lambda piece: tokenizer.encode(piece, bos=False)  # noqa: E731
            return [tokenizer.bos_id] * bos + images_prompt.expand(text, plain, self.engine.image_encoder.config)

        if not self.chat:
            return encode(text, bos=not self._tokens)
        if images is not None:
            text = images_prompt.with_markers(text, images)
        if not self._tokens:
            return encode(chat_prompt(text, self.system), bos=True)
        end_of_turn = tokenizer.token_id(END_OF_TURN)
        # Close the model's turn: its reply ends with <end_of_turn> unless it was cut short.
        closing = "\n" if self._tokens[-1] == end_of_turn else f"{END_OF_TURN}\n"
        return encode(closing + chat_prompt(text), bos=False)
