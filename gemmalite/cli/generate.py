"""The prompt form, `gemmalite "prompt" [options]`: the continuation, streamed to stdout.

Only the continuation goes to stdout; what was loaded, the sampling settings in force and the
timings go to stderr. With --logprobs the text still goes to stdout and a table of the tokens
follows on stderr; with --json, stdout carries JSON lines instead of text (see tokens.py).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from ..errors import ContextLengthError, InvalidArgumentError
from ..options import MAX_LOGPROBS, GenerationOptions
from .console import EXIT_OK, info, write_out
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
from .tokens import TokenTable, json_line, token_records


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="text to continue; read from stdin when absent (one trailing newline dropped)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in Gemma's chat template (for instruction-tuned models)")
    add_system_arg(parser, "system prompt (needs --chat)")
    parser.add_argument(
        "--image",
        action="append",
        metavar="PATH",
        help="an image file for the prompt (repeat for more): one per <start_of_image> in the prompt, in order; "
        "with --chat and no marker they open the user's turn (needs a Gemma 3 4B, 12B or 27B checkpoint)",
    )
    add_model_args(parser)
    add_generation_args(parser)
    output = parser.add_argument_group("output")
    output.add_argument(
        "--logprobs",
        type=int,
        metavar="N",
        help=f"show each new token's log-probability and its N likeliest alternatives (0 to {MAX_LOGPROBS}): "
        "a table on stderr after the text, or in the --json lines",
    )
    output.add_argument(
        "--json",
        action="store_true",
        help="write JSON lines to stdout instead of text: one per new token, then one with the text, "
        "finish reason and token counts",
    )
    add_quiet_arg(parser)


def read_prompt(args: argparse.Namespace) -> str:
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


def run(args: argparse.Namespace) -> int:
    if args.system is not None and not args.chat:
        raise InvalidArgumentError("--system needs --chat")
    options = generation_options(args)
    check_model_args(args)
    prompt = read_prompt(args)
    engine = load_engine(args)
    options, sampling = with_sampling_defaults(options, engine.defaults)
    info(args, sampling)
    images = args.image  # None: no images
    n_prompt = len(engine.encode(prompt, chat=args.chat, system=args.system, images=None if images is None else len(images)))
    if n_prompt >= engine.max_seq_len:
        raise ContextLengthError(
            f"the prompt has {n_prompt} tokens, but --max-seq-len is {engine.max_seq_len}; "
            "shorten it or raise --max-seq-len"
        )
    engine.warm_up(**asdict(options))  # compile before any text is printed, not mid-reply
    if args.json:
        write_json(engine, prompt, args, options)
    elif options.logprobs is not None:
        write_text_and_table(engine, prompt, args, options)
    else:
        write_text(engine.stream(prompt, chat=args.chat, system=args.system, images=images, **asdict(options)))
    report_speed(args, engine, n_prompt)
    return EXIT_OK


def write_text(pieces) -> None:
    """Stream text pieces to stdout (a generator, closed at the end), then a newline at a terminal."""
    printed = ""
    try:
        for piece in pieces:
            write_out(piece)
            printed += piece
    finally:
        pieces.close()
    if sys.stdout.isatty() and not printed.endswith("\n"):
        write_out("\n")


def write_text_and_table(engine, prompt: str, args: argparse.Namespace, options: GenerationOptions) -> None:
    """The text on stdout as it arrives, then the table of tokens on stderr."""
    table = TokenTable(options.logprobs)
    chunks = engine.complete_stream(prompt, chat=args.chat, system=args.system, images=args.image, **asdict(options))

    def pieces():
        try:
            for chunk in chunks:
                table.extend(token_records(engine, chunk))
                yield chunk.text
        finally:
            chunks.close()

    write_text(pieces())
    table.write(sys.stderr)


def write_json(engine, prompt: str, args: argparse.Namespace, options: GenerationOptions) -> None:
    """JSON lines on stdout: one per new token, then {"text", "finish_reason", "usage"}."""
    chunks = engine.complete_stream(prompt, chat=args.chat, system=args.system, images=args.image, **asdict(options))
    text = ""
    try:
        for chunk in chunks:  # the last one has finish_reason and usage
            for record in token_records(engine, chunk):
                write_out(json_line(record))
            text += chunk.text
    finally:
        chunks.close()
    write_out(json_line({"text": text, "finish_reason": chunk.finish_reason, "usage": {k: v for k, v in asdict(chunk.usage).items() if v is not None}}))


def report_speed(args: argparse.Namespace, engine, n_prompt: int) -> None:
    stats = engine.last_stats
    new = stats.new_tokens[0] if stats.new_tokens else 0
    reason = stats.finish_reasons[0] if stats.finish_reasons else None
    info(
        args,
        f"{n_prompt} prompt tokens, time to first token {stats.prefill_s * 1000:.0f} ms; "
        f"{new} new tokens in {stats.decode_s:.2f} s, {stats.decode_tokens_per_s:.1f} tok/s"
        + (f" (stopped: {reason})" if reason else "")
        + (f"; drafts accepted: {stats.acceptance_rate:.0%} of {sum(stats.draft_tokens)}" if stats.acceptance_rate is not None else ""),
    )
