"""A request for the scheduler, and the slot (one cache row) that serves it.

A `Request` is what a caller hands `Scheduler.submit`: checked prompt ids and options, and a
callback for its CompletionChunks. A `Slot` is one row of the scheduler's cache with the
request it is serving, if any, and that request's progress: the prompt tokens still to
prefill, the tokens produced, the budget and stop ids. See batching.py for the loop that
moves them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .completion import CompletionChunk, RowResult
from .options import GenerationOptions


@dataclass(eq=False)
class Request:
    """One generation: checked prompt ids and options, and where its chunks go.

    `deliver` is called from the scheduler's thread with each CompletionChunk, or once with an
    exception; it must not block. Set `cancelled` through Scheduler.cancel.
    """

    prompt: list[int]
    options: GenerationOptions
    deliver: Callable[[CompletionChunk | BaseException], None]
    chat: bool = False  # stop at <end_of_turn> as well as eos
    reuse: bool = True  # may start from a slot's cached prefix
    cancelled: bool = False
    images: object = None  # the prompt's vision.ImageInputs, or None


class Slot:
    """One row of the cache and the request it serves (None when free); the cache knows the row's tokens."""

    def __init__(self, row: int):
        self.row = row
        self.last_used = 0  # when its last request ended: free slots are taken least recently used first
        self.release()

    def release(self) -> None:
        self.request: Request | None = None
        self.pending: list[int] = []  # prompt tokens still to prefill
        self.decoding = False
        self.admitted = 0
        self.speculation = None  # a batch_drafts.RowSpeculation when the request drafts

    def start(self, request: Request, settings, budget: int, stop_ids, result: RowResult, kept: int, admitted: int):
        self.request, self.settings, self.budget, self.stop_ids, self.result = request, settings, budget, stop_ids, result
        self.top = request.options.logprobs  # None: no logprobs; N: the top N alternatives
        self.pending = request.prompt[kept:]
        self.produced = 0
        self.last = 0  # the newest token: fed at the next step
        self.admitted = admitted
