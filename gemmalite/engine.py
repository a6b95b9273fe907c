"""The public API: `Engine.generate`, `stream`, `generate_ids`, `logits` and `session`.

An engine is a runner (model, caches, compiled step; see runner.py) plus a tokenizer and the
checkpoint's defaults. This module checks what callers pass in, before any work, and turns
tokens into text (see text.py). Every generating method takes the options of options.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import torch

from .cache import KVCache
from .completion import Completion, CompletionChunk, RowResult, refuse_option, row_logprobs, texts_of
from .config import GemmaConfig
from .errors import InvalidArgumentError
from .grammar import Grammars
from .model import Gemma3
from .options import GenerationOptions, check_ids, check_prompts
from .loop import Block, Stats, Steps, generate
from .runner import Runner
from .sampling import SamplingSettings, sampling_kind
from . import speculative
from .drafts import add_prediction_usage
from .session import Session
from .text import TextStream
from .tokenizer import END_OF_TURN, Tokenizer, chat_prompt
from .vision import inputs as vision_inputs
from .vision import prompt as images_prompt
from .vision.inputs import ImageInputs

DEFAULT_REWIND_MARGIN = 256  # tokens a sliding ring keeps beyond its window, so caches can step back
EOS_LIMIT = 4  # how many stop ids a call can carry (the runner's fixed-size eos tensor)


class Engine:
    def __init__(
        self,
        model: Gemma3,
        tokenizer: Tokenizer | None,
        *,
        device: torch.device,
        dtype: torch.dtype,
        compile: bool | str,
        max_seq_len: int,
        defaults: SamplingSettings = SamplingSettings(),
        eos_ids: Sequence[int] = (),
        rewind_margin: int = DEFAULT_REWIND_MARGIN,
        reuse_prompts: bool = True,
        draft: "Engine | None" = None,
        image_encoder=None,
        vision_skipped: bool = False,
    ):
        self.reuse_prompts = reuse_prompts
        self.image_encoder = image_encoder  # vision.ImageEncoder, or None: text only
        self.vision_skipped = vision_skipped  # the checkpoint has a tower that load(vision=False) left out
        self.runner = Runner(
            model, device=device, dtype=dtype, compile=compile, max_seq_len=max_seq_len, rewind_margin=rewind_margin
        )
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.max_seq_len = max_seq_len
        self.compiled = self.runner.compiled  # torch.compile in this process
        self.compile = compile  # True, False or "cached" (see loading.load)
        self.defaults = defaults
        self.eos_ids = tuple(dict.fromkeys([*model.config.eos_token_ids, *eos_ids]))
        self._local = threading.local()  # per thread: the last call's Stats
        self.draft = None  # a smaller engine with the same vocabulary, drafting for speculative decoding
        if draft is not None:
            speculative.check_draft(self, draft)
            self.draft = draft
        if image_encoder is not None:
            vision_inputs.check_fits(image_encoder.config, self.runner.prefill_width(self.runner.new_cache(1, device="meta")))
        # Structured output (grammar.py): the vocabulary as the grammar library sees it, built on first use.
        self.grammars = Grammars(tokenizer, model.config.vocab_size, self.eos_ids[0] if self.eos_ids else 1)

    @property
    def vision(self) -> bool:
        """Whether this engine takes images (the checkpoint has a vision tower, loaded)."""
        return self.image_encoder is not None

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

    @property
    def last_stats(self) -> Stats:
        """Figures of the last call that this thread made (each thread sees its own)."""
        return getattr(self._local, "stats", None) or Stats()

    # -------------------------------------------------------------- generation
    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Float32 logits [B, T, vocab] of a plain full-sequence forward, with no cache."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int):
            raise InvalidArgumentError("logits() takes a LongTensor of token ids shaped [batch, tokens]")
        self.check_ids(ids.flatten().tolist())
        with self.runner.lock:
            return self.model(ids.to(self.device, torch.long)).float()

    def complete(
        self, prompt, *, chat: bool = False, system: str | None = None, images=None, **options
    ) -> Completion | list[Completion]:
        """Generate for a prompt and return a Completion: text, token ids, finish reason, usage.

        `prompt` is a string, a list of token ids, or a list of either for a batch (then the
        result is a list). Options: see GenerationOptions (options.py); `logprobs=N` adds each
        token's log-probability and the top N alternatives. `chat` wraps text prompts in Gemma's
        turn template, with an optional `system` prompt. `images`: see vision/images.py (one list per prompt
        for a batch); each `<start_of_image>` in a prompt is one image, in order.
        """
        single, prompts, texts, seen = self._prompts(prompt, chat, system, images)
        opts = GenerationOptions.from_kwargs(options)
        results = self._row_results(prompts, opts, texts, chat)
        steps = self.token_steps(prompts, opts, chat=chat, images=seen)
        for result, cached in zip(results, steps.stats.cached_tokens):
            result.cached_tokens = cached
        try:
            for block in steps:
                for row, result in enumerate(results):
                    result.add(block[row], *row_logprobs(block, row))
                if all(r.stopped for r in results):
                    break
        finally:
            steps.close()
        stats = steps.stats
        done = [r.result(reason) for r, reason in zip(results, stats.finish_reasons)]
        stats.finish_reasons[:] = [c.finish_reason for c in done]
        for row, completion in enumerate(done):
            add_prediction_usage(completion.usage, stats.prediction if opts.prediction is not None else None, completion.token_ids)
        return done[0] if single else done

    def complete_stream(
        self, prompt: str | Sequence[int], *, chat: bool = False, system: str | None = None, images=None, **options
    ) -> Iterator[CompletionChunk]:
        """Like complete() for one prompt, yielding CompletionChunks as tokens arrive.

        Every argument is checked before this returns. The last chunk has finish_reason and usage.
        """
        single, prompts, texts, seen = self._prompts(prompt, chat, system, images)
        if not single:
            raise InvalidArgumentError("complete_stream() takes one prompt (a string or a list of token ids)")
        opts = GenerationOptions.from_kwargs(options)
        (result,) = self._row_results(prompts, opts, texts, chat)
        steps = self.token_steps(prompts, opts, chat=chat, sync_every=1, images=seen)
        result.cached_tokens = steps.stats.cached_tokens[0]
        return self._chunks(steps, result, opts)

    def generate_ids(self, prompts: Sequence[Sequence[int]], **options) -> list[list[int]]:
        """New tokens for each prompt, ending with the eos token when one was produced.

        Options: see GenerationOptions. Sampling options left as None take the checkpoint's
        defaults (generation_config.json), else greedy.
        """
        prompts = self.check_prompts(prompts)
        refuse_option(options, "stop", "generate_ids() returns tokens; stop strings need text: use complete() with a text prompt")
        refuse_option(options, "logprobs", "generate_ids() returns tokens only; use complete() for logprobs")
        return [c.token_ids for c in self.complete(prompts, **options)]

    def generate(self, prompt: str | Sequence[str], *, chat: bool = False, system: str | None = None, images=None, **options):
        """The continuation of a prompt (or of each prompt in a list), as text.

        Options: see GenerationOptions, with `stop` (strings to stop before).
        """
        if not (isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, str) for t in prompt))):
            raise InvalidArgumentError(
                "generate() takes a prompt string or a non-empty list of them, all strings; "
                "use generate_ids() for token ids"
            )
        refuse_option(options, "logprobs", "generate() returns text only; use complete() for logprobs")
        done = self.complete(prompt if isinstance(prompt, str) else list(prompt), chat=chat, system=system, images=images, **options)
        return done.text if isinstance(prompt, str) else [c.text for c in done]

    def stream(self, prompt: str, *, chat: bool = False, system: str | None = None, images=None, **options) -> Iterator[str]:
        """Yield the continuation as text pieces while tokens arrive (never half a UTF-8 character)."""
        if not isinstance(prompt, str):
            raise InvalidArgumentError("stream() takes one prompt string")
        refuse_option(options, "logprobs", "stream() yields text only; use complete_stream() for logprobs")
        return texts_of(self.complete_stream(prompt, chat=chat, system=system, images=images, **options))

    def warm_up(self, batch_size: int = 1, **options) -> None:
        """Compile now the decode graph that calls of `batch_size` prompts with these options use.

        Then a call's first tokens do not wait for the compiler mid-reply (see Runner.on_compile
        to hear about it). Prefill graphs depend on the prompt's length, so a call still compiles
        its own chunk length's the first time, before its first token. Does nothing when eager.
        """
        if not self.compiled:
            return
        opts = GenerationOptions.from_kwargs({**options, "max_new_tokens": 2, "ignore_eos": True, "stop": ()})
        # A cache of its own, outside the pool: nothing of the warm-up is kept for prompt reuse.
        steps = self.token_steps([[self.config.bos_token_id]] * batch_size, opts, cache=self.runner.new_cache(batch_size))
        try:
            for _ in steps:
                pass
        finally:
            steps.close()

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
        histories: list[list[int]] | None = None,
        images: ImageInputs | None = None,
    ) -> Steps:
        """The runner's token loop for checked prompts. Without a cache, the call takes one of its own.

        `histories`: each row's whole transcript before the reply, when the cache already holds
        part of it (the repetition penalty counts it all); default: the prompts. `images`: the
        prompts' images (vision.prepare), positions counted from the start of each prompt.
        """
        grammars = self.row_grammars(options, len(prompts), chat)  # checked before any work
        speculation = speculative.plan(self, options)
        stats = self._local.stats = Stats(prompt_tokens=[len(p) for p in prompts])
        own = cache is None
        feed = prompts
        # Prompt reuse compares image tokens by their image's content (see ImageInputs.keyed).
        compared = prompts if images is None else [images.keyed(row, p) for row, p in enumerate(prompts)]
        if own:
            cache = self.runner.checkout(len(prompts), compared if self.reuse_prompts else None)
            kind, width = sampling_kind([options.sampling(self.defaults)]), 0 if speculation is None else speculation.width
            mine = self.runner.kernels_name(len(prompts), kind, options.logprobs is not None, bool(grammars), images is None, width)
            if cache.kernels not in (None, mine):
                cache.reset()  # written by other kernels: bfloat16 bits would differ from a fresh call's
            if self.reuse_prompts:
                stats.cached_tokens = [cache.reuse(row, p) for row, p in enumerate(compared)]
                feed = [p[kept:] for p, kept in zip(prompts, stats.cached_tokens)]
            else:
                cache.reset()
        stats.cached_tokens = stats.cached_tokens or [0] * len(prompts)
        fed_images = None if images is None else [images.fed(row, kept) for row, kept in enumerate(stats.cached_tokens)]
        steps = generate(
            self.runner,
            cache,
            feed,
            options.sampling(self.defaults),
            options.new_tokens,
            self.stop_ids(options.ignore_eos, chat),
            stats,
            sync_every=sync_every,
            histories=histories or (prompts if own else None),
            top_logprobs=options.logprobs,
            speculation=None if speculation is None else speculative.Speculation(self, speculation, stats),
            images=fed_images,
            grammars=grammars,
        )
        return Steps(self._returning(steps, cache, None if images is None else compared) if own else steps, stats)

    def row_grammars(self, options: GenerationOptions, batch_size: int, chat: bool = False) -> list:
        """One matcher per row for the options' json_schema, regex or grammar (none: an empty list)."""
        constraint = options.constraint
        if constraint is None:
            return []
        compiled = self.grammars.compile(constraint)
        return [compiled.matcher(self.stop_ids(options.ignore_eos, chat)) for _ in range(batch_size)]

    def _returning(self, steps: Iterator[Block], cache: KVCache, compared: list[list] | None = None) -> Iterator[Block]:
        """Pass the blocks through; give the cache back to the pool when the loop ends or is closed."""
        try:
            yield from steps
        finally:
            steps.close()
            if compared is not None:
                vision_inputs.remember(cache, compared)
            self.runner.checkin(cache)

    def text_stream(self, options: GenerationOptions, chat: bool = False) -> TextStream:
        return TextStream(self.decode, options.stop, self.stop_ids(options.ignore_eos, chat))

    def stream_text(self, steps: Steps, text: TextStream) -> Iterator[str]:
        """Text pieces of a one-row token loop, ending at a stop string."""
        try:
            for (piece,) in steps:
                shown = text.add(piece)
                if shown:
                    yield shown
                if text.stopped:
                    break
            if text.stopped:
                steps.stats.finish_reasons[0] = "stop"
            rest = text.flush()
            if rest:
                yield rest
        finally:
            steps.close()

    def _chunks(self, steps: Steps, result: RowResult, options: GenerationOptions) -> Iterator[CompletionChunk]:
        try:
            for block in steps:
                chunk = result.add(block[0], *row_logprobs(block, 0))
                if chunk.text or chunk.token_ids:
                    yield chunk
                if result.stopped:
                    break
            stats = steps.stats
            last = result.last_chunk(stats.finish_reasons[0] if stats.finish_reasons else None)
            if stats.finish_reasons:
                stats.finish_reasons[0] = last.finish_reason
            add_prediction_usage(last.usage, stats.prediction if options.prediction is not None else None, result.token_ids)
            yield last
        finally:
            steps.close()

    def _prompts(self, prompt, chat: bool, system: str | None, given=None):
        """(one prompt?, checked token ids, were they text?, their ImageInputs or None) for complete()'s `prompt`."""
        single, prompts, texts, per = self._prompt_ids(prompt, chat, system, given)
        return single, prompts, texts, None if per is None else vision_inputs.prepare(self.image_encoder, prompts, per)

    def _prompt_ids(self, prompt, chat: bool, system: str | None, given):
        if given is not None and not self.vision:
            raise InvalidArgumentError(vision_inputs.no_vision(self))
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        single = isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(i, int) for i in prompt))
        count = len(prompt) if isinstance(prompt, (list, tuple)) and not single else 1
        per = None if given is None else vision_inputs.per_prompt(given, count, single)
        counts = [None] * count if per is None else [len(p) for p in per]
        if isinstance(prompt, str):
            return True, self.check_prompts([self.encode(prompt, chat=chat, system=system, images=counts[0])]), True, per
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            encoded = [self.encode(p, chat=chat, system=system, images=n) for p, n in zip(prompt, counts)]
            return False, self.check_prompts(encoded), True, per
        if chat or system is not None:
            raise InvalidArgumentError("chat= and system= apply to text prompts; these are token ids")
        if single:
            return True, self.check_prompts([prompt]), False, per
        return False, self.check_prompts(prompt), False, per

    def _row_results(self, prompts, options: GenerationOptions, texts: bool, chat: bool) -> list[RowResult]:
        if options.stop and not texts:
            raise InvalidArgumentError("stop strings need a text prompt; with token ids, use eos ids or max_new_tokens")
        make_text = (lambda: self.text_stream(options, chat)) if texts else None
        return [RowResult.for_prompt(p, make_text, options.logprobs is not None) for p in prompts]

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
    def encode(self, text: str, *, chat: bool = False, system: str | None = None, images: int | None = None) -> list[int]:
        """Token ids of a text prompt. With `images` (how many), each <start_of_image> becomes an
        image's block of tokens, and a chat turn without one gets them at its start."""
        if self.tokenizer is None:
            raise InvalidArgumentError(
                "this checkpoint has no tokenizer.model, so text input is unavailable; pass token ids to generate_ids()"
            )
        if chat:
            text = chat_prompt(text if images is None else images_prompt.with_markers(text, images), system)
        elif system is not None:
            raise InvalidArgumentError("system= needs chat=True")
        if images is None:
            return self.tokenizer.encode(text, bos=True)
        encode = lambda piece: self.tokenizer.encode(piece, bos=False)  # noqa: E731
        return [self.tokenizer.bos_id, *images_prompt.expand(text, encode, self.image_encoder.config)]

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            raise InvalidArgumentError("this checkpoint has no tokenizer.model, so text output is unavailable")
        return self.tokenizer.decode([i for i in ids if i not in self.eos_ids])

    # -------------------------------------------------------------- checking input
    def check_prompts(self, prompts) -> list[list[int]]:
        return check_prompts(prompts, self.config.vocab_size, self.max_seq_len)

    def check_ids(self, ids) -> None:
        check_ids(ids, self.config.vocab_size)
