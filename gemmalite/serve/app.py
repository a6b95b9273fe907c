"""The HTTP side: a Starlette app that hands requests to the scheduler and streams its chunks back.

Each request is parsed and checked on the event loop (see protocol.py), then submitted to the
scheduler, whose thread calls back with chunks; `loop.call_soon_threadsafe` moves each one into
the request's asyncio queue. A streamed answer is server-sent events ending in `data: [DONE]`.
However an answer ends (finished, failed, or the client went away), the request is cancelled in
the scheduler, which frees its slot at the next step; cancelling a finished request does nothing.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
import time
import traceback
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..batching import Scheduler
from ..errors import GemmaliteError, InvalidArgumentError, QueueFullError
from ..options import GenerationOptions
from ..slots import Request
from . import protocol
from .protocol import Answer, APIError, Job

MAX_BODY_BYTES = 8 * 1024 * 1024
GONE = object()  # put in a request's queue when its client disconnects


def create_app(engine, scheduler: Scheduler, *, model: str, defaults: GenerationOptions | None = None) -> Starlette:
    """The OpenAI-compatible app. `defaults`: options for fields a request leaves out (the server's flags)."""
    api = API(engine, scheduler, model, defaults or GenerationOptions())
    routes = [
        Route("/v1/chat/completions", guarded(api.chat_completions), methods=["POST"]),
        Route("/v1/completions", guarded(api.completions), methods=["POST"]),
        Route("/v1/models", guarded(api.models), methods=["GET"]),
        Route("/v1/models/{name:path}", guarded(api.model), methods=["GET"]),
        Route("/health", guarded(api.health), methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


def guarded(endpoint):
    """The endpoint, with any error it did not expect answered as a 500 in OpenAI's shape (and logged)."""

    @functools.wraps(endpoint)
    async def answer(request: HTTPRequest) -> Response:
        try:
            return await endpoint(request)
        except Exception as error:
            traceback.print_exc(file=sys.stderr)
            return error_response(protocol.error_for(error))

    return answer


def error_response(error: APIError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def http_error(request, exc: HTTPException) -> JSONResponse:
    """Starlette's own errors (unknown path, wrong method) in OpenAI's shape."""
    messages = {404: f"no such endpoint: {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(APIError(exc.status_code, messages.get(exc.status_code, str(exc.detail)), code=code))


class API:
    def __init__(self, engine, scheduler: Scheduler, model: str, defaults: GenerationOptions):
        self.engine, self.scheduler, self.model_name, self.defaults = engine, scheduler, model, defaults
        self.created = int(time.time())

    # ------------------------------------------------------------------ endpoints
    async def chat_completions(self, request: HTTPRequest) -> Response:
        return await self._generate(request, protocol.parse_chat)

    async def completions(self, request: HTTPRequest) -> Response:
        return await self._generate(request, protocol.parse_completion)

    async def models(self, request: HTTPRequest) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: HTTPRequest) -> Response:
        name = request.path_params["name"]
        if name != self.model_name:
            message = f"no model named {name!r}; this server has {self.model_name!r}"
            return error_response(APIError(404, message, param="model", code="model_not_found"))
        return JSONResponse(self._model_card())

    async def health(self, request: HTTPRequest) -> Response:
        return JSONResponse({"status": "ok", **self.scheduler.status()})

    def _model_card(self) -> dict:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "gemmalite",
            "max_model_len": self.engine.max_seq_len,
        }

    # ------------------------------------------------------------------ generation
    async def _generate(self, request: HTTPRequest, parse) -> Response:
        try:
            body = protocol.parse_json(await read_body(request))
            # In a thread: tokenizing, and compiling a schema (the first one builds the grammar
            # library's vocabulary, seconds for Gemma's), would hold up every other request.
            job: Job = await asyncio.to_thread(parse, body, self.engine, self.defaults)
        except APIError as e:
            return error_response(e)
        except InvalidArgumentError as e:
            return error_response(APIError(400, str(e)))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def deliver(item):  # called from the scheduler's thread
            loop.call_soon_threadsafe(events.put_nowait, item)

        task = Request(job.prompt, job.options, deliver, chat=job.chat, reuse=job.reuse)
        try:
            self.scheduler.submit(task)
        except QueueFullError as e:
            return error_response(APIError(503, str(e), code="server_overloaded"), headers={"Retry-After": "1"})
        except GemmaliteError as e:  # shutting down
            return error_response(APIError(503, str(e), code="server_shutting_down"))
        answer = Answer(job, self.model_name, self.engine.tokenizer)
        if job.stream:
            return EventStream(self._events(answer, events), on_close=lambda: self.scheduler.cancel(task))
        watcher = asyncio.create_task(_watch_disconnect(request, events))
        try:
            pieces = []
            while not (pieces and pieces[-1].finish_reason):
                item = await events.get()
                if item is GONE:
                    return Response(status_code=499)  # nobody is listening; a status for the log
                if isinstance(item, BaseException):
                    return error_response(protocol.error_for(item))
                pieces.append(item)
            return JSONResponse(answer.whole(pieces))
        finally:
            watcher.cancel()
            self.scheduler.cancel(task)

    async def _events(self, answer: Answer, events: asyncio.Queue) -> AsyncIterator[str]:
        first = answer.first_chunk()
        if first is not None:
            yield _sse(first)
        while True:
            item = await events.get()
            if isinstance(item, BaseException):  # too late for a status: the error goes in the stream
                yield _sse(protocol.error_for(item).body())
                break
            if item.finish_reason:
                for body in answer.last_chunks(item):
                    yield _sse(body)
                break
            body = answer.chunk(item)
            if body is not None:
                yield _sse(body)
        yield "data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """Server-sent events; `on_close` runs however the response ends, even before its first event."""

    def __init__(self, events: AsyncIterator[str], on_close):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def read_body(request: HTTPRequest, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, or a 413 error as soon as it is known to be longer than `limit`."""
    too_large = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def _watch_disconnect(request: HTTPRequest, events: asyncio.Queue) -> None:
    """Put GONE in the queue when the client disconnects (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    events.put_nowait(GONE)
