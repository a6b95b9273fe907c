"""The generation options, held and checked in one place.

Every entry point that generates (`Engine.generate`, `stream`, `generate_ids`, sessions, the CLI)
takes the same keyword arguments and turns them into one `GenerationOptions`, checked once, before
any work. Options left as None take the checkpoint's defaults (generation_config.json), else
greedy: see `GenerationOptions.sampling`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from .errors import ContextLengthError, InvalidArgumentError
from .schemas import Constraint, constraint_from, schema_text
from .sampling import SamplingSettings

DEFAULT_MAX_NEW_TOKENS = 256
MAX_LOGPROBS = 20
MAX_DRAFT_TOKENS = 64


@dataclass(frozen=True)
class GenerationOptions:
    """What a call may ask for. None means "the checkpoint's default"; see SamplingSettings for ranges."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repeat_last_n: int | None = None  # the repetition penalty's window: -1 all, 0 off, N the last N tokens
    logprobs: int | None = None  # None: off; N: each chosen token's log-probability and the top N others
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    # Speculative decoding (speculative.py): same tokens, fewer target forwards when drafts agree.
    speculative: str | None = None  # "lookup", "draft" or "off"; None: "draft" when a draft is loaded
    num_draft_tokens: int | None = None  # most tokens drafted per forward; None: the drafter's default
    prediction: str | tuple[int, ...] | None = None  # the caller's guess of the reply (Predicted Outputs)
    # Structured output (grammar.py), one at most: a JSON Schema (dict or JSON text; True: any JSON
    # object), a regular expression, or a Lark/GBNF grammar that the whole reply follows.
    json_schema: dict | str | bool | None = None
    regex: str | None = None
    grammar: str | None = None

    def __post_init__(self):
        n = self.max_new_tokens
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise InvalidArgumentError(f"max_new_tokens must be an integer >= 0, got {n!r}")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidArgumentError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        lp = self.logprobs
        if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= MAX_LOGPROBS):
            raise InvalidArgumentError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] (the top alternatives to report), got {lp!r}")
        object.__setattr__(self, "stop", parse_stops(self.stop))
        if self.speculative not in (None, "off", "lookup", "draft"):
            raise InvalidArgumentError(f'speculative must be "lookup", "draft" or "off", got {self.speculative!r}')
        k = self.num_draft_tokens
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_DRAFT_TOKENS):
            raise InvalidArgumentError(f"num_draft_tokens must be an integer in [0, {MAX_DRAFT_TOKENS}], got {k!r}")
        guess = self.prediction
        if isinstance(guess, list):
            object.__setattr__(self, "prediction", guess := tuple(guess))
        if guess is not None and not isinstance(guess, str) and not (isinstance(guess, tuple) and all(isinstance(i, int) for i in guess)):
            raise InvalidArgumentError(f"prediction must be the expected reply, as text or token ids; got {type(guess).__name__}")
        if isinstance(self.json_schema, dict):  # held as JSON text: options stay hashable
            object.__setattr__(self, "json_schema", schema_text(self.json_schema))
        constraint_from(self.json_schema, self.regex, self.grammar)  # checked now: one at most, of the right shape
        # Check the sampling values now, with neutral stand-ins for what is left to the defaults.
        self.sampling(SamplingSettings())

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "GenerationOptions":
        """Build from a call's keyword arguments; an unknown name is an error that lists the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise InvalidArgumentError(
                f"unknown generation option(s) {', '.join(unknown)}; the options are {', '.join(sorted(known))}"
            )
        return cls(**kwargs)

    @property
    def constraint(self) -> Constraint | None:
        """What the reply must follow, if anything (see grammar.py)."""
        return constraint_from(self.json_schema, self.regex, self.grammar)

    @property
    def new_tokens(self) -> int:
        return DEFAULT_MAX_NEW_TOKENS if self.max_new_tokens is None else self.max_new_tokens

    def sampling(self, defaults: SamplingSettings) -> SamplingSettings:
        """The sampling settings in force: each option given here, else the default."""

        def pick(name):
            value = getattr(self, name)
            return getattr(defaults, name) if value is None else value

        return SamplingSettings(
            temperature=pick("temperature"),
            top_k=pick("top_k"),
            top_p=pick("top_p"),
            min_p=pick("min_p"),
            seed=self.seed,
            repetition_penalty=pick("repetition_penalty"),
            presence_penalty=pick("presence_penalty"),
            frequency_penalty=pick("frequency_penalty"),
            repeat_last_n=pick("repeat_last_n"),
        )


def parse_stops(stop) -> tuple[str, ...]:
    """Stop strings as a tuple: None, one string, or a list of non-empty strings."""
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, (list, tuple)) else None
    if stops is None or not all(isinstance(s, str) and s for s in stops):
        raise InvalidArgumentError("stop must be a non-empty string or a list of them")
    return stops


# ------------------------------------------------------------------ prompts
def check_prompts(prompts, vocab_size: int, max_seq_len: int) -> list[list[int]]:
    """A batch of token-id prompts as lists of ints, or a clear error."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise InvalidArgumentError("prompts must be a non-empty list of token-id lists")
    checked = []
    for row, prompt in enumerate(prompts):
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if isinstance(prompt, str) or not isinstance(prompt, Sequence):
            raise InvalidArgumentError(
                f"prompt {row} is {type(prompt).__name__}; a batch must be all strings (generate) or all id lists (generate_ids)"
            )
        if not prompt:
            raise InvalidArgumentError(f"prompt {row} is empty; give at least one token (e.g. <bos>)")
        check_ids(prompt, vocab_size)
        if len(prompt) >= max_seq_len:
            raise ContextLengthError(
                f"prompt {row} has {len(prompt)} tokens, but max_seq_len is {max_seq_len}; "
                "shorten it or load with a larger max_seq_len"
            )
        checked.append([int(i) for i in prompt])
    return checked


def check_ids(ids, vocab_size: int) -> None:
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size]
    if bad:
        raise InvalidArgumentError(f"token ids must be integers in [0, {vocab_size}); got {bad[:5]}")
