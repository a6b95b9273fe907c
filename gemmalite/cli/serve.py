"""`gemmalite serve`: an OpenAI-compatible HTTP server with continuous batching.

    gemmalite serve [--model SRC] [--host 127.0.0.1] [--port 8000] [--parallel N] [--queue N]
                    [model options] [generation options]

It loads the model, listens, prints the URL on stderr and serves until Ctrl-C. The generation
flags are defaults for the fields a request leaves out; what they leave unset comes from the
checkpoint's generation_config.json (greedy when it has none), as in vLLM. The work is done by the
scheduler (batching.py) and the app (serve/); this module only wires them to uvicorn. Needs the
`serve` extra.
"""

from __future__ import annotations

import argparse
import socket

from ..errors import InvalidArgumentError, MissingExtraError
from .console import EXIT_OK, PROG, info, note
from .defaults import FROM_CHECKPOINT, NAMES, describe
from .options import add_generation_args, add_model_args, add_quiet_arg, check_model_args, count, generation_options, load_engine

REQUEST_DEFAULTS = (
    "Defaults for the fields a request leaves out. Sampling values set neither here nor in the request\n"
    "come from the checkpoint's generation_config.json, else greedy (as vLLM does)."
)
GRACEFUL_SHUTDOWN_S = 3  # at Ctrl-C, how long open streams may go on before they are cut


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


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
    sock = listen(args.host, args.port)  # before loading: a port in use fails at once
    try:
        return serve(args, uvicorn, sock, defaults)
    finally:
        sock.close()


def serve(args, uvicorn, sock: socket.socket, defaults) -> int:
    from ..batching import Scheduler
    from ..serve.app import create_app

    engine = load_engine(args)
    if engine.tokenizer is None:
        raise InvalidArgumentError("this checkpoint has no tokenizer.model; the server needs one to read and write text")
    given = {name for name in NAMES if getattr(defaults, name) is not None}
    origin = FROM_CHECKPOINT if not engine.defaults.greedy else "greedy: the checkpoint sets no sampling"
    info(args, "request defaults: " + describe(defaults.sampling(engine.defaults), given, origin))
    scheduler = Scheduler(engine, parallel=args.parallel, max_queue=args.queue)
    if engine.compiled:  # load_engine's notices say what compiles and how long it took
        scheduler.warm_up([engine.defaults, defaults.sampling(engine.defaults)])
    app = create_app(engine, scheduler, model=args.model or "google/gemma-3-270m", defaults=defaults)
    config = uvicorn.Config(
        app, log_level="error" if args.quiet else "warning", access_log=False, lifespan="off",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )  # fmt: skip
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    scheduler.start()
    try:
        # Shown with --quiet too: it is what the user started the command for.
        note(f"{PROG}: serving {args.model or 'the default model'} at {url}/v1 ({args.parallel} slots); Ctrl-C stops")
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down on Ctrl-C, then raises it again
        pass
    finally:
        scheduler.close()
    info(args, "stopped")
    return EXIT_OK


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
