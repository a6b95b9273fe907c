"""Arguments shared by the commands that load a model and generate, and what they turn into.

The generation flags are named after `GenerationOptions`' fields (argparse's `dest`), so one
function turns them into the engine's options, checked once and before the model loads. Each
flag also answers to the spelling people bring from llama.cpp, ollama and vLLM (`--temp`,
`--max-tokens`, `--repeat-penalty`, `-sys`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from dataclasses import fields

from ..errors import InvalidArgumentError
from ..options import GenerationOptions
from ..shortlist import DEFAULT_SHORTLIST
from .console import info


def count(text: str) -> int:
    """argparse type: an integer >= 0 (argparse names the flag in the error)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_quiet_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="print no information lines on stderr")


def add_system_arg(parser: argparse.ArgumentParser, help: str) -> None:
    # `-sys` is one option (llama.cpp's spelling): argparse takes an exact match first, so it never
    # reads as -s (--seed) with the value "ys", and -s, -sy or -s5 never silently mean -sys.
    parser.add_argument("--system", "--system-prompt", "-sys", metavar="TEXT", help=help)


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
        help="--compile: compile prefill and the decode step with torch.compile in this process (CUDA's default); "
        "--no-compile: eager. CPU's default: run them from the compile cache, whose packages are built once per "
        "machine, in the background after the first run that lacks them",
    )
    group.add_argument("--max-seq-len", type=int, metavar="N", help="longest transcript in tokens (default: min(model's, 32768))")
    group.add_argument(
        "--quantize",
        choices=["int8", "none"],
        help="int8: int8 weights for every projection and the head, half the bytes of bf16 per token and close to it "
        "in quality (KL 0.004 nats per token on the 270M); none: the weights in --dtype. Default: int8 on CPU in "
        "bfloat16, else none",
    )
    group.add_argument(
        "--draft", metavar="SRC",
        help="a smaller model with the same tokenizer that drafts tokens for speculative decoding "
        "(loaded like --model; the output stays the same)",
    )  # fmt: skip
    group.add_argument("--draft-quantize", choices=["int8", "none"], help="the --draft model's weights, as --quantize")
    group.add_argument(
        "--draft-shortlist", type=int, metavar="N",
        help="the --draft model's head scores only the N likeliest tokens: cheaper drafts, the same output "
        f"(default {DEFAULT_SHORTLIST}; 0: its whole head)",
    )  # fmt: skip


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "generation",
        "Sampling values not given take the checkpoint's generation_config.json; when it has none,\n"
        "temperature 0.8, top_k 40, top_p 0.95 and min_p 0.05 (as llama-cli), with a repetition penalty of 1.1\n"
        "over the last 64 tokens (as ollama). --temperature 0 is greedy.",
    )
    add = group.add_argument
    add("-n", "--max-new-tokens", "--max-tokens", type=count, metavar="N", help="most tokens to generate (default: 256)")
    add("--temperature", "--temp", "-t", type=float, metavar="T", help="0 is greedy")
    add("--top-k", type=int, metavar="K", help="keep the K most likely tokens; 0 is off")
    add("--top-p", type=float, metavar="P", help="nucleus sampling, in (0, 1]; 1 is off")
    add("--min-p", type=float, metavar="P", help="drop tokens below P times the top one's probability; 0 is off")
    add(
        "--repetition-penalty",
        "--repeat-penalty",
        type=float,
        metavar="R",
        help="> 1 discourages tokens already in the prompt or reply (transformers' rule); 1 is off",
    )
    add(
        "--repeat-last-n",
        type=int,
        metavar="N",
        help="the repetition penalty looks back over the last N tokens; -1 is all of them, 0 is off",
    )
    add("--presence-penalty", type=float, metavar="P", help="subtract P from tokens already in the reply; 0 is off")
    add("--frequency-penalty", type=float, metavar="F", help="subtract F per earlier use of a token in the reply; 0 is off")
    add("--seed", "-s", type=int, metavar="S", help="seed for reproducible sampling")
    add("--stop", action="append", metavar="STR", help="stop before this text (repeatable)")
    add("--ignore-eos", action="store_true", help="keep going past end-of-sequence tokens")
    add(
        "--lookup", dest="speculative", action="store_const", const="lookup",
        help="speculative decoding by prompt lookup: drafts copied from earlier in prompt and reply (same output)",
    )  # fmt: skip
    add("--draft-tokens", dest="num_draft_tokens", type=count, metavar="K", help="most tokens drafted per forward")
    add(
        "--json-schema",
        metavar="FILE_OR_JSON",
        help="the reply is JSON that fits this JSON Schema (a file, or the schema itself); needs gemmalite[structured]",
    )
    add("--json-object", action="store_true", help="the reply is a JSON object (any); needs gemmalite[structured]")


def generation_options(args: argparse.Namespace) -> GenerationOptions:
    """The generation flags as one GenerationOptions, checked (InvalidArgumentError, exit 2)."""
    given = {f.name: getattr(args, f.name) for f in fields(GenerationOptions) if hasattr(args, f.name)}
    if getattr(args, "json_object", False):
        if args.json_schema is not None:
            raise InvalidArgumentError("--json-schema and --json-object cannot be combined: give one")
        given["json_schema"] = True
    elif getattr(args, "json_schema", None) is not None:
        given["json_schema"] = read_schema(args.json_schema)
    return GenerationOptions(**given)


def read_schema(file_or_json: str) -> str:
    """--json-schema's value: the schema itself when it starts like JSON, else a file that holds it."""
    if file_or_json.lstrip().startswith("{"):
        return file_or_json
    try:
        return Path(file_or_json).read_text()
    except OSError as e:
        raise InvalidArgumentError(f"--json-schema {file_or_json!r} is neither a JSON object nor a readable file: {e.strerror}") from None


def check_model_args(args: argparse.Namespace) -> None:
    """Check the model flags that can be checked without the model, so mistakes are instant."""
    from ..loading import parse_device, parse_dtype

    if args.max_seq_len is not None and args.max_seq_len < 2:
        raise InvalidArgumentError(f"--max-seq-len must be >= 2, got {args.max_seq_len}")
    parse_dtype(args.dtype)
    parse_device(args.device)


def quantize_default(args: argparse.Namespace, chosen: str | None) -> str | None:
    """What --quantize (or --draft-quantize) means: as given, else int8 on CPU in bfloat16, where
    decoding is the speed of reading weights (docs/benchmarks.md); None for the dtype's own weights."""
    from ..loading import parse_device, parse_dtype
    import torch

    if chosen is None:
        on_cpu = parse_device(args.device).type == "cpu" and parse_dtype(args.dtype) == torch.bfloat16
        chosen = "int8" if on_cpu else "none"
    return None if chosen == "none" else chosen


def load_engine(args: argparse.Namespace):
    """Load the model that --model names (or the default one), saying on stderr what and how long."""
    from ..loading import load

    source = args.model
    if source is None:
        from .. import gguf

        source = gguf.default_gguf_path()
        note = "" if "instruction-tuned" in gguf.DEFAULT_MODEL_DESCRIPTION else " (base, not instruction-tuned)"
        info(
            args,
            f"no --model given, so using the default model: {gguf.DEFAULT_MODEL_DESCRIPTION}{note}. "
            "It is the base model: it continues text rather than following instructions",
        )
    started = time.perf_counter()
    draft = None
    if getattr(args, "draft", None):
        shortlist = DEFAULT_SHORTLIST if args.draft_shortlist is None else args.draft_shortlist or None
        draft = load(
            args.draft, device=args.device, dtype=args.dtype, compile=args.compile, max_seq_len=args.max_seq_len,
            quantize=quantize_default(args, args.draft_quantize), shortlist=shortlist,
        )  # fmt: skip
    quantize = quantize_default(args, args.quantize)
    engine = load(
        source,
        draft=draft,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        max_seq_len=args.max_seq_len,
        quantize=quantize,
    )
    dtype = str(engine.dtype).removeprefix("torch.")
    compiled = (", compiled" if engine.compiled else ", compile cache" if engine.compile == "cached" else "")
    compiled += f", {quantize}" if quantize else ""
    compiled += f", drafting with {args.draft}" if draft is not None else ""
    info(args, f"loaded {source} in {time.perf_counter() - started:.2f} s ({engine.device}, {dtype}{compiled})")
    engine.runner.on_compile = lambda what, seconds: info(args, compile_notice(what, seconds))
    return engine


def compile_notice(what: str, seconds: float | None) -> str:
    """The line shown before (seconds None) and after the compiler builds a graph."""
    if seconds is None:
        return (
            f"compiling {what}; the first time on a machine takes up to a minute or two, "
            "later runs reuse torch's on-disk cache and take seconds"
        )
    return f"compiled {what} in {seconds:.1f} s"
