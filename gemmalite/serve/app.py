"""The HTTP side: a Starlette app that hands requests to the scheduler and streams its chunks back.

Each request is parsed and checked on the event loop (see protocol.py), then submitted to the
scheduler, whose thread calls back with chunks; `loop.call_soon_threadsafe` moves each one into
the request's asyncio queue. A streamed answer is server-sent events ending in `data: [DONE]`.
However an answer ends (finished, failed, timed out, or the client went away), the request is
cancelled in the scheduler, which frees its slot at the next step; cancelling a finished request
does nothing. A stream with nothing to say for KEEPALIVE_S seconds (a long prefill, a wait for a
slot) sends an SSE comment, so that proxies do not cut it.

The app lives through three states: "loading" (every route but /health and /metrics answers 503,
and /health too), "ok", and "draining" once shutdown begins (new generations get 503 with
Retry-After and /health says so, while those running finish). In front of the routes sit, from
the outside in: CORS (when origins are given), the request log, and the API key check.
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
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..batching import Scheduler
from ..errors import GemmaliteError, InvalidArgumentError, MissingExtraError, QueueFullError
from ..options import GenerationOptions
from ..slots import Request
from ..vision.inputs import prepare as prepare_images
from . import protocol
from .auth import RequireKey
from .media import ImageSources
from .answers import Answer
from .protocol import APIError, Job
from .requestlog import STATE_KEY, RequestLog, RequestRecord

MAX_BODY_BYTES = 8 * 1024 * 1024
KEEPALIVE_S = 15.0  # a stream with nothing to say for this long sends an SSE comment
RETRY_AFTER_S = 5  # what a 503 asks for while the model loads or the server drains
GONE = object()  # put in a request's queue when its client disconnects
KEEP_ALIVE, TIMED_OUT = object(), object()  # what waiting for a request's next event may give instead


def create_app(
    engine=None,
    scheduler: Scheduler | None = None,
    *,
    model: str,
    defaults: GenerationOptions | None = None,
    api_key: str | None = None,
    cors_origins: tuple[str, ...] = (),
    timeout: float | None = None,
    keepalive_s: float = KEEPALIVE_S,
    log_format: str | None = "text",
    log_stream=None,
    image_sources: ImageSources | None = None,
) -> Starlette:
    """The OpenAI-compatible app. `defaults`: options for fields a request leaves out (the server's flags).

    Without `engine` the app starts "loading": hand it the engine and scheduler later with
    `app.state.api.ready(engine, scheduler)`. `api_key`: required on every route but /health.
    `timeout`: seconds a generation may take in all. `log_format`: "text", "json" or None (no log).
    `image_sources`: where image_url parts may come from besides data: URLs (see media.py).
    """
    api = API(model, defaults or GenerationOptions(), timeout=timeout, keepalive_s=keepalive_s, image_sources=image_sources)
    if engine is not None:
        api.ready(engine, scheduler)
    routes = [
        Route("/v1/chat/completions", guarded(api.chat_completions), methods=["POST"]),
        Route("/v1/completions", guarded(api.completions), methods=["POST"]),
        Route("/v1/models", guarded(api.models), methods=["GET"]),
        Route("/v1/models/{name:path}", guarded(api.model), methods=["GET"]),
        Route("/tokenize", guarded(api.tokenize), methods=["POST"]),
        Route("/detokenize", guarded(api.detokenize), methods=["POST"]),
        Route("/metrics", guarded(api.metrics_text), methods=["GET"]),
        Route("/health", guarded(api.health), methods=["GET"]),
    ]
    middleware = []  # the first is the outermost
    if cors_origins:  # outside the key check: a browser's preflight carries no key
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"]))  # fmt: skip
    if log_format is not None:
        middleware.append(Middleware(RequestLog, json_lines=log_format == "json", stream=log_stream))
    if api_key:
        middleware.append(Middleware(RequireKey, key=api_key))
    app = Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: http_error})
    app.state.api = api
    return app


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
    def __init__(self, model: str, defaults: GenerationOptions, *, timeout: float | None, keepalive_s: float,
                 image_sources: ImageSources | None = None):  # fmt: skip
        from .metrics import Metrics  # prometheus_client: part of the serve extra

        self.engine, self.scheduler = None, None
        self.model_name, self.defaults, self.timeout, self.keepalive_s = model, defaults, timeout, keepalive_s
        self.created = int(time.time())
        self.state = "loading"
        self.image_sources = image_sources or protocol.DATA_ONLY
        self.metrics = Metrics(model)

    def ready(self, engine, scheduler: Scheduler) -> None:
        """The model is loaded: start answering."""
        self.engine, self.scheduler = engine, scheduler
        self.metrics.scheduler = scheduler
        self.state = "ok"

    def drain(self) -> None:
        """Shutdown has begun: refuse new generations (those running go on)."""
        self.state = "draining"

    def _unavailable(self, generation: bool = True) -> Response | None:
        """The 503 for a request that cannot be taken now (None when it can)."""
        if self.state == "loading":
            error = APIError(503, "the model is still loading; try again shortly", code="model_loading")
        elif self.state == "draining" and generation:
            error = APIError(503, "the server is shutting down", code="server_shutting_down")
        else:
            return None
        return error_response(error, headers={"Retry-After": str(RETRY_AFTER_S)})

    # ------------------------------------------------------------------ endpoints
    async def chat_completions(self, request: HTTPRequest) -> Response:
        return await self._generate(request, functools.partial(protocol.parse_chat, sources=self.image_sources))

    async def completions(self, request: HTTPRequest) -> Response:
        return await self._generate(request, protocol.parse_completion)

    async def models(self, request: HTTPRequest) -> Response:
        return self._unavailable(False) or JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: HTTPRequest) -> Response:
        if (refused := self._unavailable(False)) is not None:
            return refused
        name = request.path_params["name"]
        if name != self.model_name:
            message = f"no model named {name!r}; this server has {self.model_name!r}"
            return error_response(APIError(404, message, param="model", code="model_not_found"))
        return JSONResponse(self._model_card())

    async def health(self, request: HTTPRequest) -> Response:
        """200 while serving; 503 while loading or draining, so that load balancers send nothing new."""
        status = {"status": self.state, **(self.scheduler.status() if self.scheduler is not None else {})}
        return JSONResponse(status, status_code=200 if self.state == "ok" else 503)

    async def tokenize(self, request: HTTPRequest) -> Response:
        """{"prompt"} or {"messages"} -> {"tokens", "count", "max_model_len"}: the ids a request would feed."""
        if (refused := self._unavailable(False)) is not None:
            return refused
        try:
            ids, names = protocol.parse_tokenize(protocol.parse_json(await read_body(request)), self.engine)
        except APIError as e:
            return error_response(e)
        pieces = [self.engine.tokenizer.sp.id_to_piece(i) for i in ids] if names else None
        return JSONResponse({"count": len(ids), "max_model_len": self.engine.max_seq_len, "tokens": ids, "token_strs": pieces})

    async def detokenize(self, request: HTTPRequest) -> Response:
        """{"tokens"} -> {"prompt"}: their text, as the engine's tokenizer reads them."""
        if (refused := self._unavailable(False)) is not None:
            return refused
        try:
            ids = protocol.parse_detokenize(protocol.parse_json(await read_body(request)), self.engine)
        except APIError as e:
            return error_response(e)
        return JSONResponse({"prompt": self.engine.tokenizer.decode(ids)})

    async def metrics_text(self, request: HTTPRequest) -> Response:
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

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
        arrived = time.perf_counter()
        if (refused := self._unavailable()) is not None:
            return refused
        try:
            body = protocol.parse_json(await read_body(request))
            # In a thread: tokenizing, fetching images, and compiling a schema (the first one builds
            # the grammar library's vocabulary, seconds for Gemma's), would hold up every other request.
            job: Job = await asyncio.to_thread(parse, body, self.engine, self.defaults)
        except APIError as e:
            return error_response(e)
        except InvalidArgumentError as e:
            return error_response(APIError(400, str(e)))
        loop = asyncio.get_running_loop()
        images = None
        if job.images:  # read and encoded off the event loop: the tower takes a while
            try:
                images = await loop.run_in_executor(None, prepare_images, self.engine.image_encoder, [job.prompt], [list(job.images)])
            except InvalidArgumentError as e:
                return error_response(APIError(400, str(e), param="messages"))
            except MissingExtraError as e:
                return error_response(APIError(500, str(e)))
        events: asyncio.Queue = asyncio.Queue()
        answer = Answer(job, self.model_name, self.engine.tokenizer)
        record = RequestRecord(answer.id, len(job.prompt), arrived=arrived)
        request.scope.setdefault("state", {})[STATE_KEY] = record
        deadline = None if self.timeout is None else arrived + self.timeout

        def deliver(item):  # called from the scheduler's thread
            if not isinstance(item, BaseException) and item.token_ids:
                record.tokens(len(item.token_ids))
            loop.call_soon_threadsafe(events.put_nowait, item)

        task = Request(job.prompt, job.options, deliver, chat=job.chat, reuse=job.reuse, images=images)
        try:
            self.scheduler.submit(task)
        except QueueFullError as e:
            return error_response(APIError(503, str(e), code="server_overloaded"), headers={"Retry-After": "1"})
        except GemmaliteError as e:  # shutting down
            return error_response(APIError(503, str(e), code="server_shutting_down"), headers={"Retry-After": str(RETRY_AFTER_S)})

        def end(item=None) -> None:  # however the answer ends: free the slot, count the request
            self.scheduler.cancel(task)
            last = item if item is not None and not isinstance(item, BaseException) and item.finish_reason else None
            if record.end(last.finish_reason if last else None, last.usage if last else None):
                self.metrics.observe(record)

        if job.stream:
            return EventStream(self._events(answer, events, deadline, end), on_close=end)
        watcher = asyncio.create_task(_watch_disconnect(request, events))
        try:
            pieces = []
            while not (pieces and pieces[-1].finish_reason):
                item = await self._next_event(events, deadline)
                if item is TIMED_OUT:
                    return error_response(self._timed_out())
                if item is GONE:
                    return Response(status_code=499)  # nobody is listening; a status for the log
                if isinstance(item, BaseException):
                    return error_response(protocol.error_for(item))
                pieces.append(item)
            end(pieces[-1])
            return JSONResponse(answer.whole(pieces))
        finally:
            watcher.cancel()
            end()

    async def _events(self, answer: Answer, events: asyncio.Queue, deadline: float | None, end) -> AsyncIterator[str]:
        first = answer.first_chunk()
        if first is not None:
            yield _sse(first)
        while True:
            item = await self._next_event(events, deadline, self.keepalive_s)
            if item is KEEP_ALIVE:
                yield ": keep-alive\n\n"
                continue
            if item is TIMED_OUT:
                end()
                yield _sse(self._timed_out().body())
                break
            if isinstance(item, BaseException):  # too late for a status: the error goes in the stream
                yield _sse(protocol.error_for(item).body())
                break
            if item.finish_reason:
                end(item)
                for body in answer.last_chunks(item):
                    yield _sse(body)
                break
            body = answer.chunk(item)
            if body is not None:
                yield _sse(body)
        yield "data: [DONE]\n\n"

    @staticmethod
    async def _next_event(events: asyncio.Queue, deadline: float | None, keepalive: float | None = None):
        """The request's next event; TIMED_OUT past the deadline, KEEP_ALIVE after `keepalive` s of silence."""
        wait = keepalive
        if deadline is not None:
            left = deadline - time.perf_counter()
            if left <= 0:
                return TIMED_OUT
            wait = left if wait is None else min(wait, left)
        if wait is None:
            return await events.get()
        try:
            return await asyncio.wait_for(events.get(), wait)
        except asyncio.TimeoutError:
            return TIMED_OUT if deadline is not None and time.perf_counter() >= deadline else KEEP_ALIVE

    def _timed_out(self) -> APIError:
        return APIError(504, f"the request took longer than this server's --timeout of {self.timeout:g} s", code="timeout")


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
