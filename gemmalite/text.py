"""From tokens to text while they arrive: whole characters only, cut at stop strings.

A token can be one byte of a multi-byte character (SentencePiece's byte fallback), and a stop
string can be split across tokens. `TextStream` holds back what is not yet safe to show: a
character still being assembled, and any tail that could be the start of a stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextStream:
    """One row's text, fed token by token. `add` returns the text that is now safe to show."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = (), skip_ids: Sequence[int] = ()):
        self.decode, self.stops, self.skip_ids = decode, tuple(stops), frozenset(skip_ids)
        self.ids: list[int] = []
        # Text of ids[:settled], which ended on a whole character: only the rest is decoded again.
        self.settled, self.settled_text = 0, ""
        self.text = ""  # everything decoded so far, up to any stop string
        self.emitted = 0
        self.stopped = False  # a stop string was found; `text` ends just before it

    def add(self, tokens: Sequence[int]) -> str:
        if self.stopped:
            return ""
        self.ids.extend(t for t in tokens if t not in self.skip_ids)
        recent = self.decode(self.ids[self.settled :])
        self.text = self.settled_text + recent
        if "\ufffd" not in recent:
            self.settled, self.settled_text = len(self.ids), self.text
        safe = self._cut_at_stop()
        if not self.stopped:
            safe = self._hold_back(safe)
        piece = self.text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return piece

    def flush(self) -> str:
        """The rest of the text, held back or not: call once the tokens have ended."""
        piece = self.text[self.emitted :]
        self.emitted = len(self.text)
        return piece

    def _cut_at_stop(self) -> int:
        for stop in self.stops:
            at = self.text.find(stop, max(self.emitted - len(stop), 0))
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
                return at
        return len(self.text)

    def _hold_back(self, safe: int) -> int:
        """Keep back a character still arriving as byte tokens, and a possible stop-string start."""
        while safe > self.emitted and self.text[safe - 1] == "\ufffd":
            safe -= 1
        shown = self.text[:safe]
        for stop in self.stops:
            for k in range(len(stop) - 1, 0, -1):
                if shown.endswith(stop[:k]):
                    safe = min(safe, len(shown) - k)
                    break
        return safe
