"""`gemmalite serve`: an OpenAI-compatible HTTP server with continuous batching.

    gemmalite serve [--model SRC] [--host 127.0.0.1] [--port 8000] [--parallel N] [--queue N]
                    [--api-key KEY] [--timeout S] [--shutdown-timeout S] [--cors-origin ORIGIN]
                    [--log-format text|json] [--allow-image-urls] [--image-dir DIR]
                    [model options] [generation options]

It listens at once (answering 503 while the model loads), loads the model, prints the URL on
stderr and serves until SIGTERM or Ctrl-C. Then it drains: new generations get 503, running ones
may finish for --shutdown-timeout seconds, the rest end with finish_reason "abort", and it exits
0; a second Ctrl-C stops at once. The generation flags are defaults for the fields a request
leaves out; what they leave unset comes from the checkpoint's generation_config.json (greedy when
it has none), as in vLLM. The work is done by the scheduler (batching.py) and the app (serve/);
this module only wires them to uvicorn. Needs the `serve` extra.
"""

from __future__ import annotations

import argparse
import os
import socket
import threading
from pathlib import Path

from ..errors import InvalidArgumentError, MissingExtraError
from ..serve.media import FETCH_TIMEOUT_S, MAX_IMAGE_BYTES
from .console import EXIT_OK, PROG, info, note
from .defaults import FROM_CHECKPOINT, NAMES, describe
from .options import add_generation_args, add_model_args, add_quiet_arg, check_model_args, count, generation_options, load_engine

REQUEST_DEFAULTS = (
    "Defaults for the fields a request leaves out. Sampling values set neither here nor in the request\n"
    "come from the checkpoint's generation_config.json, else greedy (as vLLM does)."
)
API_KEY_ENV = "GEMMALITE_API_KEY"  # the key from the environment stays out of `ps`
CLOSE_CONNECTIONS_S = 5  # after the drain, how long uvicorn waits for connections to close


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def megabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of megabytes, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0 MB, got {text}")
    return value


def image_sources(args):
    """The server's ImageSources from its flags; the directory must exist."""
    from ..serve.media import ImageSources

    if args.image_dir is not None and not args.image_dir.is_dir():
        raise InvalidArgumentError(f"--image-dir {args.image_dir}: no such directory")
    return ImageSources(args.allow_image_urls, args.image_dir, int(args.image_max_mb * 1e6), args.image_fetch_timeout)


def configure(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    server.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000; 0 picks a free one)")
    server.add_argument(
        "--parallel", "-np", type=positive, default=4, metavar="N",
        help="requests decoded together, one row of the cache each (default: 4)",
    )  # fmt: skip
    server.add_argument(
        "--queue", type=count, default=64, metavar="N",
        help="requests that may wait for a free slot; more are answered 503 (default: 64)",
    )  # fmt: skip
    server.add_argument(
        "--api-key", metavar="KEY", default=None,
        help=f"require Authorization: Bearer KEY on every route but /health (default: ${API_KEY_ENV}, else none)",
    )  # fmt: skip
    server.add_argument("--timeout", type=seconds, metavar="S", help="longest a request may take in all (default: no limit)")
    server.add_argument(
        "--shutdown-timeout", type=seconds, default=30.0, metavar="S",
        help="at SIGTERM or Ctrl-C, how long running requests may go on before they are aborted (default: 30)",
    )  # fmt: skip
    server.add_argument(
        "--cors-origin", action="append", default=[], metavar="ORIGIN",
        help="let browser pages from ORIGIN (e.g. https://app.example.com, or *) call the API; repeatable (default: none)",
    )  # fmt: skip
    server.add_argument(
        "--log-format", choices=("text", "json"), default="text",
        help="one line per request on stderr, as text or JSON lines (default: text; -q: none)",
    )  # fmt: skip
    images = parser.add_argument_group("images", "Where image_url parts may come from; data: URLs always work.")
    images.add_argument(
        "--allow-image-urls", action="store_true",
        help="fetch http(s) image URLs that requests send (default: refused, so the server makes no outgoing requests)",
    )  # fmt: skip
    images.add_argument(
        "--image-dir", metavar="DIR", type=Path,
        help="read file:// image URLs, but only of files under DIR (default: refused)",
    )  # fmt: skip
    images.add_argument(
        "--image-max-mb", type=megabytes, default=MAX_IMAGE_BYTES / 1e6, metavar="MB",
        help=f"largest image accepted, from any source (default: {MAX_IMAGE_BYTES / 1e6:g})",
    )  # fmt: skip
    images.add_argument(
        "--image-fetch-timeout", type=seconds, default=FETCH_TIMEOUT_S, metavar="S",
        help=f"longest a fetched image may take to arrive, in all (default: {FETCH_TIMEOUT_S:g})",
    )  # fmt: skip
    add_model_args(parser)
    add_generation_args(parser)
    # The shared flags, with what they mean here: defaults for the fields a request leaves out.
    for group in parser._action_groups:
        if group.title == "generation":
            group.description = REQUEST_DEFAULTS
    for action in parser._actions:
        if action.dest == "max_new_tokens":
            action.help = "most tokens per request when it gives no max_tokens (default: until the context is full)"
    add_quiet_arg(parser)


def require_extra():
    """uvicorn, or MissingExtraError naming the extra that installs the server's stack."""
    try:
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise MissingExtraError(f"`{PROG} serve` needs {e.name}: pip install 'gemmalite[serve]'") from None
    return uvicorn


def run(args: argparse.Namespace) -> int:
    uvicorn = require_extra()
    defaults = generation_options(args)
    check_model_args(args)
    if not 0 <= args.port <= 65535:
        raise InvalidArgumentError(f"--port must be in [0, 65535], got {args.port}")
    key = api_key(args)
    sources = image_sources(args)
    sock = listen(args.host, args.port)  # before loading: a port in use fails at once
    try:
        return serve(args, uvicorn, sock, defaults, key, sources)
    finally:
        sock.close()


def api_key(args) -> str | None:
    """The key from --api-key, else from the environment; an empty one is a mistake, not "no key"."""
    if args.api_key is not None:
        if not args.api_key.strip():
            raise InvalidArgumentError("--api-key is empty; give a key, or leave the flag out to serve without one")
        return args.api_key
    key = os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise InvalidArgumentError(f"{API_KEY_ENV} is set but empty; set a key, or unset it to serve without one")
    return key


def serve(args, uvicorn, sock: socket.socket, defaults, key: str | None, sources) -> int:
    from ..serve.app import create_app

    app = create_app(
        model=args.model or "google/gemma-3-270m", defaults=defaults, api_key=key, cors_origins=tuple(args.cors_origin),
        timeout=args.timeout, log_format=None if args.quiet else args.log_format, image_sources=sources,
    )  # fmt: skip
    config = uvicorn.Config(
        app, log_level="error" if args.quiet else "warning", access_log=False, lifespan="off",
        timeout_graceful_shutdown=CLOSE_CONNECTIONS_S,
    )  # fmt: skip
    server = graceful_server(uvicorn, config, app.state.api, args.shutdown_timeout)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    failed: list[BaseException] = []

    def load() -> None:  # while uvicorn already answers, 503 until the model is ready
        try:
            scheduler = start_scheduler(args, defaults)
            server.scheduler = scheduler
            app.state.api.ready(scheduler.engine, scheduler)
            if args.allow_image_urls or args.image_dir is not None:
                sources = sources.describe() if scheduler.engine.vision else "none: this model is text-only"
                info(args, f"images: {sources}")
            # Shown with --quiet too: it is what the user started the command for.
            secured = "; a key is required" if key else ""
            note(f"{PROG}: serving {args.model or 'the default model'} at {url}/v1 ({args.parallel} slots{secured}); Ctrl-C stops")
        except BaseException as error:
            failed.append(error)
            server.should_exit = True

    threading.Thread(target=load, name="gemmalite-load", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        if server.scheduler is not None:
            server.scheduler.close()  # whatever is still running ends with finish_reason "abort"
    if failed:
        raise failed[0]
    info(args, "stopped")
    return EXIT_OK


def start_scheduler(args, defaults):
    from ..batching import Scheduler

    engine = load_engine(args)
    if engine.tokenizer is None:
        raise InvalidArgumentError("this checkpoint has no tokenizer.model; the server needs one to read and write text")
    given = {name for name in NAMES if getattr(defaults, name) is not None}
    origin = FROM_CHECKPOINT if not engine.defaults.greedy else "greedy: the checkpoint sets no sampling"
    info(args, "request defaults: " + describe(defaults.sampling(engine.defaults), given, origin))
    scheduler = Scheduler(engine, parallel=args.parallel, max_queue=args.queue)
    if engine.compiled:  # load_engine's notices say what compiles and how long it took
        scheduler.warm_up([engine.defaults, defaults.sampling(engine.defaults)])
    scheduler.start()
    return scheduler


def graceful_server(uvicorn, config, api, shutdown_timeout: float):
    """A uvicorn server whose SIGTERM and Ctrl-C drain first (see the module doc), and exit 0."""

    class GracefulServer(uvicorn.Server):
        scheduler = None
        _interrupt = threading.Event()

        def handle_exit(self, sig, frame) -> None:
            # uvicorn's own handler would close the socket at once and raise the signal again at the end.
            if api.state == "draining":  # a second signal: stop now
                self._interrupt.set()
                self.should_exit = self.force_exit = True
                return
            if self.scheduler is None:  # still loading: nothing to drain
                self.should_exit = True
                return
            api.drain()
            note(f"{PROG}: draining: running requests may finish for {shutdown_timeout:g} s; Ctrl-C again stops at once")
            threading.Thread(target=self._drain, name="gemmalite-drain", daemon=True).start()

        def _drain(self) -> None:
            self.scheduler.drain(shutdown_timeout, self._interrupt)
            self.should_exit = True

    return GracefulServer(config)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, so the URL is known (and taken) before the model loads."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise InvalidArgumentError(f"cannot listen on {host}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock
