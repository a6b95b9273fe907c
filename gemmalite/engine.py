"""The public API: `Engine.generate`, `stream`, `generate_ids`, `logits` and `session`.

An engine is a runner (model, caches, compiled step; see runner.py) plus a tokenizer and the
checkpoint's defaults. This module checks what callers pass in, before any work, and turns
tokens into text (see text.py). Every generating method takes the options of options.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .cache import KVCache
from .config import GemmaConfig
from .errors import ContextLengthError, InvalidArgumentError
from .model import Gemma3
from .options import GenerationOptions
from .runner import Runner, Stats
from .sampling import SamplingSettings
from .session import Session
from .text import TextStream
from .tokenizer import END_OF_TURN, Tokenizer, chat_prompt

EOS_LIMIT = 4  # how many stop ids a call can carry (the runner's fixed-size eos tensor)


class Engine:
    def __init__(
        self,
        model: Gemma3,
        tokenizer: Tokenizer | None,
        *,
        device: torch.device,
        dtype: torch.dtype,
        compile: bool,
        max_seq_len: int,
        defaults: SamplingSettings = SamplingSettings(),
        eos_ids: Sequence[int] = (),
    ):
        self.runner = Runner(model, device=device, dtype=dtype, compile=compile, max_seq_len=max_seq_len)
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.max_seq_len = max_seq_len
        self.compiled = compile
        self.defaults = defaults
        self.eos_ids = tuple(dict.fromkeys([*model.config.eos_token_ids, *eos_ids]))
        self.last_stats = Stats()

    @property
    def config(self) -> GemmaConfig:
        return self.model.config

    def graph_count(self) -> int:
        """How many graphs this engine's decode step has compiled (one per batch size and mode)."""
        return self.runner.graph_count()

    def kv_cache(self, batch_size: int) -> KVCache:
        """The engine's own cache for this batch size (see Runner.kv_cache)."""
        return self.runner.kv_cache(batch_size)

    def prefill(self, cache: KVCache, chunks: Sequence[Sequence[int]]) -> torch.Tensor:
        """Append each row's tokens to `cache`; float32 logits [B, vocab] of each row's last token."""
        return self.runner.prefill(cache, chunks)

    # -------------------------------------------------------------- generation
    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Float32 logits [B, T, vocab] of a plain full-sequence forward, with no cache."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int):
            raise InvalidArgumentError("logits() takes a LongTensor of token ids shaped [batch, tokens]")
        self.check_ids(ids.flatten().tolist())
        return self.model(ids.to(self.device, torch.long)).float()

    def generate_ids(self, prompts: Sequence[Sequence[int]], **options) -> list[list[int]]:
        """New tokens for each prompt, ending with the eos token when one was produced.

        Options (see options.py): max_new_tokens, temperature, top_k, top_p, min_p, seed,
        ignore_eos. Sampling options left as None take the checkpoint's defaults
        (generation_config.json), else greedy. top_k=0, top_p=1 and min_p=0 switch a filter off.
        """
        steps = self.token_steps(self.check_prompts(prompts), GenerationOptions.from_kwargs(options))
        out: list[list[int]] = [[] for _ in prompts]
        for pieces in steps:
            for row, piece in zip(out, pieces):
                row.extend(piece)
        return out

    def generate(
        self, prompt: str | Sequence[str], *, chat: bool = False, system: str | None = None, **options
    ) -> str | list[str]:
        """The continuation of a prompt (or of each prompt in a list), as text.

        Takes generate_ids' options, and `stop` (strings to stop before); `chat` wraps each
        prompt in Gemma's turn template, with an optional `system` prompt.
        """
        single = isinstance(prompt, str)
        texts = [prompt] if single else list(prompt) if isinstance(prompt, (list, tuple)) else None
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InvalidArgumentError(
                "generate() takes a prompt string or a non-empty list of them, all strings; "
                "use generate_ids() for token ids"
            )
        opts = GenerationOptions.from_kwargs(options)
        prompts = self.check_prompts([self.encode(t, chat=chat, system=system) for t in texts])
        steps = self.token_steps(prompts, opts, chat=chat)
        decoded = [self.text_stream(opts, chat) for _ in texts]
        for pieces in steps:
            for text, piece in zip(decoded, pieces):
                text.add(piece)
            if all(t.stopped for t in decoded):
                steps.close()
                break
        self._mark_stopped(decoded)
        results = [t.text for t in decoded]
        return results[0] if single else results

    def stream(self, prompt: str, *, chat: bool = False, system: str | None = None, **options) -> Iterator[str]:
        """Yield the continuation as text pieces while tokens arrive (never half a UTF-8 character)."""
        if not isinstance(prompt, str):
            raise InvalidArgumentError("stream() takes one prompt string")
        opts = GenerationOptions.from_kwargs(options)
        prompts = self.check_prompts([self.encode(prompt, chat=chat, system=system)])
        return self.stream_text(self.token_steps(prompts, opts, chat=chat, sync_every=1), self.text_stream(opts, chat))

    def session(self, system: str | None = None, chat: bool = True) -> Session:
        """A multi-turn conversation that keeps its own cache; see session.py."""
        return Session(self, system=system, chat=chat)

    # -------------------------------------------------------------- pieces shared with sessions
    def token_steps(
        self,
        prompts: list[list[int]],
        options: GenerationOptions,
        *,
        chat: bool = False,
        cache: KVCache | None = None,
        sync_every: int = 8,
    ) -> Iterator[list[list[int]]]:
        """The runner's token loop for checked prompts. Without a cache, the engine's own starts empty."""
        if cache is None:
            cache = self.runner.kv_cache(len(prompts))
            cache.reset()
        self.last_stats = Stats(prompt_tokens=[len(p) for p in prompts])
        return self.runner.generate(
            cache,
            prompts,
            options.sampling(self.defaults),
            options.new_tokens,
            self.stop_ids(options.ignore_eos, chat),
            self.last_stats,
            sync_every=sync_every,
        )

    def text_stream(self, options: GenerationOptions, chat: bool = False) -> TextStream:
        return TextStream(self.decode, options.stop, self.stop_ids(options.ignore_eos, chat))

    def stream_text(self, steps: Iterator[list[list[int]]], text: TextStream) -> Iterator[str]:
        """Text pieces of a one-row token loop, ending at a stop string."""
        try:
            for (piece,) in steps:
                shown = text.add(piece)
                if shown:
                    yield shown
                if text.stopped:
                    break
            self._mark_stopped([text])
            rest = text.flush()
            if rest:
                yield rest
        finally:
            steps.close()

    def _mark_stopped(self, texts: list[TextStream]) -> None:
        for row, text in enumerate(texts):
            if text.stopped:
                self.last_stats.finish_reasons[row] = "stop"

    def stop_ids(self, ignore_eos: bool, chat: bool = False) -> tuple[int, ...]:
        """The token ids that end a reply: eos, and <end_of_turn> in chat."""
        if ignore_eos:
            return ()
        ids = list(self.eos_ids)
        if chat and self.tokenizer is not None:
            end_of_turn = self.tokenizer.token_id(END_OF_TURN)
            if end_of_turn is not None:
                ids.append(end_of_turn)
        return tuple(dict.fromkeys(ids))[:EOS_LIMIT]

    # -------------------------------------------------------------- text
    def encode(self, text: str, *, chat: bool = False, system: str | None = None) -> list[int]:
        if self.tokenizer is None:
            raise InvalidArgumentError(
                "this checkpoint has no tokenizer.model, so text input is unavailable; pass token ids to generate_ids()"
            )
        if chat:
            text = chat_prompt(text, system)
        elif system is not None:
            raise InvalidArgumentError("system= needs chat=True")
        return self.tokenizer.encode(text, bos=True)

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            raise InvalidArgumentError("this checkpoint has no tokenizer.model, so text output is unavailable")
        return self.tokenizer.decode([i for i in ids if i not in self.eos_ids])

    # -------------------------------------------------------------- checking input
    def check_prompts(self, prompts) -> list[list[int]]:
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
            self.check_ids(prompt)
            if len(prompt) >= self.max_seq_len:
                raise ContextLengthError(
                    f"prompt {row} has {len(prompt)} tokens, but max_seq_len is {self.max_seq_len}; "
                    "shorten it or load with a larger max_seq_len"
                )
            checked.append([int(i) for i in prompt])
        return checked

    def check_ids(self, ids) -> None:
        vocab = self.config.vocab_size
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab]
        if bad:
            raise InvalidArgumentError(f"token ids must be integers in [0, {vocab}); got {bad[:5]}")
