"""`gemmalite chat`: a conversation on one session, one turn per line.

Replies stream to stdout. Ctrl-C stops the current reply and keeps the conversation; /reset
starts over; /exit, /quit or Ctrl-D leave. When stdin is not a terminal there is no prompt, and
stdout holds only the replies, one per line.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from ..errors import ContextLengthError, GemmaliteError, InvalidArgumentError, one_line
from .console import EXIT_OK, PROG, info, note, write_out
from .defaults import with_sampling_defaults
from .options import (
    add_generation_args,
    add_model_args,
    add_quiet_arg,
    add_system_arg,
    check_model_args,
    generation_options,
    load_engine,
)

HINT = "type a message and press Enter; /reset starts over, /exit quits; Ctrl-C stops a reply, Ctrl-D exits"
COMMANDS = (
    "commands: /image PATH (attach an image to your next message), /reset (start a new conversation), "
    "/exit or /quit (leave); Ctrl-C stops a reply"
)


def configure(parser: argparse.ArgumentParser) -> None:
    add_system_arg(parser, "system prompt for the conversation")
    add_model_args(parser)
    add_generation_args(parser)
    add_quiet_arg(parser)


def run(args: argparse.Namespace) -> int:
    options = generation_options(args)
    check_model_args(args)
    engine = load_engine(args)
    if engine.tokenizer is None:
        raise InvalidArgumentError("this checkpoint has no tokenizer.model, so it cannot chat: turns are text")
    options, sampling = with_sampling_defaults(options, engine.defaults)
    info(args, sampling)
    engine.warm_up(**asdict(options))  # compile before any text is printed, not mid-reply
    session = engine.session(system=args.system, chat=True)
    interactive = sys.stdin is not None and sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
    info(args, HINT)
    images: list = []  # attached with /image, sent with the next message
    while True:
        try:
            line = input("> " if interactive else "")
        except KeyboardInterrupt:  # like a shell: drop the line, show a fresh prompt
            write_out("\n")
            continue
        except EOFError:
            if interactive:
                write_out("\n")
            return EXIT_OK
        if not line.strip():
            continue
        if not line.startswith("/"):
            reply(session, line, asdict(options), images or None)
            images = []
        elif line.split()[0].lower() == "/image":
            attach(session, line.split(maxsplit=1)[1].strip() if len(line.split()) > 1 else "", images)
        elif not run_command(session, line.split()[0].lower()):
            return EXIT_OK


def run_command(session, command: str) -> bool:
    """Do a /command; False means leave."""
    if command in ("/exit", "/quit"):
        return False
    if command == "/reset":
        session.reset()
        note("[conversation cleared]")
    else:
        note(f"unknown command {command}; {COMMANDS}")
    return True


def attach(session, path: str, images: list) -> None:
    """/image PATH: check the image now, send it with the next message."""
    from ..vision.images import open_image

    if not session.engine.vision:
        note(f"{PROG}: this model takes no images")
    elif not path:
        note("usage: /image PATH")
    else:
        try:
            open_image(path, path)
        except GemmaliteError as e:
            note(f"{PROG}: {one_line(e)}")
            return
        images.append(path)
        note(f"[image {len(images)} attached: it goes with your next message]")


def reply(session, text: str, options: dict, images: list | None = None) -> None:
    """Stream one reply to stdout. Ctrl-C stops it; the session keeps the part already produced."""
    pieces = None
    try:
        pieces = session.stream(text, images, **options)
        for piece in pieces:
            write_out(piece)
    except KeyboardInterrupt:
        write_out("\n")
        note("[interrupted]")
        return
    except ContextLengthError as e:
        note(f"{PROG}: {one_line(e)} (type /reset to start a new conversation)")
        return
    except GemmaliteError as e:  # an image that cannot be read, or as many markers as images
        note(f"{PROG}: {one_line(e)}")
        return
    finally:
        if pieces is not None:
            pieces.close()
    write_out("\n")
