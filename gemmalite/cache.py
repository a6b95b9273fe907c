"""A static hybrid KV cache: fixed-shape buffers, written in place.

Global layers keep a buffer [B, kv_heads, max_seq_len, head_dim]: position p lives in slot p.
Sliding layers keep a ring of N slots, W (the sliding window) plus the larger of R (the rewind
margin) and the longest prefill chunk: position p lives in slot p % N, so their memory does not
grow with the context.

The only per-row state is `lengths` [B], a tensor: how many tokens each row holds. Everything
the mask needs (which slot holds which position) follows from it, see mask.py.

The write rule, for a chunk of T tokens of which row b holds n[b] real ones: every layer writes
the chunk first, then attends over its buffer. So a key sits in the same slot, and a query sees
its keys in the same order, whether the token came in a decode step, a prefill chunk of any
length or a padded row of a batch: the attention of a token never depends on how it was fed
(see model.attend). On a ring, writing first would overwrite keys that the chunk's early queries
still need if the chunk were long: a ring therefore keeps at least `longest_chunk` slots beyond
its window, and chunks are no longer than that. The chunk's new positions then take slots that
held positions more than W before the chunk, which no query of the chunk can see.

Padding tokens must not clobber anything a later query needs. They are sent to one "spare" slot
per row, the slot the row's next token will take: slot `length` of a global buffer (unused), and
slot `length % N` of a ring (it holds a position more than W back, which no query can see).

Global layers attend over a prefix of their buffer, `span` slots, a power of two no shorter
than what any row holds: a step's cost follows the tokens held, not max_seq_len. The slots past
a row's length are masked, and masked keys add exact zeros, so the span changes no bit.
`high`, on the host, bounds how many tokens any row holds, so choosing a span needs no sync.
Rings do the same while the span is shorter than the ring: no row then holds a position past
the span, and position p < N is in slot p, so the ring's first `span` slots hold every key (a
short reply's sliding layers attend over 256 slots, not W + R).

Stepping back: `rewind` lowers a row's length. Global buffers can drop any number of tokens. A
ring still holds the R positions before the last W, so it can drop up to R: the slots of the
dropped positions are then read as N positions older, out of every later query's window, and
are overwritten before they are needed again. R bounds the drop counted from the furthest the
row has ever reached, so repeated small rewinds cannot add up past it.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch

from .config import GemmaConfig
from .errors import ContextLengthError, InvalidArgumentError
from .mask import chunk_positions, global_slot_positions, ring_slot_positions

MIN_SPAN = 256  # the shortest prefix of a global buffer that a forward attends over
CHUNK_SLOTS = 256  # slots a ring keeps beyond its window at least, so that prefill chunks can write first


class Chunk(NamedTuple):
    """Where one forward's tokens sit: computed once per forward, shared by every layer."""

    start: torch.Tensor  # [B] tokens already in the cache
    n_new: torch.Tensor  # [B] real tokens in this chunk
    positions: torch.Tensor  # [B, T]
    valid: torch.Tensor  # [B, T]
    global_slots: torch.Tensor  # [B, T]
    ring_slots: torch.Tensor  # [B, T]
    span: int  # global slots attended: as many as any row holds after this chunk, or more
    ring_span: int  # ring slots attended: the span while it is shorter than the ring, else the ring


class KVCache:
    def __init__(
        self,
        config: GemmaConfig,
        batch_size: int,
        max_seq_len: int,
        *,
        rewind_margin: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        static: bool = True,
    ):
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.window = min(config.sliding_window, max_seq_len)
        # Beyond its window a ring keeps room to rewind and room for a chunk to be written first.
        # A ring as long as the context never wraps and can rewind anything; none needs to be longer.
        extra = max(rewind_margin, min(self.window, CHUNK_SLOTS))
        self.ring = min(config.sliding_window + extra, max_seq_len)
        self.longest_chunk = max_seq_len if self.ring == max_seq_len else extra
        self.rewind_margin = max_seq_len if self.ring == max_seq_len or not any(config.sliding_layers) else rewind_margin
        self.sliding = config.sliding_layers
        # A graph traced for every span (builder.py) takes the ring's span as a size of its own.
        self.traced_ring_span = None
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for sliding in self.sliding:
            # A buffer has one slot more than the longest span, so that a span's slice is never
            # the whole buffer: packaged graphs take the span as a symbolic size (packages.py).
            slots = self.ring + 1 if sliding else max_seq_len + 1
            shape = (batch_size, config.num_kv_heads, slots, config.head_dim)
            self.keys.append(torch.zeros(shape, device=device, dtype=dtype))
            self.values.append(torch.zeros(shape, device=device, dtype=dtype))
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.high = 0  # host-side: no row holds more tokens than this
        self.reached = [0] * batch_size  # host-side: the longest each row has been (see rewind)
        # Host-side: the token ids each row holds, for callers that reuse prompts; None = unknown.
        self.tokens: list[list[int] | None] = [[] for _ in range(batch_size)]
        # Row index for writes [B, 1]; made on the CPU and moved: arange on the meta device (packages.py
        # describes caches there) imports PyTorch's Python meta kernels, 0.24 s.
        self.rows = torch.arange(batch_size)[:, None].to(device)
        # Which kernels wrote what the rows hold ("eager", "compiled", "packaged"; None: nothing yet).
        # bfloat16 results repeat only among calls that ran the same kernels (see loop.generate).
        self.kernels: str | None = None
        self.static = static
        self._mark_static()

    def _mark_static(self):
        # The buffers never move, so CUDA graphs may read and write them in place. Only a compiled
        # runner's caches say so: the marking imports torch's compiler (seconds), which eager needs not.
        if not self.static:
            return
        for t in (*self.keys, *self.values, self.lengths):
            torch._dynamo.mark_static_address(t)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def leading_rows(self, n: int) -> "KVCache":
        """The first `n` rows as a cache of their own, on this cache's buffers (views, written in place).

        A forward on it reads and writes only those rows, at the cost of `n`. The host-side books
        (high, tokens, reached) are this cache's: whoever steps the view hands `high` back.
        """
        view = copy.copy(self)
        view.batch_size = n
        view.keys = [t[:n] for t in self.keys]
        view.values = [t[:n] for t in self.values]
        view.lengths = self.lengths[:n]
        view.rows = self.rows[:n]
        view._mark_static()
        return view

    def swap_rows(self, a: int, b: int, scratch: "KVCache") -> None:
        """Exchange what rows `a` and `b` hold, through row 0 of `scratch` (a one-row cache)."""
        scratch.copy_row(0, self, a)
        self.copy_row(a, self, b)
        self.copy_row(b, scratch, 0)

    def reset(self, row: int | None = None) -> None:
        """Empty every row, or one."""
        if row is None:
            self.lengths.zero_()
            self.high = 0
            self.kernels = None
            self.reached = [0] * self.batch_size
            self.tokens = [[] for _ in range(self.batch_size)]
        else:
            self.lengths[row] = 0
            self.reached[row] = 0
            self.tokens[row] = []
            self.high = max(self.lengths.tolist())

    def fork(self) -> "KVCache":
        """An independent copy of this cache (for branching a conversation)."""
        other = copy.copy(self)
        other.keys = [t.clone() for t in self.keys]
        other.values = [t.clone() for t in self.values]
        other.lengths = self.lengths.clone()
        other.reached = list(self.reached)
        other.tokens = [None if t is None else list(t) for t in self.tokens]
        other._mark_static()
        return other

    def copy_row(self, row: int, src: "KVCache", src_row: int) -> None:
        """Make `row` hold exactly what `src_row` of `src` holds (a cache of the same runner)."""
        length = int(src.lengths[src_row])
        for sliding, k_src, k_dst, v_src, v_dst in zip(src.sliding, src.keys, self.keys, src.values, self.values):
            # A global buffer holds position p in slot p: slots past the length are never read.
            upto = None if sliding else length
            k_dst[row, :, :upto].copy_(k_src[src_row, :, :upto])
            v_dst[row, :, :upto].copy_(v_src[src_row, :, :upto])
        self.lengths[row] = length
        self.high = max(self.high, length)
        self.reached[row] = src.reached[src_row]
        self.tokens[row] = None if src.tokens[src_row] is None else list(src.tokens[src_row])

    def shared_prefix(self, row: int, tokens: list[int]) -> int:
        """How many leading `tokens` this row already holds (0 when what it holds is unknown)."""
        held = self.tokens[row]
        if held is None:
            return 0
        n = 0
        for a, b in zip(held, tokens):
            if a != b:
                break
            n += 1
        return n

    def reuse(self, row: int, prompt: list[int]) -> int:
        """Keep the longest part of this row that `prompt` starts with; return how many tokens that is.

        The row steps back to where the prompt parts from what it holds (leaving at least the
        prompt's last token to feed, for its logits); when it cannot step back that far, it is
        emptied and nothing is kept.
        """
        keep = min(self.shared_prefix(row, prompt), len(prompt) - 1)
        drop = int(self.lengths[row]) - keep
        if keep <= 0 or drop > self.rewindable(row):
            self.reset(row)
            return 0
        self.rewind(drop, row)
        return keep

    def rewindable(self, row: int) -> int:
        """How many tokens `row` can drop now."""
        length = int(self.lengths[row])
        reached = max(self.reached[row], length)
        return max(0, min(length, length - (reached - self.rewind_margin)))

    def rewind(self, n: int, row: int = 0) -> None:
        """Drop the last `n` tokens of `row`, exactly, as if they had never been fed."""
        length = int(self.lengths[row])
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidArgumentError(f"rewind takes a number of tokens >= 0, got {n!r}")
        if n and length == 0:
            raise InvalidArgumentError("cannot rewind an empty cache")
        if n > self.rewindable(row):
            raise InvalidArgumentError(
                f"cannot rewind {n} tokens: row {row} holds {length} and can drop at most {self.rewindable(row)} "
                f"(rewind margin {self.rewind_margin}); prefill again instead"
            )
        self.reached[row] = max(self.reached[row], length)
        self.lengths[row] = length - n
        self.high = max(self.lengths.tolist())
        if self.tokens[row] is not None:
            self.tokens[row] = self.tokens[row][: length - n]

    def check_room(self, new_tokens: list[int]) -> None:
        """Raise unless every row can take its new tokens and still leave a slot free."""
        for row, (have, extra) in enumerate(zip(self.lengths.tolist(), new_tokens)):
            if have + extra >= self.max_seq_len:
                raise ContextLengthError(
                    f"row {row}: {have} cached + {extra} new tokens do not fit in max_seq_len="
                    f"{self.max_seq_len} ({max(self.max_seq_len - 1 - have, 0)} tokens left); "
                    "load with a larger max_seq_len or shorten the input"
                )

    # ---------------------------------------------------------------- the write rule
    def span(self, tokens: int) -> int:
        """How many global slots to attend over when no row holds more than `tokens`."""
        span = MIN_SPAN
        while span < tokens:
            span *= 2
        return min(span, self.max_seq_len)

    def ring_span(self, span: int) -> int:
        """How many ring slots to attend over with this span: the span while it is shorter than the ring."""
        return min(span, self.ring)

    def spans(self) -> list[int]:
        """Every span a forward can take: the bounded set of attention lengths (and graphs)."""
        out = [self.span(1)]
        while out[-1] < self.max_seq_len:
            out.append(self.span(out[-1] + 1))
        return out

    def chunk(self, n_new: torch.Tensor, length: int, span: int | None = None) -> Chunk:
        """Where a chunk of `length` tokens goes; global layers attend over `span` slots (default: all)."""
        if length > self.longest_chunk:  # a shape, known when tracing: no sync
            raise ValueError(f"a chunk of {length} tokens is longer than this cache takes ({self.longest_chunk}); split it")
        start = self.lengths
        positions, valid = chunk_positions(start, n_new, length)
        spare = start + n_new  # the slot this row's next token will take
        global_slots = torch.where(valid, positions, spare[:, None]).clamp(max=self.max_seq_len - 1)
        ring_slots = torch.remainder(torch.where(valid, positions, spare[:, None]), self.ring)
        span = span or self.max_seq_len
        ring_span = self.traced_ring_span if self.traced_ring_span is not None else self.ring_span(span)
        return Chunk(start, n_new, positions, valid, global_slots, ring_slots, span, ring_span)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, chunk: Chunk):
        """Store a chunk's k, v [B, kv_heads, T, head_dim]; return the keys and values to attend to."""
        keys, values = self.keys[layer], self.values[layer]
        slots = chunk.ring_slots if self.sliding[layer] else chunk.global_slots
        # Indexing [rows, :, slots] puts the indexed dims first: the values go in as [B, T, H, D].
        keys[self.rows, :, slots] = k.transpose(1, 2)
        values[self.rows, :, slots] = v.transpose(1, 2)
        n = chunk.ring_span if self.sliding[layer] else chunk.span
        return keys[:, :, :n], values[:, :, :n]

    def key_positions(self, chunk: Chunk, sliding: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions and validity of the keys that `update` returns for this kind of layer."""
        if sliding:
            return ring_slot_positions(chunk.start + chunk.n_new, self.ring, chunk.ring_span)
        return global_slot_positions(chunk.start + chunk.n_new, chunk.span)

    def advance(self, chunk: Chunk) -> None:
        self.lengths.add_(chunk.n_new)
