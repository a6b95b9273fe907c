"""The engine: load a checkpoint, prefill in chunks, decode with one compiled step.

Compile lives here, at the edge: the model stays eager, and the engine compiles one function,
`decode_step`, with `torch.compile(mode="reduce-overhead", fullgraph=True)`. Every input that
changes between steps (tokens, which rows are still active, cache lengths, sampling settings) is
a tensor, so the step compiles once per batch size and per mode (greedy or sampling), and on CUDA
each later call replays a CUDA graph.

Prefill runs eagerly, in chunks no longer than the sliding window (see cache.py for why).
"""

from __future__ import annotations

import os
import time
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .cache import KVCache
from .config import GemmaConfig
from .errors import ContextLengthError, InvalidArgumentError, ModelLoadError
from .model import Gemma3
from .sampling import SamplerState, SamplingSettings, greedy, sample, sampler_state
from .tokenizer import END_OF_TURN, Tokenizer, chat_prompt
from .weights import Checkpoint, load_state_dict, read_checkpoint, resolve

if TYPE_CHECKING:
    from .session import Session

DEFAULT_MAX_SEQ_LEN = 8192
DEFAULT_MAX_NEW_TOKENS = 256
PREFILL_CHUNK = 512
EOS_SLOTS = 4  # eos ids are passed as a fixed-size tensor, padded with -1, so they never change a shape
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


def decode_step(
    model: Gemma3,
    cache: KVCache,
    tokens: torch.Tensor,  # [B] the last token of each row, to be fed now
    active: torch.Tensor,  # [B] bool; inactive rows are frozen: fed as padding, their token repeated
    sampler: SamplerState | None,  # None: greedy
    eos_ids: torch.Tensor,  # [EOS_SLOTS]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed one token per row and choose the next. No host sync: this is the compiled graph."""
    logits = model(tokens[:, None], cache, n_new=active.long())[:, -1]
    next_tokens = greedy(logits) if sampler is None else sample(logits, sampler, cache.lengths)
    next_tokens = torch.where(active, next_tokens, tokens)
    finished = (next_tokens[:, None] == eos_ids).any(-1) | (cache.lengths >= cache.max_seq_len - 1)
    return next_tokens, active & ~finished


def _own_copy(fn):
    """A new function with its own code object, otherwise identical to `fn`."""
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__doc__, copy.__qualname__ = fn.__doc__, fn.__qualname__
    return copy


@dataclass
class Stats:
    """Figures from the last generation call."""

    prompt_tokens: list[int] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)  # "stop" (eos or stop string) or "length"
    prefill_s: float = 0.0  # time to first token
    decode_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(self.new_tokens, default=0) - 1
        return steps / self.decode_s if self.decode_s > 0 and steps > 0 else 0.0


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
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.max_seq_len = max_seq_len
        self.defaults = defaults
        self.eos_ids = tuple(dict.fromkeys([*model.config.eos_token_ids, *eos_ids]))
        self.compiled = compile
        # Dynamo keeps compiled graphs per code object and caps how many one may hold. Each engine
        # compiles its own copy of decode_step, so engines never crowd out each other's graphs.
        self._step_fn = _own_copy(decode_step)
        self._step = self._step_fn
        if compile:
            # On CPU there are no CUDA graphs to replay; a C++ wrapper cuts the per-kernel Python
            # overhead instead (it cannot be combined with CUDA graphs, so CUDA keeps the default).
            options = {"cpp_wrapper": True} if device.type == "cpu" else None
            mode = "reduce-overhead" if options is None else None
            self._step = torch.compile(self._step_fn, mode=mode, options=options, fullgraph=True, dynamic=False)
        self._cache: KVCache | None = None
        self.last_stats = Stats()

    @property
    def config(self) -> GemmaConfig:
        return self.model.config

    def graph_count(self) -> int:
        """How many graphs this engine's decode step has compiled (one per batch size and mode)."""
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return len(_debug_get_cache_entry_list(self._step_fn.__code__)) if self.compiled else 0

    # -------------------------------------------------------------- public API
    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Float32 logits [B, T, vocab] of a plain full-sequence forward, with no cache."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int):
            raise InvalidArgumentError("logits() takes a LongTensor of token ids shaped [batch, tokens]")
        self._check_ids(ids.flatten().tolist())
        return self.model(ids.to(self.device, torch.long)).float()

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        seed: int | None = None,
        ignore_eos: bool = False,
    ) -> list[list[int]]:
        """New tokens for each prompt, ending with the eos token when one was produced.

        Sampling arguments left as None take the checkpoint's defaults (generation_config.json),
        else greedy. top_k=0, top_p=1 and min_p=0 switch a filter off.
        """
        steps, _ = self._run(
            prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            min_p=min_p, seed=seed, ignore_eos=ignore_eos,
        )
        out = [[] for _ in prompts]
        for pieces in steps:
            for row, piece in zip(out, pieces):
                row.extend(piece)
        return out

    def generate(
        self,
        prompt: str | Sequence[str],
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        seed: int | None = None,
        ignore_eos: bool = False,
        stop: str | Sequence[str] | None = None,
        chat: bool = False,
        system: str | None = None,
    ) -> str | list[str]:
        """The continuation of a prompt (or of each prompt in a list), as text."""
        single = isinstance(prompt, str)
        texts = [prompt] if single else list(prompt) if isinstance(prompt, (list, tuple)) else None
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InvalidArgumentError(
                "generate() takes a prompt string or a non-empty list of them, all strings; "
                "use generate_ids() for token ids"
            )
        stops = _stops(stop)
        steps, eos = self._run(
            [self.encode(t, chat=chat, system=system) for t in texts], chat=chat, max_new_tokens=max_new_tokens,
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, ignore_eos=ignore_eos,
        )
        decoded = [_TextTail(self, stops, eos) for _ in texts]
        for pieces in steps:
            for tail, piece in zip(decoded, pieces):
                tail.add(piece)
            if all(t.stopped for t in decoded):
                steps.close()
                break
        for row, tail in enumerate(decoded):
            if tail.stopped:
                self.last_stats.finish_reasons[row] = "stop"
        results = [t.finish() for t in decoded]
        return results[0] if single else results

    def stream(
        self,
        prompt: str,
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        seed: int | None = None,
        ignore_eos: bool = False,
        stop: str | Sequence[str] | None = None,
        chat: bool = False,
        system: str | None = None,
    ) -> Iterator[str]:
        """Yield the continuation as text pieces while tokens arrive (never half a UTF-8 character)."""
        if not isinstance(prompt, str):
            raise InvalidArgumentError("stream() takes one prompt string")
        stops = _stops(stop)
        steps, eos = self._run(
            [self.encode(prompt, chat=chat, system=system)], chat=chat, sync_every=1, max_new_tokens=max_new_tokens,
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, ignore_eos=ignore_eos,
        )
        return self._stream_text(steps, _TextTail(self, stops, eos))

    def _run(
        self,
        prompts,
        *,
        chat: bool = False,
        sync_every: int = 8,
        cache: KVCache | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        seed: int | None = None,
        ignore_eos: bool = False,
    ) -> tuple[Iterator[list[list[int]]], tuple[int, ...]]:
        """Check every argument now, then return the (lazy) token steps and the eos ids in force."""
        prompts = self._check_prompts(prompts)
        settings = self._settings(temperature, top_k, top_p, min_p, seed)
        eos = self._eos(ignore_eos, chat)
        return self._generate(prompts, settings, _max_new(max_new_tokens), eos, sync_every, cache), eos

    def _stream_text(self, steps: Iterator[list[list[int]]], tail: "_TextTail") -> Iterator[str]:
        try:
            for (piece,) in steps:
                text = tail.add(piece)
                if text:
                    yield text
                if tail.stopped:
                    self.last_stats.finish_reasons[0] = "stop"
                    break
            rest = tail.flush()
            if rest:
                yield rest
        finally:
            steps.close()

    def session(self, system: str | None = None, chat: bool = True) -> "Session":
        """A multi-turn conversation that keeps its own cache; see session.py."""
        from .session import Session

        return Session(self, system=system, chat=chat)

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

    # -------------------------------------------------------------- the loop
    def kv_cache(self, batch_size: int) -> KVCache:
        """The engine's cache for this batch size, reused across calls so compiled graphs stay valid."""
        if self._cache is None or self._cache.batch_size != batch_size:
            self._cache = None  # free the old buffers before allocating new ones
            self._cache = KVCache(self.config, batch_size, self.max_seq_len, device=self.device, dtype=self.dtype)
        return self._cache

    @torch.no_grad()
    def prefill(self, cache: KVCache, chunks: Sequence[Sequence[int]]) -> torch.Tensor:
        """Append each row's tokens to the cache; return float32 logits [B, vocab] of each row's last token."""
        lengths = [len(c) for c in chunks]
        cache.check_room(lengths)
        width = min(PREFILL_CHUNK, cache.window)
        ids = torch.zeros(len(chunks), max(lengths), dtype=torch.long)
        for row, chunk in enumerate(chunks):
            ids[row, : len(chunk)] = torch.as_tensor(chunk, dtype=torch.long)
        ids = ids.to(self.device)
        remaining = torch.tensor(lengths, device=self.device)
        last = torch.zeros(len(chunks), self.config.vocab_size, device=self.device)
        for start in range(0, max(lengths), width):
            n_new = (remaining - start).clamp(0, width)
            logits = self.model(ids[:, start : start + width], cache, n_new=n_new, last_only=True)[:, 0]
            ends_here = (n_new > 0) & (remaining <= start + width)
            last = torch.where(ends_here[:, None], logits.float(), last)
        return last

    def _generate(
        self,
        prompts: list[list[int]],
        settings: SamplingSettings,
        max_new_tokens: int,
        eos_ids: tuple[int, ...],
        sync_every: int = 8,
        cache: KVCache | None = None,
    ) -> Iterator[list[list[int]]]:
        """Yield, every `sync_every` steps, the tokens each row produced since the last yield.

        Without a cache, the engine's own starts empty; with one (a session's), the prompts are
        appended to what it holds. Rows stop at an eos id, at max_new_tokens, or when their
        transcript reaches max_seq_len.
        """
        stats = self.last_stats = Stats(prompt_tokens=[len(p) for p in prompts])
        batch = len(prompts)
        if cache is None:
            cache = self.kv_cache(batch)
            cache.reset()
        held = cache.lengths.tolist()
        limits = [min(max_new_tokens, self.max_seq_len - have - len(p)) for have, p in zip(held, prompts)]
        produced = [0] * batch
        reasons: list[str | None] = [None] * batch
        stats.new_tokens, stats.finish_reasons = produced, reasons
        if max_new_tokens == 0:
            stats.finish_reasons[:] = ["length"] * batch
            yield [[] for _ in prompts]
            return

        eos_tensor = torch.full((EOS_SLOTS,), -1, dtype=torch.long)
        eos_tensor[: len(eos_ids)] = torch.tensor(eos_ids[:EOS_SLOTS], dtype=torch.long)
        eos_tensor = eos_tensor.to(self.device)
        sampler = None if settings.greedy else sampler_state(settings, batch, self.device)

        started = time.perf_counter()
        with torch.no_grad():
            logits = self.prefill(cache, prompts)
            tokens = greedy(logits) if sampler is None else sample(logits, sampler, cache.lengths)
            active = (tokens[:, None] != eos_tensor).all(-1) & (cache.lengths < self.max_seq_len - 1)
            pending = [tokens]
            first = True
            while True:
                if len(pending) >= sync_every or len(pending) + max(produced) >= max(limits) or first:
                    block = torch.stack(pending, 1).tolist()
                    pending.clear()
                    if first:
                        stats.prefill_s = time.perf_counter() - started
                        decode_started = time.perf_counter()
                        first = False
                    yield [self._take(row, block[row], produced, limits, reasons, eos_ids) for row in range(batch)]
                    stats.decode_s = time.perf_counter() - decode_started
                    if all(r is not None for r in reasons):
                        return
                if self.device.type == "cuda" and self.compiled:
                    torch.compiler.cudagraph_mark_step_begin()
                tokens, active = self._step(self.model, cache, tokens, active, sampler, eos_tensor)
                # Graph outputs are overwritten by the next replay: keep copies.
                tokens, active = tokens.clone(), active.clone()
                pending.append(tokens)

    @staticmethod
    def _take(row, tokens, produced, limits, reasons, eos_ids) -> list[int]:
        taken = []
        for token in tokens:
            if reasons[row] is not None:
                break
            taken.append(token)
            produced[row] += 1
            if token in eos_ids:
                reasons[row] = "stop"
            elif produced[row] >= limits[row]:
                reasons[row] = "length"
        return taken

    # -------------------------------------------------------------- checking input
    def _settings(self, temperature, top_k, top_p, min_p, seed) -> SamplingSettings:
        d = self.defaults
        return SamplingSettings(
            temperature=d.temperature if temperature is None else temperature,
            top_k=d.top_k if top_k is None else top_k,
            top_p=d.top_p if top_p is None else top_p,
            min_p=d.min_p if min_p is None else min_p,
            seed=seed,
        )

    def _eos(self, ignore_eos: bool, chat: bool = False) -> tuple[int, ...]:
        if ignore_eos:
            return ()
        ids = list(self.eos_ids)
        if chat and self.tokenizer is not None:
            end_of_turn = self.tokenizer.token_id(END_OF_TURN)
            if end_of_turn is not None:
                ids.append(end_of_turn)
        return tuple(dict.fromkeys(ids))[:EOS_SLOTS]

    def _check_prompts(self, prompts) -> list[list[int]]:
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
            self._check_ids(prompt)
            if len(prompt) >= self.max_seq_len:
                raise ContextLengthError(
                    f"prompt {row} has {len(prompt)} tokens, but max_seq_len is {self.max_seq_len}; "
                    "shorten it or load with a larger max_seq_len"
                )
            checked.append([int(i) for i in prompt])
        return checked

    def _check_ids(self, ids) -> None:
        vocab = self.config.vocab_size
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab]
        if bad:
            raise InvalidArgumentError(f"token ids must be integers in [0, {vocab}); got {bad[:5]}")


class _TextTail:
    """Turns a row's tokens into text safely: whole UTF-8 characters only, and cut at stop strings."""

    def __init__(self, engine: Engine, stops: tuple[str, ...], eos_ids: tuple[int, ...]):
        self.engine, self.stops, self.eos_ids = engine, stops, eos_ids
        self.ids: list[int] = []
        # Text of ids[:settled], which ended on a whole character: only the rest is decoded again.
        self.settled, self.settled_text = 0, ""
        self.text = ""  # everything decoded so far, up to any stop string
        self.emitted = 0
        self.stopped = False

    def add(self, tokens: list[int]) -> str:
        """Take new tokens; return the text that is now safe to show."""
        if self.stopped:
            return ""
        self.ids.extend(t for t in tokens if t not in self.eos_ids)
        recent = self.engine.decode(self.ids[self.settled :])
        self.text = self.settled_text + recent
        if "\ufffd" not in recent:
            self.settled, self.settled_text = len(self.ids), self.text
        safe = len(self.text)
        for stop in self.stops:
            at = self.text.find(stop, max(self.emitted - len(stop), 0))
            if at >= 0:
                self.text, self.stopped, safe = self.text[:at], True, at
                break
        if not self.stopped:
            # Hold back a character still being assembled from byte tokens, and any text that
            # could be the start of a stop string.
            while safe > self.emitted and self.text[safe - 1] == "\ufffd":
                safe -= 1
            for stop in self.stops:
                for k in range(len(stop) - 1, 0, -1):
                    if self.text[:safe].endswith(stop[:k]):
                        safe = min(safe, len(self.text[:safe]) - k)
                        break
        piece = self.text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return piece

    def flush(self) -> str:
        piece = self.text[self.emitted :]
        self.emitted = len(self.text)
        return piece

    def finish(self) -> str:
        return self.text


def _stops(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise InvalidArgumentError("stop must be a non-empty string or a list of them")
    return stops


def _max_new(value) -> int:
    if value is None:
        return DEFAULT_MAX_NEW_TOKENS
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgumentError(f"max_new_tokens must be an integer >= 0, got {value!r}")
    return value


# ------------------------------------------------------------------ loading
def parse_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidArgumentError(f"unknown device {device!r}; use 'cpu' or 'cuda' (or 'cuda:N')") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgumentError("device 'cuda' was asked for, but no CUDA GPU is available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidArgumentError(f"device {device!r} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise InvalidArgumentError(f"device {device!r} is not supported; use 'cpu' or 'cuda'")
    return dev


def parse_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16
    if dtype in (torch.float16, "float16", "fp16", "half"):
        raise InvalidArgumentError("float16 is refused: Gemma 3 activations overflow in fp16; use bfloat16 or float32")
    if isinstance(dtype, torch.dtype) and dtype in (torch.bfloat16, torch.float32):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise InvalidArgumentError(f"unknown dtype {dtype!r}; use 'bfloat16' or 'float32'")


def generation_defaults(checkpoint: Checkpoint) -> tuple[SamplingSettings, tuple[int, ...]]:
    """Sampling defaults and extra eos ids from generation_config.json; greedy when it has none."""
    gc = checkpoint.generation_config
    eos = gc.get("eos_token_id") or ()
    eos = (eos,) if isinstance(eos, int) else tuple(eos)
    if not gc.get("do_sample"):
        return SamplingSettings(), eos
    try:
        settings = SamplingSettings(
            temperature=float(gc.get("temperature") or 1.0),
            top_k=int(gc.get("top_k") or 0),
            top_p=float(gc.get("top_p") or 1.0),
            min_p=float(gc.get("min_p") or 0.0),
        )
    except InvalidArgumentError as e:
        raise ModelLoadError(f"generation_config.json has invalid sampling values: {e}") from None
    return settings, eos


def load(
    source: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    compile: bool | None = None,
    max_seq_len: int | None = None,
    quantize: str | None = None,
) -> Engine:
    """Load a Gemma 3 checkpoint (local dir, .gguf file or Hub repo id) into an Engine.

    quantize="int8" stores most linear weights and the head as int8 (CPU only); see quantize.py.
    """
    if quantize not in (None, "int8"):
        raise InvalidArgumentError(f"unknown quantize={quantize!r}; the choices are None and 'int8'")
    device = parse_device(device)
    if quantize == "int8":
        if device.type != "cpu":
            raise InvalidArgumentError("quantize='int8' runs on CPU only (fbgemm kernels); on CUDA use bfloat16")
    dtype = parse_dtype(dtype)
    if compile is None:
        compile = device.type == "cuda"
    checkpoint = read_checkpoint(resolve(source))
    config = checkpoint.config
    if max_seq_len is None:
        max_seq_len = min(config.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or not 2 <= max_seq_len <= config.max_position_embeddings:
        raise InvalidArgumentError(
            f"max_seq_len must be an integer in [2, {config.max_position_embeddings}] for this model, got {max_seq_len!r}"
        )

    # Build on the meta device, then take the checkpoint's tensors as the parameters: no second copy.
    with torch.device("meta"):
        model = Gemma3(config)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    state = load_state_dict(checkpoint, expected, device, dtype)
    model.load_state_dict(state, assign=True)
    model.eval().requires_grad_(False)
    if quantize == "int8":
        from .quantize import quantize_int8

        del state
        quantize_int8(model)

    tokenizer = Tokenizer(checkpoint.tokenizer_file) if checkpoint.tokenizer_file else None
    defaults, extra_eos = generation_defaults(checkpoint)
    return Engine(
        model,
        tokenizer,
        device=device,
        dtype=dtype,
        compile=bool(compile),
        max_seq_len=max_seq_len,
        defaults=defaults,
        eos_ids=extra_eos,
    )
