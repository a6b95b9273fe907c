"""The `gemmalite` command line.

    gemmalite "prompt" [options]          continue a prompt (read from stdin when absent)
    gemmalite convert FILE.gguf OUT_DIR   turn a GGUF into a checkpoint directory
    gemmalite chat [options]              a conversation, one turn per line
    gemmalite check [options]             check the compiled path on this machine

The bare-prompt form and the sub-commands share one entry point: when the first argument names
a sub-command (a key of COMMANDS) it runs that; anything else is the prompt form. A prompt that
happens to equal a sub-command name can be passed after `--`.

Adding a sub-command takes a function that adds its arguments to a parser, a function that runs
it and returns an exit status, and one `Command` entry in COMMANDS. `add_model_args`,
`add_sampling_args`, `check_args`, `sampling_kwargs` and `load_engine` are there for commands that
load a model.

Errors are one line, `gemmalite: error: <message>`, never a traceback. Exit status: 0 ok, 1 a
runtime error (model cannot be loaded, context too long, a missing extra), 2 a usage error
(bad flag or value), 130 interrupted, 141 stdout closed early (as if killed by SIGPIPE).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import ContextLengthError, GemmaliteError, InvalidArgumentError

PROG = "gemmalite"
EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 0, 1, 2, 130, 141


class UsageError(Exception):
    """A bad command line, found by argparse or by our own checks before any work is done."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are raised (and printed as one line by `main`) instead of exiting."""

    def error(self, message):
        raise UsageError(message)


@dataclass(frozen=True)
class Command:
    help: str
    configure: Callable[[argparse.ArgumentParser], None]  # adds the command's arguments
    run: Callable[[argparse.Namespace], int]  # returns the exit status


# ------------------------------------------------------------------ shared pieces
def info(args: argparse.Namespace, message: str) -> None:
    """An informational line on stderr, unless --quiet."""
    if not getattr(args, "quiet", False):
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def add_quiet_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="print no information lines on stderr")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        "-m",
        metavar="SRC",
        help="checkpoint directory, .gguf file or Hugging Face repo id "
        "(default: the bundled google/gemma-3-270m base model, from gemmalite[demo])",
    )
    group.add_argument("--device", metavar="D", help="cpu, cuda or cuda:N (default: cuda when available)")
    group.add_argument("--dtype", metavar="D", help="bfloat16 or float32 (default: bfloat16)")
    group.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the decode step with torch.compile (default: on for CUDA, off for CPU)",
    )
    group.add_argument("--max-seq-len", type=int, metavar="N", help="longest transcript in tokens (default: min(model's, 8192))")
    group.add_argument(
        "--quantize",
        choices=["int8"],
        help="int8 weights for the head and most projections: faster CPU decoding at a measured quality cost (CPU only)",
    )


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument("-n", "--max-new-tokens", type=int, metavar="N", help="most tokens to generate (default: 256)")
    group.add_argument("--temperature", "-t", type=float, metavar="T", help="0 is greedy (default: the checkpoint's, else 0)")
    group.add_argument("--top-k", type=int, metavar="K", help="keep the K most likely tokens; 0 is off")
    group.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling, in (0, 1]; 1 is off")
    group.add_argument("--min-p", type=float, metavar="P", help="drop tokens below P times the top one's probability; 0 is off")
    group.add_argument("--seed", type=int, metavar="S", help="seed for reproducible sampling")
    group.add_argument("--stop", action="append", metavar="STR", help="stop before this text (repeatable)")
    group.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence tokens")


def check_args(args: argparse.Namespace) -> None:
    """Check everything that can be checked without the model, so mistakes are instant.

    Raises InvalidArgumentError (exit 2) with the engine's own messages.
    """
    from .loading import parse_device, parse_dtype
    from .sampling import SamplingSettings

    SamplingSettings(
        temperature=0.0 if args.temperature is None else args.temperature,
        top_k=0 if args.top_k is None else args.top_k,
        top_p=1.0 if args.top_p is None else args.top_p,
        min_p=0.0 if args.min_p is None else args.min_p,
        seed=args.seed,
    )
    if args.max_new_tokens is not None and args.max_new_tokens < 0:
        raise InvalidArgumentError(f"-n/--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.max_seq_len is not None and args.max_seq_len < 2:
        raise InvalidArgumentError(f"--max-seq-len must be >= 2, got {args.max_seq_len}")
    if args.stop is not None and not all(args.stop):
        raise InvalidArgumentError("--stop needs a non-empty string")
    parse_dtype(args.dtype)
    parse_device(args.device)


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments for Engine.generate/stream from the generation options."""
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        stop=args.stop,
    )


def load_engine(args: argparse.Namespace):
    """Load the model that --model names (or the default one), saying on stderr what and how long."""
    import gemmalite

    source = args.model
    if source is None:
        from . import gguf_import

        source = gguf_import.default_gguf_path()
        note = "" if "instruction-tuned" in gguf_import.DEFAULT_MODEL_DESCRIPTION else " (base, not instruction-tuned)"
        info(
            args,
            f"no --model given, so using the default model: {gguf_import.DEFAULT_MODEL_DESCRIPTION}{note}. "
            "It is the base model: it continues text rather than following instructions",
        )
    started = time.perf_counter()
    engine = gemmalite.load(
        source,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        max_seq_len=args.max_seq_len,
        quantize=getattr(args, "quantize", None),
    )
    dtype = str(engine.dtype).removeprefix("torch.")
    compiled = (", compiled" if engine.compiled else "") + (", int8" if getattr(args, "quantize", None) else "")
    info(args, f"loaded {source} in {time.perf_counter() - started:.2f} s ({engine.device}, {dtype}{compiled})")
    return engine


def write_out(text: str) -> None:
    """Write to stdout now, replacing what its encoding cannot show."""
    try:
        sys.stdout.write(text)
    except UnicodeEncodeError:
        encoding = sys.stdout.encoding or "utf-8"
        sys.stdout.write(text.encode(encoding, "replace").decode(encoding))
    sys.stdout.flush()


# ------------------------------------------------------------------ the prompt form
def _configure_generate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="text to continue; read from stdin when absent (one trailing newline dropped)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in Gemma's chat template (for instruction-tuned models)")
    parser.add_argument("--system", metavar="TEXT", help="system prompt (needs --chat)")
    add_model_args(parser)
    add_sampling_args(parser)
    add_quiet_arg(parser)


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    if sys.stdin is None:
        raise InvalidArgumentError("no prompt given and no stdin to read one from")
    if sys.stdin.isatty():
        info(args, "reading the prompt from stdin; end it with Ctrl-D")
    text = sys.stdin.read()
    # `echo text | gemmalite` adds a newline the user did not mean as part of the prompt.
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def _run_generate(args: argparse.Namespace) -> int:
    if args.system is not None and not args.chat:
        raise InvalidArgumentError("--system needs --chat")
    check_args(args)
    prompt = _read_prompt(args)
    engine = load_engine(args)
    n_prompt = len(engine.encode(prompt, chat=args.chat, system=args.system))
    if n_prompt >= engine.max_seq_len:
        raise ContextLengthError(
            f"the prompt has {n_prompt} tokens, but --max-seq-len is {engine.max_seq_len}; "
            "shorten it or raise --max-seq-len"
        )

    printed = ""
    pieces = engine.stream(prompt, chat=args.chat, system=args.system, **sampling_kwargs(args))
    try:
        for piece in pieces:
            write_out(piece)
            printed += piece
    finally:
        pieces.close()
    if sys.stdout.isatty() and not printed.endswith("\n"):
        write_out("\n")

    stats = engine.last_stats
    new = stats.new_tokens[0] if stats.new_tokens else 0
    reason = stats.finish_reasons[0] if stats.finish_reasons else None
    info(
        args,
        f"{n_prompt} prompt tokens, time to first token {stats.prefill_s * 1000:.0f} ms; "
        f"{new} new tokens in {stats.decode_s:.2f} s, {stats.decode_tokens_per_s:.1f} tok/s"
        + (f" (stopped: {reason})" if reason else ""),
    )
    return EXIT_OK


# ------------------------------------------------------------------ sub-commands
def _configure_convert(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("gguf", metavar="FILE.gguf", help="a Gemma 3 GGUF file")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where to write the checkpoint (must not exist, or be empty)")
    add_quiet_arg(parser)


def _run_convert(args: argparse.Namespace) -> int:
    from . import gguf_import

    out = gguf_import.convert(args.gguf, args.out_dir, progress=not args.quiet)
    print(out, flush=True)
    return EXIT_OK


CHAT_HINT = "type a message and press Enter; /reset starts over, /exit quits; Ctrl-C stops a reply, Ctrl-D exits"
CHAT_COMMANDS = "commands: /reset (start a new conversation), /exit or /quit (leave); Ctrl-C stops a reply"


def _configure_chat(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", metavar="TEXT", help="system prompt for the conversation")
    add_model_args(parser)
    add_sampling_args(parser)
    add_quiet_arg(parser)


def _note(message: str) -> None:
    """A line on stderr answering something the user did in the chat (shown even with --quiet)."""
    print(message, file=sys.stderr, flush=True)


def _chat_turn(session, text: str, options: dict) -> None:
    """Stream one reply to stdout. Ctrl-C stops it; the session keeps the part already produced."""
    pieces = None
    try:
        pieces = session.stream(text, **options)
        for piece in pieces:
            write_out(piece)
    except KeyboardInterrupt:
        write_out("\n")
        _note("[interrupted]")
        return
    except ContextLengthError as e:
        _note(f"{PROG}: {_one_line(e)} (type /reset to start a new conversation)")
        return
    finally:
        if pieces is not None:
            pieces.close()
    write_out("\n")


def _run_chat(args: argparse.Namespace) -> int:
    check_args(args)
    engine = load_engine(args)
    if engine.tokenizer is None:
        raise InvalidArgumentError("this checkpoint has no tokenizer.model, so it cannot chat: turns are text")
    session = engine.session(system=args.system, chat=True)
    options = sampling_kwargs(args)
    interactive = sys.stdin is not None and sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
    info(args, CHAT_HINT)
    prompt = "> " if interactive else ""
    while True:
        try:
            line = input(prompt)
        except KeyboardInterrupt:  # like a shell: drop the line, show a fresh prompt
            write_out("\n")
            continue
        except EOFError:
            if interactive:
                write_out("\n")
            return EXIT_OK
        if not line.strip():
            continue
        if line.startswith("/"):
            command = line.split()[0].lower()
            if command in ("/exit", "/quit"):
                return EXIT_OK
            if command == "/reset":
                session.reset()
                _note("[conversation cleared]")
            else:
                _note(f"unknown command {command}; {CHAT_COMMANDS}")
            continue
        _chat_turn(session, line, options)


def _configure_check(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", metavar="SRC", help="check this model instead of a tiny random one")
    parser.add_argument("--device", metavar="D", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", metavar="D", help="bfloat16 or float32 (default: float32, so that eager and compiled match exactly)")
    parser.add_argument("--steps", type=int, default=200, metavar="N", help="greedy steps to compare (default: 200)")


def _run_check(args: argparse.Namespace) -> int:
    from .check import check
    from .loading import parse_device, parse_dtype

    if args.steps < 1:
        raise InvalidArgumentError(f"--steps must be >= 1, got {args.steps}")
    parse_device(args.device)
    parse_dtype(args.dtype)
    section = None

    def show(result) -> None:
        nonlocal section
        if result.section != section:
            section = result.section
            print(section, flush=True)
        print("  " + result.line(), flush=True)

    report = check(device=args.device, model=args.model, dtype=args.dtype, steps=args.steps, on_result=show)
    print(report.summary(), flush=True)
    return EXIT_OK if report.ok else EXIT_RUNTIME


COMMANDS: dict[str, Command] = {
    "convert": Command("convert a GGUF file into a checkpoint directory", _configure_convert, _run_convert),
    "chat": Command("talk with a model in turns (for instruction-tuned models)", _configure_chat, _run_chat),
    "check": Command("prove the compiled decode path on this machine and measure it", _configure_check, _run_check),
}


# ------------------------------------------------------------------ entry point
def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of a sub-command, or (None) of the bare-prompt form, whose help lists the commands."""
    if command is not None:
        spec = COMMANDS[command]
        parser = _Parser(prog=f"{PROG} {command}", description=spec.help)
        spec.configure(parser)
        return parser
    width = max(len(name) for name in COMMANDS)
    listing = "\n".join(f"  {name:<{width}}  {spec.help}" for name, spec in COMMANDS.items())
    parser = _Parser(
        prog=PROG,
        usage=f'{PROG} [-h] ["prompt"] [options]\n       {PROG} COMMAND ...',
        description="Continue a prompt with a Gemma 3 model, streaming the continuation to stdout.",
        epilog=f"commands:\n{listing}\n\nRun `{PROG} COMMAND --help` for a command's options. "
        f"A prompt that equals a command name goes after `--`: {PROG} -- convert",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _configure_generate(parser)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines) or type(error).__name__


def _fail(message: str, status: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return status


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at devnull so the flush at exit does not complain (Python docs recipe)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # stdout is not a real file (e.g. captured in-process); nothing will be flushed to a pipe


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    try:
        parser = build_parser(command)
        try:
            args = parser.parse_args(argv[1:] if command else argv)
        except SystemExit as e:  # --help
            return e.code if isinstance(e.code, int) else EXIT_OK
        return COMMANDS[command].run(args) if command else _run_generate(args)
    except UsageError as e:
        return _fail(f"{e} (see {PROG}{' ' + command if command else ''} --help)", EXIT_USAGE)
    except ContextLengthError as e:  # a subclass of InvalidArgumentError, but not a mistake on the command line
        return _fail(_one_line(e), EXIT_RUNTIME)
    except InvalidArgumentError as e:
        return _fail(_one_line(e), EXIT_USAGE)
    except GemmaliteError as e:
        return _fail(_one_line(e), EXIT_RUNTIME)
    except KeyboardInterrupt:
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        print(file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as e:  # e.g. an unreadable stdin, a full disk while converting
        return _fail(_one_line(e), EXIT_RUNTIME)


if __name__ == "__main__":
    sys.exit(main())
