"""The commands that are tools around the engine: `convert` (GGUF to a checkpoint dir) and `check`."""

from __future__ import annotations

import argparse

from ..errors import InvalidArgumentError
from .console import EXIT_OK, EXIT_RUNTIME
from .options import add_quiet_arg


def configure_convert(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("gguf", metavar="FILE.gguf", help="a Gemma 3 GGUF file")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where to write the checkpoint (must not exist, or be empty)")
    add_quiet_arg(parser)


def run_convert(args: argparse.Namespace) -> int:
    from .. import gguf

    out = gguf.convert(args.gguf, args.out_dir, progress=not args.quiet)
    print(out, flush=True)
    return EXIT_OK


def configure_check(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", metavar="SRC", help="check this model instead of a tiny random one")
    parser.add_argument("--device", metavar="D", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", metavar="D", help="bfloat16 or float32 (default: float32, so that eager and compiled match exactly)")
    parser.add_argument("--steps", type=int, default=200, metavar="N", help="greedy steps to compare (default: 200)")


def run_check(args: argparse.Namespace) -> int:
    from ..loading import parse_device, parse_dtype
    from ..selfcheck import check

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
