"""Where a scheduler's requests sit: prompts prefilled in a staging cache, rows kept packed low.

A step sized to the busy rows. The step decodes the first B rows of the cache, B the smallest of
a few batch sizes (1, 2, 4, 8 ... up to `parallel`, see batch_sizes) that covers the decoding
rows, so a lone request pays for one row, and each size compiles once per sampling kind. Rows in
that range with nothing to decode are frozen (inactive). Decoding rows are kept packed low: a
prompt whose slot lies above the size it needs is copied from the staging cache into a free row
below instead (that row's cache moves up, in exchange: one extra copy); and when requests end
and a smaller size would do, a decoding row above it swaps with a free row below (three copies,
through the staging cache, so only while no prompt is in it). Moving a row changes no token: a
row's position in the batch plays no part in what it computes.

Prompts are prefilled in a one-row staging cache, then copied into their slot's row: a prefill
pads every row of a batch to the longest chunk, so one prompt prefilled in a batch of 8 would
cost eight prompts' compute.

`Placement` is the part of batching.Scheduler that does this; it works on the scheduler's slots,
cache, staging cache, sampler, penalties and grammar guide.
"""

from __future__ import annotations

import torch

from .options import MAX_LOGPROBS
from .runner import PREFILL_CHUNK, choose
from .sampling import GREEDY, Penalties, SamplerState, count_tokens, logprobs, row_view, sampling_kind
from .slots import Request, Slot
from .vision.inputs import remember

PREFILL_BUDGET = PREFILL_CHUNK  # prompt tokens prefilled between two decode steps while others decode


def batch_sizes(parallel: int) -> list[int]:
    """The batch sizes a decode step may take: powers of two below `parallel`, then `parallel`."""
    sizes = [1]
    while sizes[-1] * 2 < parallel:
        sizes.append(sizes[-1] * 2)
    return sizes if sizes[-1] == parallel else [*sizes, parallel]


def leading_views(state: SamplerState | Penalties, n: int):
    """The first n rows of a SamplerState or Penalties, as views."""
    return type(state)(*(t[:n] for t in state))


class Placement:
    """Prefill through the staging cache, and the moves that keep decoding rows low (see the module doc)."""

    def _prefill(self) -> None:
        """Prefill waiting prompts, oldest first, one at a time in the staging cache: all of them when
        no one is decoding, else up to PREFILL_BUDGET tokens (a long prompt goes on at the next turn).
        """
        budget = PREFILL_BUDGET if any(s.decoding for s in self.slots) else None
        while budget is None or budget > 0:
            slot = self._filling
            if slot is None:
                waiting = [s for s in self.slots if s.request is not None and s.pending]
                if not waiting:
                    return
                slot = min(waiting, key=lambda s: s.admitted)
            chunk = slot.pending if budget is None else slot.pending[: _whole_images(slot, budget)]
            if budget is not None:
                budget -= len(chunk)
            self._prefill_piece(slot, chunk)

    def _prefill_piece(self, slot: Slot, chunk: list[int]) -> None:
        """Append `chunk` of the slot's prompt in the staging cache; after the last piece, the first token."""
        try:
            if self._filling is None:
                if int(self.cache.lengths[slot.row]):
                    self.staging.copy_row(0, self.cache, slot.row)
                else:
                    self.staging.reset()
                self._filling = slot
            images = None
            if slot.request.images is not None:
                start = len(slot.request.prompt) - len(slot.pending)
                images = [[(s, f) for s, f in slot.request.images.fed(0, start) if s.start < len(chunk)]]
            with torch.no_grad(), self.runner.lock:
                logits = self.runner.prefill(self.staging, [chunk], images)
            slot.pending = slot.pending[len(chunk) :]
            if slot.pending:
                return
            if slot.request.images is not None:
                remember(self.staging, [compared_prompt(slot.request)])
            self._place(slot)
            self._filling = None
            token, chosen = self._first_token(slot, logits)
        except Exception as error:
            self._filling = None
            self._fail([slot], error)
            return
        slot.decoding = True
        self._emit(slot, token, chosen)

    @torch.no_grad()
    def _first_token(self, slot: Slot, logits: torch.Tensor):
        """Pick the first new token from the prompt's last logits [1, vocab], as a call of its own would."""
        row = slot.row
        kind = sampling_kind([slot.settings])
        sampler = None if kind == GREEDY else row_view(self.sampler, row)
        penalty: Penalties = row_view(self.penalties, row)
        allowed = self.guide.allowed(row) if row in self.guide.rows else None
        token = choose(logits, sampler, penalty, self.cache.lengths[row : row + 1], kind, allowed)
        count_tokens(penalty, token, torch.ones_like(token, dtype=torch.bool))
        chosen = logprobs(logits, token, MAX_LOGPROBS) if slot.top is not None else None
        return int(token[0]), None if chosen is None else [t[0].tolist() for t in chosen]

    def _size_for(self, rows: int) -> int:
        return next(n for n in self.sizes if n >= rows)

    def _place(self, slot: Slot) -> None:
        """Copy a prefilled prompt from the staging cache into its slot's row, or into a free row
        below the batch size the decoding rows will need when its own is above it."""
        size = self._size_for(1 + sum(s.decoding for s in self.slots))
        free = [s for s in self.slots if s.request is None and s.row < size]
        if slot.row >= size and free:
            into = min(free, key=lambda s: s.last_used)
            self.cache.copy_row(slot.row, self.cache, into.row)  # the free slot's cache moves up
            self._exchange(slot, into)
        self.cache.copy_row(slot.row, self.staging, 0)

    def _pack(self, rows: list[Slot]) -> int:
        """The batch size for a step of these decoding rows, after moving those above the smallest
        size that could hold them into free rows below it (only while the staging cache is free)."""
        size = self._size_for(len(rows))
        if self._filling is None:
            free = sorted((s for s in self.slots if s.request is None and s.row < size), key=lambda s: s.row)
            for slot, into in zip([s for s in rows if s.row >= size], free):
                self.cache.swap_rows(slot.row, into.row, self.staging)
                self._exchange(slot, into)
        return self._size_for(1 + max(s.row for s in rows))

    def _exchange(self, a: Slot, b: Slot) -> None:
        """Swap two slots' rows: their sampling and penalty settings, and their row numbers."""
        for t in (*self.sampler, *self.penalties):
            t[[a.row, b.row]] = t[[b.row, a.row]]
        self.guide.swap(a.row, b.row)
        a.row, b.row = b.row, a.row


def compared_prompt(request: Request) -> list:
    """The prompt as prompt reuse compares it: image tokens by their image's content (see vision.inputs)."""
    return request.prompt if request.images is None else request.images.keyed(0, request.prompt)


def _whole_images(slot: Slot, budget: int) -> int:
    """How many of the slot's pending tokens to prefill now, about `budget`: never part of an image."""
    if slot.request.images is None:
        return budget
    start = len(slot.request.prompt) - len(slot.pending)
    for span, _ in slot.request.images.fed(0, start):
        if span.start < budget < span.end:
            return span.start or span.end  # an image that opens the piece is fed whole
    return budget
