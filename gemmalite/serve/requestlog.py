"""One log line per request: who asked what of which route, how it ended, how long it took.

A line says the method, path, status, duration and client address, and for a generation its id,
token counts (prompt, cached, completion), finish reason, time to first token and decode speed.
It never holds the prompt or the reply, nor any header (so never the API key). `--log-format
json` writes the same fields as one JSON object per line, for log collectors.

A generation's figures are gathered in a RequestRecord: the scheduler's thread stamps each token
as it is delivered, and the endpoint closes the record when the answer ends; the metrics count
it then (see metrics.py), and the log middleware writes its line once the response is sent.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

STATE_KEY = "gemmalite.request"  # where an endpoint leaves its RequestRecord in the ASGI scope's state


@dataclass
class RequestRecord:
    id: str
    prompt_tokens: int
    arrived: float = field(default_factory=time.perf_counter)
    cached_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None  # None until it ends; "abort" when cut short (client gone, timeout, error)
    first_token: float | None = None
    last_token: float | None = None
    ended: float | None = None
    token_gaps: list[float] = field(default_factory=list)

    def tokens(self, n: int) -> None:
        """`n` new tokens were delivered now (called from the scheduler's thread)."""
        now = time.perf_counter()
        if self.first_token is None:
            self.first_token = now
        elif n:
            self.token_gaps.extend([(now - self.last_token) / n] * n)
        self.last_token = now
        self.completion_tokens += n

    def end(self, finish_reason: str | None, usage=None) -> bool:
        """Close the record (once; later calls do nothing): whether this call closed it."""
        if self.ended is not None:
            return False
        self.ended = time.perf_counter()
        self.finish_reason = finish_reason or "abort"
        if usage is not None:
            self.cached_tokens, self.completion_tokens = usage.cached_tokens, usage.completion_tokens
        return True

    def fields(self) -> dict:
        ttft = None if self.first_token is None else self.first_token - self.arrived
        decoding = None if self.first_token is None or self.last_token is None else self.last_token - self.first_token
        speed = (self.completion_tokens - 1) / decoding if decoding and self.completion_tokens > 1 else None
        return {
            "id": self.id,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
            "ttft_s": _round(ttft),
            "decode_tok_s": _round(speed, 1),
        }


class RequestLog:
    """ASGI middleware: one line per HTTP request on `stream`, as text or JSON."""

    def __init__(self, app, *, json_lines: bool = False, stream=None):
        self.app, self.json_lines, self.stream = app, json_lines, stream
        self._lock = threading.Lock()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = None

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            record = scope.get("state", {}).get(STATE_KEY)
            line = {
                "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "duration_s": _round(time.perf_counter() - started),
                "client": scope["client"][0] if scope.get("client") else None,
                **(record.fields() if record is not None else {}),
            }
            self.write(line)

    def write(self, line: dict) -> None:
        if self.json_lines:
            text = json.dumps(line)
        else:
            shown = {k: v for k, v in line.items() if k not in ("time", "method", "path", "status") and v is not None}
            text = f"{line['time']} {line['method']} {line['path']} {line['status']} " + " ".join(f"{k}={v}" for k, v in shown.items())
        with self._lock:
            stream = self.stream or sys.stderr
            print(text, file=stream, flush=True)


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)
