"""What the command line writes, and the exit statuses it returns.

Text the user asked for goes to stdout; everything about the run (what was loaded, the sampling
settings, timings) goes to stderr as `gemmalite: ...` lines, which --quiet silences.
"""

from __future__ import annotations

import argparse
import sys

PROG = "gemmalite"
EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 0, 1, 2, 130, 141


def info(args: argparse.Namespace, message: str) -> None:
    """An informational line on stderr, unless --quiet."""
    if not getattr(args, "quiet", False):
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def note(message: str) -> None:
    """A line on stderr that answers something the user did (shown even with --quiet)."""
    print(message, file=sys.stderr, flush=True)


def write_out(text: str) -> None:
    """Write to stdout now, replacing what its encoding cannot show."""
    try:
        sys.stdout.write(text)
    except UnicodeEncodeError:
        encoding = sys.stdout.encoding or "utf-8"
        sys.stdout.write(text.encode(encoding, "replace").decode(encoding))
    sys.stdout.flush()
