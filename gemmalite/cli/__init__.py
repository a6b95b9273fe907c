"""The `gemmalite` command line.

    gemmalite "prompt" [options]          continue a prompt (read from stdin when absent)
    gemmalite chat [options]              a conversation, one turn per line
    gemmalite convert FILE.gguf OUT_DIR   turn a GGUF into a checkpoint directory
    gemmalite check [options]             check the compiled path on this machine
    gemmalite serve [options]             an OpenAI-compatible server (needs gemmalite[serve])

One module per command: generate.py (the prompt form), chat.py, tools.py (convert and check),
serve.py.
options.py holds the flags they share and turns them into the engine's GenerationOptions;
defaults.py picks the sampling settings; console.py holds what every command writes.

The bare-prompt form and the sub-commands share one entry point: when the first argument names
a sub-command (a key of COMMANDS) it runs that; anything else is the prompt form. A prompt that
happens to equal a sub-command name can be passed after `--`. A sub-command is a function that
adds its arguments to a parser, a function that runs it and returns an exit status, and one
`Command` entry in COMMANDS.

Errors are one line, `gemmalite: error: <message>`, never a traceback. Exit status: 0 ok, 1 a
runtime error (model cannot be loaded, context too long, a missing extra), 2 a usage error
(bad flag or value), 130 interrupted, 141 stdout closed early (as if killed by SIGPIPE).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import ContextLengthError, GemmaliteError, InvalidArgumentError, one_line
from . import chat, generate, serve, tools
from .console import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, PROG

__all__ = ["COMMANDS", "Command", "build_parser", "main"]


class UsageError(Exception):
    """A bad command line, found by argparse before any work is done."""


class Parser(argparse.ArgumentParser):
    """argparse, but errors are raised (and printed as one line by `main`) instead of exiting."""

    def error(self, message):
        raise UsageError(message)


@dataclass(frozen=True)
class Command:
    help: str
    configure: Callable[[argparse.ArgumentParser], None]  # adds the command's arguments
    run: Callable[[argparse.Namespace], int]  # returns the exit status


COMMANDS: dict[str, Command] = {
    "convert": Command("convert a GGUF file into a checkpoint directory", tools.configure_convert, tools.run_convert),
    "chat": Command("talk with a model in turns (for instruction-tuned models)", chat.configure, chat.run),
    "check": Command("prove the compiled decode path on this machine and measure it", tools.configure_check, tools.run_check),
    "serve": Command("serve an OpenAI-compatible API with continuous batching", serve.configure, serve.run),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of a sub-command, or (None) of the bare-prompt form, whose help lists the commands."""
    if command is not None:
        spec = COMMANDS[command]
        parser = Parser(prog=f"{PROG} {command}", description=spec.help)
        spec.configure(parser)
        return parser
    width = max(len(name) for name in COMMANDS)
    listing = "\n".join(f"  {name:<{width}}  {spec.help}" for name, spec in COMMANDS.items())
    parser = Parser(
        prog=PROG,
        usage=f'{PROG} [-h] ["prompt"] [options]\n       {PROG} COMMAND ...',
        description="Continue a prompt with a Gemma 3 model, streaming the continuation to stdout.",
        epilog=f"commands:\n{listing}\n\nRun `{PROG} COMMAND --help` for a command's options. "
        f"A prompt that equals a command name goes after `--`: {PROG} -- convert",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    generate.configure(parser)
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    try:
        parser = build_parser(command)
        try:
            args = parser.parse_args(argv[1:] if command else argv)
        except SystemExit as e:  # --help, --version
            return e.code if isinstance(e.code, int) else EXIT_OK
        return COMMANDS[command].run(args) if command else generate.run(args)
    except UsageError as e:
        return fail(f"{e} (see {PROG}{' ' + command if command else ''} --help)", EXIT_USAGE)
    except ContextLengthError as e:  # a subclass of InvalidArgumentError, but not a mistake on the command line
        return fail(one_line(e), EXIT_RUNTIME)
    except InvalidArgumentError as e:
        return fail(one_line(e), EXIT_USAGE)
    except GemmaliteError as e:
        return fail(one_line(e), EXIT_RUNTIME)
    except KeyboardInterrupt:
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        print(file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        silence_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as e:  # e.g. an unreadable stdin, a full disk while converting
        return fail(one_line(e), EXIT_RUNTIME)


def fail(message: str, status: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return status


def silence_stdout() -> None:
    """After a broken pipe: point stdout at devnull so the flush at exit does not complain (Python docs recipe)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # stdout is not a real file (e.g. captured in-process); nothing will be flushed to a pipe
